"""``torch.compile`` where it works, the same function eagerly where it does not.

``MMDET_ANCHORLOSS_COMPILE``: ``auto`` (default: compile where a compiler works, else eager,
with one warning), ``1`` (compile, raise if it fails), ``0`` (always eager).
"""

import os
import warnings
from typing import Callable, Optional

import torch

_OFF = ('0', 'false', 'off', 'eager')
_FORCE = ('1', 'true', 'on')


def compile_mode() -> str:
    return os.environ.get('MMDET_ANCHORLOSS_COMPILE', 'auto').lower()


class MaybeCompiled:
    """A kernel function run compiled (``dynamic=True``) or eagerly.

    Args:
        fn (Callable): the kernel, written in plain torch ops.
        eager (Callable, optional): what to run without a compiler (default ``fn``), e.g. a
            chunked form that bounds temporaries.
        cpu_only (bool): compile on CPU only. For kernels whose results must be bitwise
            equal to upstream's eager ops: the CPU backend keeps ``-ffp-contract=off``,
            while GPU code generation may contract a*b+c into an FMA.
    """

    def __init__(
        self, fn: Callable, eager: Optional[Callable] = None, cpu_only: bool = False
    ) -> None:
        self.fn = fn
        self.eager = eager or fn
        self.cpu_only = cpu_only
        self.mode = compile_mode()
        self.failed = False
        self._compiled = None

    def compiled(self) -> Callable:
        if self._compiled is None:
            self._compiled = torch.compile(self.fn, dynamic=True, fullgraph=True)
        return self._compiled

    def wants_compiled(self, device: torch.device) -> bool:
        if self.mode in _OFF or self.failed or torch.compiler.is_compiling():
            return False
        return not (self.cpu_only and device.type != 'cpu')

    def __call__(self, *args):
        device = next(a.device for a in args if isinstance(a, torch.Tensor))
        if self.wants_compiled(device):
            try:
                return self.compiled()(*args)
            except Exception as err:  # no C compiler / Triton: fall back, say so once
                if self.mode in _FORCE:
                    raise
                self.failed = True
                first = str(err).splitlines()[0][:200] if str(err) else ''
                warnings.warn(
                    f'mmdet_anchorloss: torch.compile unavailable for '
                    f'{self.fn.__name__} ({type(err).__name__}: {first}); '
                    'using eager kernels',
                    stacklevel=2,
                )
        return self.eager(*args)
