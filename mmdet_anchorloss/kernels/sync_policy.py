"""Where the loss may read a value back from the device.

On CUDA a read-back (``.item()``, ``bool()``, ``nonzero``) stalls the host until the GPU has
finished everything queued before it; on CPU it costs nothing. Two steps therefore choose
by device:

- the backward of the fused sigmoid loss skips scaling the gradient by an incoming 1 after
  reading it (CPU), or always scales it in place (CUDA);
- the assigner's low-quality ties recompute the IoU only where a gt can tie (found with
  ``nonzero``, CPU), or in every anchor chunk (CUDA).

Both choices give the same numbers. ``cuda_sync_policy()`` makes CPU tensors follow CUDA's
choices, so that a CPU test can count the host syncs a CUDA step makes.

Host data the loss needs on the device (sizes, counts, per-image shapes) goes the other
way. ``torch.tensor(values, device='cuda')`` copies from pageable memory, and that copy
waits for the GPU too. ``upload`` copies through pinned memory without waiting, and
``device_constant`` keeps values that do not change between steps on the device.
"""

import contextlib
from typing import Callable, Iterator, Optional

import torch
from torch import Tensor

_EMULATE_CUDA = False


def avoid_host_sync(tensor: Tensor) -> bool:
    """True where reading ``tensor`` back would stall the host (any device but the CPU)."""
    return _EMULATE_CUDA or tensor.device.type != 'cpu'


@contextlib.contextmanager
def cuda_sync_policy() -> Iterator[None]:
    """Within the block, CPU tensors take the choices made for CUDA (see module doc)."""
    global _EMULATE_CUDA
    previous, _EMULATE_CUDA = _EMULATE_CUDA, True
    try:
        yield
    finally:
        _EMULATE_CUDA = previous


_CONSTANTS: dict = {}  # device_constant's store (``remember``, one kind)
_MAX_CONSTANTS = 256


def upload(values, device, dtype: Optional[torch.dtype] = None) -> Tensor:
    """``torch.tensor(values, dtype=dtype, device=device)`` without a host sync.

    On CUDA the values go through pinned memory with a non-blocking copy (the pinned block
    is not reused before the copy is done: torch's host allocator records it); the host
    goes on at once. Elsewhere it is a plain ``torch.tensor``. ``values`` may also be a CPU
    tensor.
    """
    device = torch.device(device)
    cuda = device.type == 'cuda'
    if isinstance(values, Tensor):
        host = values if dtype is None or values.dtype == dtype else values.to(dtype)
        host = host.pin_memory() if cuda else host
    else:  # made in pinned memory at once: no second copy, fewer ops than ``pin_memory()``
        host = torch.tensor(values, dtype=dtype, pin_memory=cuda)
    return host.to(device, non_blocking=cuda)


def device_constant(values, device, dtype: Optional[torch.dtype] = None) -> Tensor:
    """``upload(values, device, dtype)`` once per distinct (values, device, dtype); later
    calls return the same tensor, which the caller must not modify in place.

    For host values that repeat from step to step (level sizes, anchors per location, the
    valid-flag extents of a batch shape). ``values`` must be hashable (nested tuples).
    """
    key = ('constant', values, str(device), dtype)
    return remember(_CONSTANTS, key, lambda: upload(values, device, dtype), _MAX_CONSTANTS)


def remember(store: dict, key, make: Callable[[], object], limit: int = 2):
    """``store[key]``, made by ``make()`` on the first call; ``store`` keeps the ``limit``
    most recently used keys of each kind (``key[0]``).

    For device tensors derived from host values that repeat between steps (per map
    shapes, per batch of image shapes), kept as long as their owner (an anchor grid) lives;
    the caller must not modify them in place. The limit is small: these are as large as the
    anchors, and the heads keep up to 16 grids.
    """
    found = store.pop(key, None)
    if found is None:
        found = make()
        same_kind = [k for k in store if k[0] == key[0]]  # oldest use first
        if len(same_kind) >= limit:
            del store[same_kind[0]]
    store[key] = found  # (re)inserted last: the most recent use
    return found
