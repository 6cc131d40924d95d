"""Compile the Triton kernels for an NVIDIA GPU on a machine without one.

Triton's interpreter, which the tests run the kernels under, checks their numbers but not
whether a GPU build accepts them, nor what the build looks like: it runs the kernel's
Python op by op in numpy. This module sends every specialisation that the loss launches
through Triton's own compiler and ptxas (both ship in the triton wheel) for a chosen
architecture, the way the first launch on that GPU would, and reads back what the build
holds:

- the registers, local memory (spills) and shared memory of each kernel (``cuobjdump``);
- whether the maps are read with 128-bit vector loads (``ld.global.v4`` in the PTX);
- how many machine instructions (SASS, ``cuobjdump -sass``) the build holds and how many
  its loop repeats, hence how many a thread of the sigmoid kernel runs per logit: a count,
  not a time, but the kernel was issue-bound on an H200 (see ``triton_kernels``);
- which floating-point instructions the assignment kernels use: their IoUs must equal
  ``bbox_overlaps``' bit for bit, so no ``fma`` and a correctly rounded ``div.rn``.

Nothing is launched, and no number here is a speed: that needs the GPU.

How: the kernels' wrappers (``triton_kernels.sigmoid_level_loss`` and the others) are called
on small CPU tensors while each ``kernel[grid](...)`` is turned into
``kernel.warmup(...)`` (compile, do not launch) under a driver that names the target
architecture. Their outputs are left unwritten. Both hooks are Triton's public API; they
are set only inside :func:`compile_only`, which must run in a process of its own without
``TRITON_INTERPRET`` (``tools/compile_kernels.py``).
"""

import argparse
import collections
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, Dict, Iterator, List, NamedTuple, Optional, Tuple

import torch


class BuiltKernel(NamedTuple):
    """One specialisation of one kernel, as built for ``arch``."""

    case: str  # which launch of the loss it is, e.g. 'retina focal fp16 backward'
    kernel: str  # the @triton.jit function's name
    arch: int  # compute capability, e.g. 90 for sm_90 (H100, H200)
    constants: Dict[str, object]  # the launch's constexpr arguments
    registers: Optional[int]  # per thread; None where cuobjdump is missing
    local_bytes: Optional[int]  # local memory per thread: register spills
    stack_bytes: Optional[int]
    shared_bytes: int
    num_warps: int
    vector_loads: int  # 128-bit global loads (ld.global.v4) in the PTX
    sass: Optional[int]  # machine instructions in the build; None without cuobjdump
    loop_sass: Optional[int]  # of them, in the kernel's loop (0: no loop)
    float_ops: Dict[str, int]  # count of each fma / div / rcp variant in the PTX
    ptx: str


class _CompileOnlyDriver:
    """The few driver calls ``JITFunction.warmup`` makes, for a GPU that is not here."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget('cuda', arch, 32)

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: Optional[int] = None) -> int:
        return 0

    def get_current_target(self):
        return self.target


@contextlib.contextmanager
def compile_only(arch: int, built: List[tuple]) -> Iterator[None]:
    """Within this block ``kernel[grid](*args, **kw)`` compiles for sm_``arch`` and appends
    ``(kernel name, constexpr kwargs, CompiledKernel)`` to ``built`` instead of launching."""
    from triton.runtime import driver
    from triton.runtime.jit import KernelInterface

    touched = []  # each kernel's binder holds the target it was made for: make it anew

    def launcher(self, grid):
        def launch(*args, **kwargs):
            if self not in touched:
                self.device_caches.clear()
                touched.append(self)
            compiled = self.warmup(*args, grid=grid, **kwargs)
            constants = {k: v for k, v in kwargs.items() if k.isupper()}
            built.append((self.fn.__name__, constants, compiled))

        return launch

    saved = KernelInterface.__getitem__
    driver.set_active(_CompileOnlyDriver(arch))
    KernelInterface.__getitem__ = launcher
    try:
        yield
    finally:
        KernelInterface.__getitem__ = saved
        for fn in touched:  # no build for the absent GPU is left to a real launch
            fn.device_caches.clear()
        with contextlib.suppress(RuntimeError):  # no GPU here: no driver to go back to
            driver.reset_active()


def _launches(tk) -> List[tuple]:
    """(case, call) for every kernel specialisation the loss launches, on small inputs.

    The shapes are small: a build depends on the constexprs, the dtypes and whether each int
    argument is 1 or divisible by 16, not on the sizes. The constexprs and dtypes are the
    ones the heads use: RetinaNet's focal loss (80 classes, 9 anchors), the RPN's binary
    cross-entropy (1 class, 3 anchors), another gamma, fp32 / fp16 / bf16 maps; the
    assigner with and without ignore boxes, low-quality matches and each gt's first best
    anchor; SSD's softmax cross-entropy (COCO's and VOC's class counts).
    """
    B, H, W = 2, 8, 12
    cases = []

    def sigmoid(name, A, C, gamma, dtype, H=H, W=W):
        N = A * H * W
        x = torch.randn(B, A * C, H, W).to(dtype)
        coef, labels = torch.rand(B, N), torch.randint(0, C + 1, (B, N))
        scale, partial = torch.ones(()), torch.zeros(2, tk.sigmoid_tiles(x, A))
        params = (gamma, 0.25, 0.75)
        forward = dict(want_grad=False, want_loss=True, partial=partial, partial_offset=0)
        backward = dict(want_grad=True, want_loss=False, grad_scale=torch.ones(2), scale_index=1)
        for step, kw in (('forward', forward), ('backward', backward)):
            cases.append(
                (
                    f'{name} {str(dtype)[6:]} {step}',
                    lambda kw=kw: tk.sigmoid_level_loss(
                        x, coef, labels, 0, A, *params, coef_scale=scale, **kw
                    ),
                )
            )

    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        sigmoid('retina focal', 9, 80, 2.0, dtype)
    # Triton specialises an int argument on its divisibility by 16: at 800 x 1344 only the
    # first level's H x W (100 x 168) is; the others (e.g. 13 x 21) build another way.
    sigmoid('retina focal, H x W odd,', 9, 80, 2.0, torch.float32, H=13, W=21)
    for dtype in (torch.float32, torch.float16):
        sigmoid('rpn bce', 3, 1, 0.0, dtype)
    sigmoid('focal gamma=1.5', 9, 80, 1.5, torch.float32)

    G, N = 5, 300
    gts = torch.rand(B, G, 4) * 50
    gts[..., 2:] += gts[..., :2]
    gt_mask = torch.ones(B, G, dtype=torch.bool)
    anchors = gts.new_tensor([[0.0, 0.0, 10.0, 10.0]]).repeat(N, 1)
    inside = torch.ones(B, N, dtype=torch.bool)
    thresholds = torch.tensor([0.0, 0.4, 0.5, 0.0])
    for ignored in (None, torch.zeros(B, N, dtype=torch.bool)):
        tag = ' with ignore boxes' if ignored is not None else ''
        for want in (True, False):
            cases.append(
                (
                    f'assign overlaps{tag}, gt argmax={want}',
                    lambda ig=ignored, w=want: tk.assign_overlaps(
                        gts, gt_mask, anchors, inside, ig, want_gt_argmax=w
                    ),
                )
            )
        cases.append(
            (
                f'assign ties{tag}',
                lambda ig=ignored: tk.assign_ties(
                    gts, gt_mask, anchors, inside, ig, torch.ones(B, G), thresholds
                ),
            )
        )
    for low in (True, False):
        cases.append(
            (
                f'assign finalize low-quality={low}',
                lambda low=low: tk.assign_finalize(
                    torch.rand(B, N),
                    torch.zeros(B, N, dtype=torch.long),
                    torch.zeros(B, N, dtype=torch.long) if low else None,
                    inside,
                    torch.ones(B, 1, dtype=torch.bool),
                    torch.zeros(B, G, dtype=torch.long),
                    thresholds,
                ),
            )
        )

    A, S = 6, 19 * 19
    for C1 in (81, 21):  # COCO, VOC
        for dtype in (torch.float32, torch.float16):
            x4 = torch.randn(B, A, C1, S).to(dtype)
            labels4 = torch.randint(0, C1, (B, A, S))
            name = f'ssd softmax C+1={C1} {str(dtype)[6:]}'
            cases.append(
                (f'{name} forward', lambda x4=x4, lab=labels4: tk.softmax_ce_forward(x4, lab))
            )
            cases.append(
                (
                    f'{name} backward',
                    lambda x4=x4, lab=labels4: tk.softmax_ce_backward(
                        x4, lab, torch.zeros(B, A, S), torch.ones(B, A, S)
                    ),
                )
            )
    return cases


_RESOURCE = re.compile(r'(REG|STACK|SHARED|LOCAL):(\d+)')
_FLOAT_OPS = re.compile(r'\b((?:fma|div|rcp)\.[a-z0-9.]+)')


def _cuobjdump() -> Optional[Path]:
    from triton.backends.nvidia import compiler

    tool = Path(compiler.__file__).parent / 'bin' / 'cuobjdump'
    return tool if tool.exists() else None


def _dump(cubin: bytes, flag: str) -> Optional[str]:
    """``cuobjdump FLAG`` of ``cubin``; None without cuobjdump."""
    tool = _cuobjdump()
    if tool is None:
        return None
    with tempfile.NamedTemporaryFile(suffix='.cubin') as f:
        f.write(cubin)
        f.flush()
        return subprocess.run(
            [str(tool), flag, f.name], capture_output=True, text=True, check=True
        ).stdout


def _resources(cubin: bytes) -> Dict[str, int]:
    """REG, STACK, SHARED, LOCAL of the one function in ``cubin`` (empty without cuobjdump)."""
    out = _dump(cubin, '--dump-resource-usage')
    if out is None:
        return {}
    function = out.split('Function', 1)[-1]
    return {k: int(v) for k, v in _RESOURCE.findall(function)}


_SASS_LINE = re.compile(r'/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);')


def _sass_counts(cubin: bytes) -> Tuple[Optional[int], Optional[int]]:
    """(instructions, instructions of the loop) of the one function in ``cubin``: the loop
    runs from a backward branch's target to the branch (0 when there is none). (None,
    None) without cuobjdump."""
    out = _dump(cubin, '-sass')
    if out is None:
        return None, None
    lines = [(int(a, 16), op, rest) for a, op, rest in _SASS_LINE.findall(out)]
    loop = 0
    for address, op, rest in lines:
        target = re.search(r'0x([0-9a-f]+)', rest) if op == 'BRA' else None
        if target and int(target.group(1), 16) < address:  # a branch back: the loop
            start = int(target.group(1), 16)
            loop = max(loop, sum(1 for a, _, _ in lines if start <= a <= address))
    # NOPs pad the function to its alignment: not run
    return sum(1 for _, op, _ in lines if op != 'NOP'), loop


def sass_per_logit(r: 'BuiltKernel') -> float:
    """Machine instructions a thread of the sigmoid kernel runs per logit it holds: the
    build's instructions, its loop repeated CLASS_STEPS - 1 more times, over CLASS_STEPS
    tiles of BLOCK_C x BLOCK_S logits shared by the program's threads."""
    k = r.constants
    steps = k['CLASS_STEPS']
    per_thread = k['BLOCK_C'] * k['BLOCK_S'] / (32 * r.num_warps)
    return (r.sass + (steps - 1) * r.loop_sass) / (steps * per_thread)


def _count(pattern: re.Pattern, text: str) -> Dict[str, int]:
    return dict(collections.Counter(pattern.findall(text)))


def build_all(arch: int, progress: Optional[Callable[[str], None]] = None) -> List[BuiltKernel]:
    """Every kernel specialisation the loss launches, built for sm_``arch``.

    Must run in a process of its own, without ``TRITON_INTERPRET``: it imports
    ``triton_kernels`` compiled, and sets Triton's active driver.

    Raises:
        RuntimeError: under ``TRITON_INTERPRET=1``, or without triton's NVIDIA backend.
        Any compile error of a kernel, as Triton raises it.
    """
    from . import triton_kernels as tk

    if not tk.available() or tk.interpreted():
        raise RuntimeError('build_all needs triton, imported without TRITON_INTERPRET=1')
    results = []
    for case, call in _launches(tk):
        if progress is not None:
            progress(case)
        built: List[tuple] = []
        with compile_only(arch, built):
            call()
        for kernel, constants, compiled in built:
            usage = _resources(compiled.asm['cubin'])
            sass, loop_sass = _sass_counts(compiled.asm['cubin'])
            ptx = compiled.asm['ptx']
            results.append(
                BuiltKernel(
                    case=case,
                    kernel=kernel,
                    arch=arch,
                    constants=constants,
                    registers=usage.get('REG'),
                    local_bytes=usage.get('LOCAL'),
                    stack_bytes=usage.get('STACK'),
                    shared_bytes=compiled.metadata.shared,
                    num_warps=compiled.metadata.num_warps,
                    vector_loads=len(re.findall(r'ld\.global(?:\.[a-z]+)*\.v4', ptx)),
                    sass=sass,
                    loop_sass=loop_sass,
                    float_ops=_count(_FLOAT_OPS, ptx),
                    ptx=ptx,
                )
            )
    return results


def table(results: List[BuiltKernel]) -> str:
    """A Markdown table of the builds, one row per kernel specialisation."""
    rows = [
        '| arch | launch | kernel | regs | spills (B) | shared (B) | warps | v4 loads '
        '| SASS (loop) | SASS per logit | fma, div |',
        '|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|',
    ]
    for r in results:
        ops = ', '.join(f'{op} x{n}' for op, n in sorted(r.float_ops.items())) or '-'
        per_logit = '-'
        if r.kernel == '_sigmoid_level_kernel' and r.sass is not None:
            per_logit = f'{sass_per_logit(r):.1f}'
        rows.append(
            f'| sm_{r.arch} | {r.case} | {r.kernel} | {r.registers} | {r.local_bytes} '
            f'| {r.shared_bytes} | {r.num_warps} | {r.vector_loads} | {r.sass} ({r.loop_sass}) '
            f'| {per_logit} | {ops} |'
        )
    return '\n'.join(rows)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument(
        '--arch', type=int, nargs='+', default=[90, 80], help='compute capabilities (90: H100)'
    )
    parser.add_argument('--json', type=Path, help='write the results here (PTX included)')
    args = parser.parse_args(argv)
    if os.environ.get('TRITON_INTERPRET') == '1':
        parser.error('unset TRITON_INTERPRET: the interpreter builds nothing')
    results = []
    for arch in args.arch:

        def progress(case: str, arch: int = arch) -> None:
            print(f'sm_{arch}: {case}', file=sys.stderr)

        try:
            results += build_all(arch, progress=progress)
        except Exception as exc:  # a kernel that does not build: say which, then fail
            print(f'sm_{arch}: build failed: {type(exc).__name__}: {exc}', file=sys.stderr)
            return 1
    print(table(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps([r._asdict() for r in results], indent=1, default=str))
    return 0
