"""Time the sigmoid focal-loss kernel on a GPU across tile shapes (a developer's tool).

For one level map (default: RetinaNet's first level at 800 x 1344, B=8: 8 x 720 x 100 x 168,
387 MB in float32) and each setting of ``triton_kernels``' ``SIGMOID_MAX_BLOCK_C`` (class
rows per tile), ``SIGMOID_TILE`` (logits per tile), ``SIGMOID_NUM_WARPS`` and
``SIGMOID_CLASS_STEPS`` (tiles per program; all: the labels and weights read once), times the
forward (loss partial sums, as ``sigmoid_level_loss(want_grad=False)``) and the backward
(gradient only) with ``triton.testing.do_bench``, and a copy of the map as the ceiling.
GB/s counts the map read, plus the gradient written in the backward; the labels and
weights read (strided by A in mmdet's anchor order) are not counted. Prints a row per
setting as it goes and stops after ``--budget`` seconds::

    python tools/sweep_sigmoid_kernel.py [--shape B AC H W] [--anchors A] [--budget S]
"""

import argparse
import itertools
import time

import torch
import triton
from triton.testing import do_bench

from mmdet_anchorloss.kernels import triton_kernels as tk

SHIPPED = (16, 2048, 8, None, torch.int64)
SETTINGS = [  # (class rows, logits per tile, warps, tiles per program (None: all), labels)
    SHIPPED,  # first
    (16, 4096, 8, 1, torch.int64),  # d553a43's program shape (one tile), with today's math
    *[
        (c, t, w, None, torch.int64)
        for c, t, w in itertools.product((8, 16, 32), (1024, 2048, 4096), (4, 8))
        if (c, t, w, None, torch.int64) != SHIPPED
    ],
    (16, 2048, 8, None, torch.int32),
]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--shape', type=int, nargs=4, default=(8, 720, 100, 168))
    parser.add_argument('--anchors', type=int, default=9, help='A, anchors per location')
    parser.add_argument('--budget', type=float, default=60.0, help='seconds')
    args = parser.parse_args(argv)
    start = time.perf_counter()
    B, AC, H, W = args.shape
    A = args.anchors
    gen = torch.Generator(device='cuda').manual_seed(0)
    x = torch.randn(B, AC, H, W, device='cuda', generator=gen) * 2 - 2
    N = A * H * W
    labels = torch.randint(0, AC // A + 1, (B, N), device='cuda', generator=gen)
    coef = torch.rand(B, N, device='cuda', generator=gen)
    gb = x.numel() * x.element_size() / 1e9
    copy = do_bench(lambda: x.clone())
    print(f'{torch.cuda.get_device_name()}, triton {triton.__version__}, map {tuple(x.shape)}')
    print(f'copy: {copy:.3f} ms, {2 * gb / copy * 1e3:.0f} GB/s (read + write)', flush=True)
    print('| rows | tile | warps | tiles/prog | labels | fwd ms | fwd GB/s | bwd ms | bwd GB/s |')
    print('|---:|---:|---:|---:|---|---:|---:|---:|---:|', flush=True)
    for rows, tile, warps, steps, dtype in SETTINGS:
        if time.perf_counter() - start > args.budget:
            print(f'(budget of {args.budget:.0f} s spent)')
            break
        tk.SIGMOID_MAX_BLOCK_C, tk.SIGMOID_TILE, tk.SIGMOID_NUM_WARPS = rows, tile, warps
        tk.SIGMOID_CLASS_STEPS = steps
        lab = labels.to(dtype)

        def run(lab=lab, **want):
            return tk.sigmoid_level_loss(x, coef, lab, 0, A, 2.0, 0.25, 0.75, **want)

        f = do_bench(lambda: run(want_grad=False))
        b = do_bench(lambda: run(want_loss=False))
        name = str(dtype).replace('torch.', '')
        print(
            f'| {rows} | {tile} | {warps} | {steps or "all"} | {name} | {f:.3f} '
            f'| {gb / f * 1e3:.0f} | {b:.3f} '
            f'| {2 * gb / b * 1e3:.0f} |',
            flush=True,
        )


if __name__ == '__main__':
    main()
