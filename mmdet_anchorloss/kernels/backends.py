"""Which implementation runs a full-size pass: the Triton kernels or the torch ones.

The Triton kernels (``triton_kernels``) run on CUDA when triton imports, unless
``MMDET_ANCHORLOSS_TRITON=0`` (read at each call); elsewhere the compiled or eager torch
kernels run. On CPU the Triton kernels run only when the tests have loaded them under
Triton's interpreter.
"""

import os
import sys

from torch import Tensor


def triton_module():
    """``triton_kernels``, imported on first use (triton is optional and slow to import)."""
    from . import triton_kernels

    return triton_kernels


def use_triton(x: Tensor) -> bool:
    """Whether ``x`` goes through the Triton kernels: on CUDA when triton imports, unless
    ``MMDET_ANCHORLOSS_TRITON=0`` (read at each call). On CPU only when the tests have loaded
    the kernels under Triton's interpreter."""
    if os.environ.get('MMDET_ANCHORLOSS_TRITON', 'auto').lower() in ('0', 'false', 'off'):
        return False
    if x.is_cuda:
        return triton_module().available()
    loaded = sys.modules.get(f'{__package__}.triton_kernels')
    return loaded is not None and loaded.usable(x)
