"""``randperm_prefixes``: the first k of CPU ``torch.randperm(n)``, and the generator state
after, bit for bit; the checked fallback to ``torch.randperm``."""

import numpy as np
import pytest
import torch

from mmdet_anchorloss.core import randperm_replay
from mmdet_anchorloss.core.randperm_replay import _first_entries, randperm_prefixes


def _torch_draws(draws, gen):
    return [torch.randperm(n, generator=gen)[:k].numpy() for n, k in draws]


def _both(draws, seed, skip, replay=randperm_replay._replay):
    """(torch's prefixes, state after) and (the replay's), from the same start. The replay
    itself by default: ``randperm_prefixes`` would hide a wrong replay behind its check."""
    gen = torch.Generator().manual_seed(seed)
    torch.randint(0, 2, (skip,), generator=gen)
    start = gen.get_state()
    want = _torch_draws(draws, gen), gen.get_state()
    gen.set_state(start)
    got = replay(draws, gen), gen.get_state()
    return want, got


# n across the key's 624 words and past them; k from 0 to n - 1; RPN-sized last
DRAW_LISTS = {
    'tiny': [(2, 0), (2, 1), (3, 2), (1, 0)],
    'around_a_twist': [(623, 5), (624, 623), (625, 1), (626, 300)],
    'many_swaps_collide': [(400, 399), (50, 49), (1000, 999)],
    'rpn_images': [(300, 128), (260_000, 128), (11, 3), (250_000, 256)],
}


@pytest.mark.parametrize('name', list(DRAW_LISTS))
@pytest.mark.parametrize('seed,skip', [(0, 0), (7, 1), (2**33 + 5, 623), (99, 624), (3, 5000)])
def test_replay_equals_randperm_and_leaves_the_same_state(name, seed, skip):
    (want, want_state), (got, got_state) = _both(DRAW_LISTS[name], seed, skip)
    assert len(got) == len(want)
    for i, (w, g) in enumerate(zip(want, got)):
        assert g.dtype == np.int64 and np.array_equal(w, g), f'draw {i}: {g[:8]} vs {w[:8]}'
    assert torch.equal(got_state, want_state)


def test_this_torch_passes_the_replays_check():
    assert randperm_replay.replay_matches_torch()


def test_default_generator_as_torch_randperm_without_one():
    draws = [(5000, 100), (30, 7)]
    torch.manual_seed(11)
    want = _torch_draws(draws, None)
    after = torch.rand(4)
    torch.manual_seed(11)
    got = randperm_prefixes(draws)
    assert all(np.array_equal(w, g) for w, g in zip(want, got))
    assert torch.equal(torch.rand(4), after)


def test_a_replay_that_raises_falls_back(monkeypatch):
    def broken(draws, gen):
        raise AttributeError("module 'numpy.random' has no attribute 'MT19937'")

    monkeypatch.setattr(randperm_replay, '_replay', broken)
    randperm_replay.replay_matches_torch.cache_clear()
    try:
        with pytest.warns(UserWarning, match='AttributeError: .*MT19937'):
            got = randperm_prefixes([(100, 5)], torch.Generator().manual_seed(3))
        want = torch.randperm(100, generator=torch.Generator().manual_seed(3))[:5]
        assert got[0].tolist() == want.tolist()
    finally:
        monkeypatch.undo()
        randperm_replay.replay_matches_torch.cache_clear()


def test_a_huge_n_is_left_to_torch(monkeypatch):
    """From (2**32 - 1) // 20 candidates on, torch shuffles another way: randperm itself."""
    calls = []
    monkeypatch.setattr(randperm_replay, '_SMALL_N', 1000)
    monkeypatch.setattr(randperm_replay, '_replay', lambda *a: calls.append(a))
    (want, want_state), (got, got_state) = _both(
        [(50, 3), (1000, 2)], 1, 0, replay=randperm_prefixes
    )
    assert not calls
    assert all(np.array_equal(w, g) for w, g in zip(want, got))
    assert torch.equal(got_state, want_state)


def test_first_entries_replays_colliding_swaps():
    """Targets that repeat: step 1 takes what step 0 put at 3, step 2 what step 1 put at 3."""
    # r = [0 1 2 3 4]; step 0 swaps 0<->3: [3 1 2 0 4]; step 1 swaps 1<->3: [3 0 2 1 4];
    # step 2 swaps 2<->3: [3 0 1 2 4]
    assert _first_entries(np.array([3, 3, 3])).tolist() == [3, 0, 1]
    # distinct targets: the entries are the targets
    assert _first_entries(np.array([4, 1, 3])).tolist() == [4, 1, 3]
    # step 1 keeps entry 1; step 2 takes the 0 that step 0 moved to entry 4
    assert _first_entries(np.array([4, 1, 4])).tolist() == [4, 1, 0]


@pytest.mark.parametrize('n,k', [(5, 5), (5, -1), (0, 0)])
def test_rejects_a_prefix_it_cannot_replay(n, k):
    with pytest.raises(ValueError, match=f'n={n}, k={k}'):
        randperm_prefixes([(n, k)])


def test_a_torch_that_differs_gets_randperm_itself(monkeypatch):
    """When the check fails (here: a replay that is off by one draw), the draws are
    torch.randperm's, with a warning that says so."""
    real = randperm_replay._replay

    def off_by_one(draws, gen):
        torch.randint(0, 2, (1,), generator=gen)
        return real(draws, gen)

    monkeypatch.setattr(randperm_replay, '_replay', off_by_one)
    randperm_replay.replay_matches_torch.cache_clear()
    try:
        with pytest.warns(UserWarning, match='torch.randperm itself'):
            assert not randperm_replay.replay_matches_torch()
        (want, want_state), (got, got_state) = _both(
            [(3000, 20), (7, 2)], 4, 10, replay=randperm_prefixes
        )
        assert all(np.array_equal(w, g) for w, g in zip(want, got))
        assert torch.equal(got_state, want_state)
    finally:
        monkeypatch.undo()
        randperm_replay.replay_matches_torch.cache_clear()
    assert randperm_replay.replay_matches_torch()  # the real replay passes its check
