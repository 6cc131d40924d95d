"""``torch.compile`` where it works, the same function eagerly where it does not.

The mode is read when a kernel is called, so it can change at any time:

- ``set_compile_mode('auto' | 'on' | 'off')`` sets it for the process;
- otherwise the environment variable ``MMDET_ANCHORLOSS_COMPILE`` gives it (``auto``,
  ``1``/``on``, ``0``/``off``/``eager``), default ``auto``.

``auto`` compiles where a compiler works and falls back to eager kernels, with one warning,
when the compiler itself fails (no C compiler, no Triton). ``on`` raises instead. ``off``
always runs eagerly. Any other exception is a real error and propagates in every mode.

Every kernel of the package is declared the same way, with ``kernel``::

    @kernel(eager=chunked_version)
    def loss_and_grad(x, coef): ...
"""

import contextlib
import os
import warnings
from typing import Callable, Optional, Tuple, Type

import torch

_OFF = ('0', 'false', 'off', 'eager')
_FORCE = ('1', 'true', 'on')
_AUTO = ('auto', '')
_MODE: Optional[str] = None


def set_compile_mode(mode: Optional[str]) -> None:
    """Set the compile mode for this process; None goes back to the environment variable.

    Args:
        mode (str | None): ``'auto'``, ``'on'`` (or ``'1'``) or ``'off'`` (or ``'0'``).
    """
    global _MODE
    if mode is not None and str(mode).lower() not in _OFF + _FORCE + _AUTO:
        raise ValueError(f"compile mode must be 'auto', 'on' or 'off', got {mode!r}")
    _MODE = None if mode is None else str(mode).lower()


def compile_mode() -> str:
    """The mode in force now: ``set_compile_mode``'s, else ``MMDET_ANCHORLOSS_COMPILE``."""
    if _MODE is not None:
        return _MODE
    return os.environ.get('MMDET_ANCHORLOSS_COMPILE', 'auto').lower()


def compiler_errors() -> Tuple[Type[BaseException], ...]:
    """The exceptions that mean "the compiler failed", as opposed to a bug in the kernel."""
    errors = []
    try:
        from torch._dynamo import exc as dynamo_exc

        errors += [dynamo_exc.BackendCompilerFailed]
        # the recompile limit (many degenerate shapes in one process) is a compiler limit too
        for name in (
            'InternalTorchDynamoError',
            'FailOnRecompileLimitHit',
            'RecompileLimitExceeded',
        ):
            if hasattr(dynamo_exc, name):
                errors.append(getattr(dynamo_exc, name))
    except ImportError:  # pragma: no cover - very old torch
        pass
    try:
        from torch._inductor import exc as inductor_exc

        for name in ('InductorError', 'CppCompileError', 'InvalidCxxCompiler', 'CUDACompileError'):
            if hasattr(inductor_exc, name):
                errors.append(getattr(inductor_exc, name))
    except ImportError:  # pragma: no cover
        pass
    return tuple(errors)


def _constant_floats():
    """Python float arguments (focal gamma, alpha) as constants of the compiled graph.

    Left to itself the compiler turns each into a tensor at every call, which on CUDA is a
    copy from the host; a kernel is recompiled for a new value instead (a config has one).
    """
    config = torch._dynamo.config
    if hasattr(config, 'specialize_float'):
        return config.patch(specialize_float=True)
    return contextlib.nullcontext()


class MaybeCompiled:
    """A kernel function run compiled (``dynamic=True``) or eagerly.

    Args:
        fn (Callable): the kernel, written in plain torch ops.
        eager (Callable, optional): what to run without a compiler (default ``fn``), e.g. a
            chunked form that bounds temporaries.
        cpu_only (bool): compile on CPU only. For kernels whose results must be bitwise
            equal to upstream's eager ops: the CPU backend keeps ``-ffp-contract=off``,
            while GPU code generation may contract a*b+c into an FMA.

    Attributes:
        mode (str | None): this kernel's own mode, overriding ``compile_mode()`` (tests).
        failed (bool): the compiler failed once in ``auto`` mode; the kernel runs eagerly.
    """

    def __init__(
        self, fn: Callable, eager: Optional[Callable] = None, cpu_only: bool = False
    ) -> None:
        self.fn = fn
        self.eager = eager or fn
        self.cpu_only = cpu_only
        self.mode: Optional[str] = None
        self.failed = False
        self._compiled = None
        self.__name__ = fn.__name__
        self.__doc__ = fn.__doc__

    def compiled(self) -> Callable:
        if self._compiled is None:
            self._compiled = torch.compile(self.fn, dynamic=True, fullgraph=True)
        return self._compiled

    def current_mode(self) -> str:
        return self.mode if self.mode is not None else compile_mode()

    def wants_compiled(self, device: torch.device) -> bool:
        if self.current_mode() in _OFF or self.failed or torch.compiler.is_compiling():
            return False
        return not (self.cpu_only and device.type != 'cpu')

    def __call__(self, *args):
        device = next(a.device for a in args if isinstance(a, torch.Tensor))
        if self.wants_compiled(device):
            try:
                with _constant_floats():
                    return self.compiled()(*args)
            except compiler_errors() as err:  # no C compiler / Triton: fall back, say so once
                if self.current_mode() in _FORCE:
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


def kernel(
    fn: Optional[Callable] = None, *, eager: Optional[Callable] = None, cpu_only: bool = False
):
    """Declare a kernel: ``@kernel`` or ``@kernel(eager=..., cpu_only=...)``; returns a
    ``MaybeCompiled``."""
    if fn is None:
        return lambda f: MaybeCompiled(f, eager, cpu_only)
    return MaybeCompiled(fn, eager, cpu_only)
