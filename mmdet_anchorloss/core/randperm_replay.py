"""The first k entries of CPU ``torch.randperm(n)``, without shuffling all n.

Upstream's ``RandomSampler`` keeps ``torch.randperm(n)[:k]`` of each candidate list. On the
CPU, ``randperm`` is a forward Fisher-Yates shuffle of ``0 .. n - 1``: step i swaps entry i
with entry ``i + random() % (n - i)``, one 32-bit Mersenne Twister (MT19937) draw per step,
n - 1 in all. For the RPN's negatives n is the whole image's anchors (about 260,000) and k
at most 256, so almost all of that work shuffles entries that are thrown away, with a
random access into an n-long array at every step.

Entry i never moves after step i, so the first k entries need only the first k draws. The
other n - 1 - k draws must still be made, so that the generator ends where ``randperm``
leaves it and later draws (the next image, the next step) stay upstream's, but they are
only raw draws: numpy's ``MT19937`` is the same generator, and it advances the state in
a tight loop. torch's CPU generator state (``Generator.get_state()``: the MT19937 key and
its position) is loaded into numpy's, and numpy's state is written back after the draws.

The replay is checked, not assumed: the first call in a process replays a few draws on a
scratch generator and compares them, and the state they end in, with ``torch.randperm``
(``replay_matches_torch``). A torch whose ``randperm`` or state layout differs gets
``torch.randperm`` itself, with a warning.
"""

import functools
import sys
import warnings
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..profiling import host_memory

_MT_N = 624  # MT19937's state words
# torch's CPU randperm shuffles as above below this n (aten's "small n" branch), and draws
# 64-bit numbers another way above it
_SMALL_N = (2**32 - 1) // 20

# ``CPUGeneratorImplState`` (aten/src/ATen/CPUGeneratorImpl.cpp), as ``get_state`` returns
# it: the initial seed, ``left`` (draws before the next twist, plus one), ``seeded``,
# ``next`` (the key index of the next draw) and the 624 key words as uint64, then the
# cached normal samples, which the replay leaves alone.
_STATE = np.dtype(
    {
        'names': ['left', 'seeded', 'next', 'key'],
        'formats': ['<i4', '<i4', '<u8', ('<u8', _MT_N)],
        'offsets': [8, 12, 16, 24],
        'itemsize': 5056,
    }
)


def randperm_prefixes(
    draws: Sequence[Tuple[int, int]], generator: Optional[torch.Generator] = None
) -> List[np.ndarray]:
    """``torch.randperm(n, generator=generator)[:k]`` for each ``(n, k)``, in order.

    The results and the generator's state afterwards are those of the same ``randperm``
    calls, bit for bit.

    Args:
        draws (Sequence[tuple[int, int]]): ``(n, k)`` per call, ``0 <= k < n``.
        generator (torch.Generator, optional): a CPU generator; torch's default one when
            None (as ``torch.randperm(n)``).

    Returns:
        list[np.ndarray]: one int64 array (k,) per call.
    """
    for n, k in draws:
        if not 0 <= k < n:
            raise ValueError(f'randperm_prefixes needs 0 <= k < n, got n={n}, k={k}')
    generator = torch.default_generator if generator is None else generator
    if not draws:
        return []
    if any(n >= _SMALL_N for n, _ in draws) or not replay_matches_torch():
        return [torch.randperm(n, generator=generator)[:k].numpy() for n, k in draws]
    return _replay(draws, generator)


def _replay(draws: Sequence[Tuple[int, int]], generator: torch.Generator) -> List[np.ndarray]:
    """The numpy replay of ``randperm_prefixes`` (no check)."""
    with host_memory():  # the generator's state is host memory, whatever the device
        raw = generator.get_state().numpy().copy()
    state = raw.view(_STATE)[0]
    mt = np.random.MT19937()
    # torch draws key[next] after decrementing ``left`` and twisting at 0; numpy draws
    # key[pos] after twisting at pos == 624: so pos = 625 - left (next equals it, except
    # right after seeding, where left = 1 and torch twists first).
    mt.state = {
        'bit_generator': 'MT19937',
        'state': {'key': state['key'].astype(np.uint32), 'pos': _MT_N + 1 - int(state['left'])},
    }
    out = []
    for n, k in draws:
        steps = np.arange(k, dtype=np.int64)
        targets = steps + (mt.random_raw(k).astype(np.int64) % (n - steps))
        if n - 1 - k:
            mt.random_raw(n - 1 - k, output=False)  # the rest of the shuffle's draws
        out.append(_first_entries(targets))
    after = mt.state['state']
    state['key'] = after['key'].astype(np.uint64)
    state['left'] = _MT_N + 1 - int(after['pos'])
    state['next'] = int(after['pos'])
    generator.set_state(torch.from_numpy(raw))
    return out


def _first_entries(targets: np.ndarray) -> np.ndarray:
    """(k,) entries 0 .. k - 1 of the shuffle, from the swap target of each step (k,).

    Step i swaps entries i and ``targets[i]`` (>= i), so entry i ends as what
    ``targets[i]`` holds before step i: its own index, unless an earlier step swapped into
    it. An earlier step j wrote entries j < i and ``targets[j]``, so with distinct targets
    nothing was, and the entries are the targets themselves. Otherwise (always for short
    lists, a few percent of the RPN's negatives) the swaps are replayed one by one.
    """
    if len(np.unique(targets)) == len(targets):
        return targets
    moved = {}
    entries = np.empty_like(targets)
    for i, t in enumerate(targets.tolist()):
        entries[i] = moved.get(t, t)
        moved[t] = moved.get(i, i)
    return entries


@functools.lru_cache(maxsize=None)
def replay_matches_torch() -> bool:
    """Whether the replay gives this torch's ``randperm`` prefixes and generator state.

    Checked once per process on a scratch generator: draws across a twist of the key and
    right after seeding, with and without repeated swap targets. All of it is host work.
    """
    with host_memory():
        return _check_replay()


def _check_replay() -> bool:
    """``replay_matches_torch``'s comparison (uncached)."""
    if sys.byteorder != 'little':
        return _fall_back('a big-endian machine')
    gen = torch.Generator()
    if gen.get_state().numel() != _STATE.itemsize:
        return _fall_back(f'a generator state of {gen.get_state().numel()} bytes')
    draws = [(2, 1), (700, 3), (5, 0), (3000, 2999 // 2), (97, 96), (40, 30)]
    for seed, skip in ((0, 0), (12345, 1000), (2**40 + 7, 623)):
        gen.manual_seed(seed)
        torch.randint(0, 2, (skip,), generator=gen)  # start anywhere in the key
        start = gen.get_state()
        expected = [torch.randperm(n, generator=gen)[:k].numpy() for n, k in draws]
        expected_state = gen.get_state()
        gen.set_state(start)
        try:
            got = _replay(draws, gen)
        except Exception as err:  # e.g. a numpy without MT19937's state or random_raw
            return _fall_back(f'the replay failed: {type(err).__name__}: {err}')
        same = all(np.array_equal(e, g) for e, g in zip(expected, got))
        if not (same and torch.equal(gen.get_state(), expected_state)):
            return _fall_back(f'a different randperm in torch {torch.__version__}')
    return True


def _fall_back(why: str) -> bool:
    warnings.warn(
        f'RandomSampler draws use torch.randperm itself ({why}): the same samples, '
        'without the faster replay',
        stacklevel=3,
    )
    return False
