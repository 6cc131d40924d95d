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
"""

import contextlib
from typing import Iterator

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
