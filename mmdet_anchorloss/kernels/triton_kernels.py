"""Hand-written Triton kernels for the full-size classification passes on CUDA.

Why not the compiled graph: inductor turns ``_loss_and_grad``'s sum over a (B, A, C, S)
map into a reduction kernel whose reduction axis is not the contiguous one; on an H100 it
ran at about 70 GB/s. These kernels instead walk each map along its contiguous H x W axis:
every program reads a tile of logits once, writes their gradient once, and leaves one
partial sum; a cheap ``sum`` over the partials finishes the total.

The sigmoid kernel's history, and why it looks as it does:

- First form, one class row per program, each reading its anchors' labels and weights
  (strided by A in mmdet's anchor order): on an H100 (2026-11-26) the forward ran at about
  320 GB/s, the backward at about 620 GB/s.
- Tiles of 16 class rows sharing one read of labels and weights: on an H200 (2026-11-27,
  ``d553a43``) the forward over RetinaNet's 492 MB of logits at B=8 took 0.48 ms (about
  1.0 TB/s), the backward 0.73 ms (about 1.4 TB/s read and written): short of half the
  card's copy rate. Its sm_90 build ran about 78 machine instructions per logit (libdevice's
  ``logf``, two full-range divisions, a tile's worth of label and weight reads), which
  points at instruction issue rather than memory as its limit (a reading of the count,
  not a measurement).
- Now: the math is one ``exp2``, one ``rsqrt`` and a polynomial (see the kernel), and a
  program reads its locations' labels and weights once and loops over all the classes; the
  build runs 34 instructions per logit forward and 38 backward (``tools/compile_kernels.py``),
  with 55 registers instead of 86. On an H200 (2026-11-27, ``2c76002``) forward and
  backward over all of RetinaNet's levels at B=8 took 0.54 ms; on the first level the
  forward read 2.7 TB/s and the backward moved 3.7 TB/s, against 4.2 TB/s for a copy.
  ``tools/sweep_sigmoid_kernel.py`` found no program shape more than 4% faster than the
  defaults below.

- ``sigmoid_level_loss``: sigmoid focal / binary cross-entropy of one level map, the target
  of each entry (1 where the class is the anchor's label) decided in the kernel from the
  (B, N) labels, so nothing is gathered or corrected afterwards. Half-precision maps are
  read as half, computed in float32 and the gradient is written in the map's dtype.
- ``softmax_ce_forward`` / ``softmax_ce_backward``: cross-entropy over the class axis of a
  (B, A, C + 1, S) map, tiles coalesced along S; the backward recomputes the softmax from
  the saved log-sum-exp instead of storing probabilities.
- ``assign_overlaps``, ``assign_ties``, ``assign_finalize``: ``BatchMaxIoUAssigner`` for the
  batch in three launches, whatever B, G and N: each anchor's and each gt's IoU maximum
  (IoUs bitwise ``bbox_overlaps``'s: the division rounds as torch's), the low-quality ties,
  then the thresholds, ties and labels. No (B, G, N) matrix; bool masks are read as they
  are (Triton int1).

Triton is optional (``pip install triton``, or the ``triton`` extra); without it, or on
CPU, the callers use the compiled / eager torch kernels. With ``TRITON_INTERPRET=1`` set
before this module is imported, the kernels run on CPU tensors through Triton's
interpreter: that is how the tests check their numbers without a GPU. The module is
imported on first use on CUDA (``backends.triton_module``), never at package import.
"""

import os
from typing import Optional, Tuple

import torch
from torch import Tensor

try:  # optional dependency
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is missing
    triton = None
    tl = None

SIGMOID_TILE = 2048  # logits per step of a sigmoid program: BLOCK_C classes x BLOCK_S
SIGMOID_MAX_BLOCK_C = 16  # class rows per tile (they share one read of labels and weights)
SIGMOID_NUM_WARPS = 8  # per program of the sigmoid kernel
SIGMOID_CLASS_STEPS = None  # class tiles per program; None: all (the sweep tries others)
ASSIGN_BLOCK = 256  # anchors per program of the assignment kernels
IOU_EPS = 1e-6  # bbox_overlaps' default
# The IoU must equal upstream's eager ``bbox_overlaps`` bit for bit, so no a*b+c is fused
# into an FMA (the interpreter has no such option, and needs none: numpy rounds every op).
_INTERPRETED = os.environ.get('TRITON_INTERPRET') == '1'  # no build options there
_EXACT = {} if _INTERPRETED else {'enable_fp_fusion': False}
# The loss kernels may fuse (their numbers are held to a tolerance); said explicitly, since
# Triton 3.9 warns that its default turns to no fusion in 3.10.
_FUSED = {} if _INTERPRETED else {'enable_fp_fusion': True}
SOFTMAX_BLOCK_S = 32  # spatial positions per program (the class axis is a full tile)


def available() -> bool:
    """Whether the Triton kernels can run at all (triton imports)."""
    return triton is not None


def interpreted() -> bool:
    """True when this module's kernels were built by Triton's CPU interpreter (the tests set
    ``TRITON_INTERPRET=1`` and load this module anew)."""
    return available() and type(_sigmoid_level_kernel).__name__ == 'InterpretedFunction'


def usable(x: Tensor) -> bool:
    """Whether ``x`` can go through the Triton kernels: CUDA, or CPU under the interpreter."""
    if not available():
        return False
    return x.is_cuda or (x.device.type == 'cpu' and interpreted())


if triton is not None:

    @triton.jit
    def _power(p, gamma, GAMMA_MODE: tl.constexpr):
        if GAMMA_MODE == 0:  # gamma == 0 (binary cross-entropy)
            return tl.full(p.shape, 1.0, tl.float32)
        elif GAMMA_MODE == 2:  # gamma == 2 (focal default)
            return p * p
        else:
            return tl.where(p > 0, tl.exp(gamma * tl.log(p)), 0.0)

    @triton.jit
    def _log1p_unit(e):
        """log1p(e) for e in [0, 1]: e times a degree-9 polynomial (Chebyshev fit of
        log1p(e) / e, within 1.6e-7 of it in float32), nine FMAs where ``tl.log`` is a
        libdevice call of some twenty instructions and Goldberg's form needs a division;
        relative, so exp(x)'s tail at very negative x is not rounded to zero."""
        h = -0.0031760570127516985 * e + 0.019542526453733444
        h = h * e - 0.056373611092567444
        h = h * e + 0.10543623566627502
        h = h * e - 0.1526966691017151
        h = h * e + 0.1966327428817749
        h = h * e - 0.24951615929603577
        h = h * e + 0.33329710364341736
        h = h * e - 0.49999892711639404
        h = h * e + 1.0
        return h * e

    @triton.jit
    def _sigmoid_level_kernel(
        x_ptr,
        coef_ptr,
        coef_scale_ptr,
        label_ptr,
        grad_ptr,
        grad_scale_ptr,
        partial_ptr,
        partial_offset,
        S,
        N,
        level_start,
        scale_index,
        gamma,
        alpha_pos,
        alpha_neg,
        A: tl.constexpr,
        C: tl.constexpr,
        GAMMA_MODE: tl.constexpr,
        WANT_LOSS: tl.constexpr,
        WANT_GRAD: tl.constexpr,
        HAS_COEF_SCALE: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_S: tl.constexpr,
        CLASS_STEPS: tl.constexpr,
    ):
        """BLOCK_S locations of one (image, anchor) of a level map, CLASS_STEPS tiles of
        BLOCK_C class rows each (all the classes unless the grid's third axis splits them):
        target 0 or 1 by label. The anchors' labels and weights (strided by A in mmdet's
        order) are read and weighted once per program, for all its class rows; each class
        row is read along the contiguous H x W.

        Per logit, with z = -x where the target is 1 and x elsewhere (the target-1 loss is
        the target-0 loss of -x): s = sigmoid(z) and softplus(z) from one exp2, whose
        1 / (1 + e) is rsqrt(1 + e) squared (1 + e is in [1, 2]; a division would be
        eight instructions), and ``_log1p_unit``; loss alpha s^g softplus(z), gradient
        sign alpha s^g (g (1 - s) softplus(z) + s)."""
        ba = tl.program_id(1)  # b * A + a
        a = ba % A
        b = ba // A
        s_idx = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
        s_ok = s_idx < S
        anchor = b.to(tl.int64) * N + level_start + s_idx * A + a  # (b, n), mmdet's order
        coef = tl.load(coef_ptr + anchor, mask=s_ok, other=0.0)
        if HAS_COEF_SCALE:  # the product the caller would have formed, in the same float32
            coef = coef * tl.load(coef_scale_ptr)
        label = tl.load(label_ptr + anchor, mask=s_ok, other=-1).to(tl.int32)[None, :]
        # per-location factors of the two targets (locations past S: coef 0, x 0, so 0)
        if WANT_LOSS:
            w_pos = (coef * alpha_pos)[None, :]
            w_neg = (coef * alpha_neg)[None, :]
            acc = tl.zeros((BLOCK_C, BLOCK_S), tl.float32)
        if WANT_GRAD:
            # the incoming gradient of the level's total (AMP's loss scale, weights)
            g = coef * tl.load(grad_scale_ptr + scale_index)
            g_pos = (-(g * alpha_pos))[None, :]
            g_neg = (g * alpha_neg)[None, :]
        row0 = ba.to(tl.int64) * C
        c_first = tl.program_id(2) * (CLASS_STEPS * BLOCK_C)
        for step in range(CLASS_STEPS):
            c = c_first + step * BLOCK_C + tl.arange(0, BLOCK_C)
            c_ok = c < C
            mask = c_ok[:, None] & s_ok[None, :]
            offs = (row0 + c)[:, None] * S + s_idx[None, :]
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            target = label == c[:, None]
            z = tl.where(target, -x, x)
            e = tl.exp2(tl.abs(x) * -1.4426950408889634)  # exp(-|x|)
            rs = tl.math.rsqrt(1.0 + e)
            r = rs * rs  # sigmoid(|x|)
            s = tl.where(z >= 0, r, e * r)  # sigmoid(z)
            sp = tl.maximum(z, 0.0) + _log1p_unit(e)  # softplus(z)
            pg = _power(s, gamma, GAMMA_MODE)
            if WANT_LOSS:
                loss = tl.where(target, w_pos, w_neg) * (pg * sp)
                if C % BLOCK_C != 0:  # rows past C read x = 0: their loss is not 0
                    loss = tl.where(c_ok[:, None], loss, 0.0)
                acc += loss
            if WANT_GRAD:
                grad = tl.where(target, g_pos, g_neg) * (pg * (gamma * (1.0 - s) * sp + s))
                tl.store(grad_ptr + offs, grad.to(grad_ptr.dtype.element_ty), mask=mask)
        if WANT_LOSS:
            tile = (tl.program_id(2) * tl.num_programs(1) + ba) * tl.num_programs(0)
            tl.store(
                partial_ptr + partial_offset + tile + tl.program_id(0),
                tl.sum(tl.sum(acc, axis=1), axis=0),
            )

    @triton.jit
    def _iou(gx1, gy1, gx2, gy2, ax1, ay1, ax2, ay2, eps):
        """IoU of one gt with a block of anchors, in ``bbox_overlaps``'s order of operations."""
        area_g = (gx2 - gx1) * (gy2 - gy1)
        area_a = (ax2 - ax1) * (ay2 - ay1)
        w = tl.minimum(gx2, ax2) - tl.maximum(gx1, ax1)
        h = tl.minimum(gy2, ay2) - tl.maximum(gy1, ay1)
        overlap = tl.maximum(w, 0.0) * tl.maximum(h, 0.0)
        union = (area_g + area_a) - overlap
        # IEEE division, as torch's: Triton's ``/`` is div.full.f32 (up to 2 ulp off), which
        # moved IoUs of exactly 0.5 or 1.0 across the thresholds on an H100
        return tl.div_rn(overlap, tl.maximum(union, eps))

    @triton.jit
    def _anchor_block(anchor_ptr, inside_ptr, ignored_ptr, b, n, N, HAS_IGNORED: tl.constexpr):
        """Coordinates of a block of anchors, and their inside / ignored flags in image b."""
        ok = n < N
        ax1 = tl.load(anchor_ptr + n * 4, mask=ok, other=0.0)
        ay1 = tl.load(anchor_ptr + n * 4 + 1, mask=ok, other=0.0)
        ax2 = tl.load(anchor_ptr + n * 4 + 2, mask=ok, other=0.0)
        ay2 = tl.load(anchor_ptr + n * 4 + 3, mask=ok, other=0.0)
        row = b.to(tl.int64) * N + n
        inside = (tl.load(inside_ptr + row, mask=ok, other=0) != 0) & ok
        if HAS_IGNORED:
            ignored = tl.load(ignored_ptr + row, mask=ok, other=0) != 0
        else:
            ignored = inside & False
        return ax1, ay1, ax2, ay2, inside, ignored, row

    @triton.jit
    def _assign_max_kernel(
        gt_ptr,
        gt_mask_ptr,
        anchor_ptr,
        inside_ptr,
        ignored_ptr,
        max_ptr,
        argmax_ptr,
        block_max_ptr,
        block_arg_ptr,
        N,
        G,
        eps,
        HAS_IGNORED: tl.constexpr,
        WANT_ARG: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """One image, BLOCK anchors, every gt: each anchor's best IoU and gt; each gt's
        best IoU and (with WANT_ARG) first anchor within the block."""
        b = tl.program_id(1)
        blk = tl.program_id(0)
        n = blk * BLOCK + tl.arange(0, BLOCK)
        ok = n < N
        ax1, ay1, ax2, ay2, inside, ignored, row = _anchor_block(
            anchor_ptr, inside_ptr, ignored_ptr, b, n, N, HAS_IGNORED
        )
        best = tl.full((BLOCK,), float('-inf'), tl.float32)
        best_gt = tl.zeros((BLOCK,), tl.int64)
        nblocks = tl.num_programs(0)
        for g in range(0, G):
            gbase = (b.to(tl.int64) * G + g) * 4
            gx1 = tl.load(gt_ptr + gbase)
            gy1 = tl.load(gt_ptr + gbase + 1)
            gx2 = tl.load(gt_ptr + gbase + 2)
            gy2 = tl.load(gt_ptr + gbase + 3)
            real = tl.load(gt_mask_ptr + b.to(tl.int64) * G + g) != 0
            ov = _iou(gx1, gy1, gx2, gy2, ax1, ay1, ax2, ay2, eps)
            if HAS_IGNORED:
                ov = tl.where(ignored, -1.0, ov)
            ov = tl.where(inside & real & ok, ov, float('-inf'))
            better = ov > best  # strict: the first gt of a tie keeps the anchor, as max()
            best_gt = tl.where(better, g, best_gt)
            best = tl.where(better, ov, best)
            # this gt's best anchor in the block: the first one reaching the block's max
            m = tl.max(ov, axis=0)
            slot = (b.to(tl.int64) * G + g) * nblocks + blk
            tl.store(block_max_ptr + slot, m)
            if WANT_ARG:
                first = tl.min(tl.where(ov == m, n, N + BLOCK), axis=0)
                tl.store(block_arg_ptr + slot, first.to(tl.int64))
        tl.store(max_ptr + row, best, mask=ok)
        tl.store(argmax_ptr + row, best_gt, mask=ok)

    @triton.jit
    def _assign_ties_kernel(
        gt_ptr,
        gt_mask_ptr,
        anchor_ptr,
        inside_ptr,
        ignored_ptr,
        gt_max_ptr,
        threshold_ptr,
        low_ptr,
        N,
        G,
        eps,
        HAS_IGNORED: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """1 + the highest eligible gt (best IoU >= min_pos_iou, ``threshold_ptr[3]``) whose
        best IoU each anchor ties, else 0 (upstream loops over gts and later gts overwrite
        earlier ones)."""
        b = tl.program_id(1)
        n = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ax1, ay1, ax2, ay2, inside, ignored, row = _anchor_block(
            anchor_ptr, inside_ptr, ignored_ptr, b, n, N, HAS_IGNORED
        )
        ok = n < N
        min_pos_iou = tl.load(threshold_ptr + 3)  # float32, as upstream's compare casts it
        low = tl.zeros((BLOCK,), tl.int64)
        for g in range(0, G):
            gi = b.to(tl.int64) * G + g
            gx1 = tl.load(gt_ptr + gi * 4)
            gy1 = tl.load(gt_ptr + gi * 4 + 1)
            gx2 = tl.load(gt_ptr + gi * 4 + 2)
            gy2 = tl.load(gt_ptr + gi * 4 + 3)
            real = tl.load(gt_mask_ptr + gi) != 0
            target = tl.load(gt_max_ptr + gi)
            ov = _iou(gx1, gy1, gx2, gy2, ax1, ay1, ax2, ay2, eps)
            if HAS_IGNORED:
                ov = tl.where(ignored, -1.0, ov)
            # eligible: best IoU >= min_pos_iou, tested on ov, which equals it where it ties
            tie = (ov == target) & (ov >= min_pos_iou) & inside & real & ok
            low = tl.where(tie, g + 1, low)
        tl.store(low_ptr + row, low, mask=ok)

    @triton.jit
    def _assign_finalize_kernel(
        max_ptr,
        argmax_ptr,
        low_ptr,
        inside_ptr,
        has_gt_ptr,
        gt_label_ptr,
        threshold_ptr,
        gt_inds_ptr,
        overlaps_ptr,
        labels_ptr,
        N,
        G,
        HAS_LOW: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """``iou._finalize`` on BLOCK anchors of one image: MaxIoUAssigner's thresholds,
        low-quality matches, images without gts and outside anchors, then the labels."""
        b = tl.program_id(1)
        n = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = n < N
        row = b.to(tl.int64) * N + n
        ov = tl.load(max_ptr + row, mask=ok, other=0.0)
        best_gt = tl.load(argmax_ptr + row, mask=ok, other=0)
        inside = tl.load(inside_ptr + row, mask=ok, other=0) != 0
        has_gt = tl.load(has_gt_ptr + b) != 0
        lo = tl.load(threshold_ptr)  # float32, as upstream's compares cast the floats
        hi = tl.load(threshold_ptr + 1)
        pos_thr = tl.load(threshold_ptr + 2)
        gt_inds = tl.where((ov >= lo) & (ov < hi), 0, -1).to(tl.int64)
        gt_inds = tl.where(ov >= pos_thr, best_gt + 1, gt_inds)
        if HAS_LOW:
            low = tl.load(low_ptr + row, mask=ok, other=0)
            gt_inds = tl.where(low > 0, low, gt_inds)
        gt_inds = tl.where(has_gt, gt_inds, 0)
        gt_inds = tl.where(inside, gt_inds, -1)
        ov = tl.where(has_gt | (inside == 0), ov, 0.0)
        positive = gt_inds > 0
        label_at = b.to(tl.int64) * G + tl.where(positive, gt_inds - 1, 0)
        labels = tl.load(gt_label_ptr + label_at, mask=ok & positive, other=-1)
        tl.store(gt_inds_ptr + row, gt_inds, mask=ok)
        tl.store(overlaps_ptr + row, ov, mask=ok)
        tl.store(labels_ptr + row, tl.where(positive, labels, -1), mask=ok)

    @triton.jit
    def _softmax_ce_fwd_kernel(
        x_ptr,
        label_ptr,
        lse_ptr,
        ce_ptr,
        C1,
        S,
        C1_P2: tl.constexpr,
        BLOCK_S: tl.constexpr,
    ):
        row = tl.program_id(1).to(tl.int64)  # b * A + a
        s = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
        c = tl.arange(0, C1_P2)
        s_ok = s < S
        mask = (c[:, None] < C1) & s_ok[None, :]
        x = tl.load(
            x_ptr + row * C1 * S + c[:, None] * S + s[None, :], mask=mask, other=-float('inf')
        ).to(tl.float32)
        m = tl.where(s_ok, tl.max(x, axis=0), 0.0)  # columns past S: all -inf
        e = tl.where(mask, tl.exp(x - m[None, :]), 0.0)
        lse = m + tl.log(tl.where(s_ok, tl.sum(e, axis=0), 1.0))
        lab = tl.load(label_ptr + row * S + s, mask=s_ok, other=0)
        x_lab = tl.sum(tl.where(c[:, None] == lab[None, :], x, 0.0), axis=0)
        tl.store(lse_ptr + row * S + s, lse, mask=s_ok)
        tl.store(ce_ptr + row * S + s, lse - x_lab, mask=s_ok)

    @triton.jit
    def _softmax_ce_bwd_kernel(
        x_ptr,
        label_ptr,
        lse_ptr,
        coef_ptr,
        grad_ptr,
        C1,
        S,
        C1_P2: tl.constexpr,
        BLOCK_S: tl.constexpr,
    ):
        row = tl.program_id(1).to(tl.int64)
        s = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
        c = tl.arange(0, C1_P2)
        s_ok = s < S
        mask = (c[:, None] < C1) & s_ok[None, :]
        offs = row * C1 * S + c[:, None] * S + s[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        lse = tl.load(lse_ptr + row * S + s, mask=s_ok, other=0.0)
        coef = tl.load(coef_ptr + row * S + s, mask=s_ok, other=0.0)
        lab = tl.load(label_ptr + row * S + s, mask=s_ok, other=0)
        prob = tl.exp(x - lse[None, :])
        onehot = tl.where(c[:, None] == lab[None, :], 1.0, 0.0)
        grad = coef[None, :] * (prob - onehot)
        tl.store(grad_ptr + offs, grad.to(grad_ptr.dtype.element_ty), mask=mask)


def _gamma_mode(gamma: float) -> int:
    return 0 if gamma == 0.0 else 2 if gamma == 2.0 else 1


def _sigmoid_tile(num_classes: int) -> Tuple[int, int, int]:
    """(BLOCK_C, BLOCK_S, CLASS_STEPS) of the sigmoid kernel for C classes: tiles of up to 16
    class rows (RPN's one class gets one) by locations to fill SIGMOID_TILE logits, at most
    1024; CLASS_STEPS tiles a program (all of them, or SIGMOID_CLASS_STEPS)."""
    block_c = min(SIGMOID_MAX_BLOCK_C, triton.next_power_of_2(max(num_classes, 1)))
    steps = triton.cdiv(max(num_classes, 1), block_c)
    if SIGMOID_CLASS_STEPS is not None:
        steps = min(steps, SIGMOID_CLASS_STEPS)
    return block_c, min(1024, SIGMOID_TILE // block_c), steps


def _sigmoid_grid(x: Tensor, num_base: int) -> Tuple[Tuple[int, int, int], int, int, int]:
    """The sigmoid kernel's grid (location tiles, B * A, class groups: 1 unless
    SIGMOID_CLASS_STEPS splits the classes) over a (B, A * C, H, W) map, and its (BLOCK_C,
    BLOCK_S, CLASS_STEPS)."""
    B, AC, H, W = x.shape
    C = AC // num_base
    block_c, block_s, steps = _sigmoid_tile(C)
    grid = (triton.cdiv(H * W, block_s), B * num_base, triton.cdiv(C, block_c * steps))
    return grid, block_c, block_s, steps


def sigmoid_level_loss(
    x: Tensor,
    coef: Tensor,
    labels: Tensor,
    level_start: int,
    num_base: int,
    gamma: float,
    alpha_pos: float,
    alpha_neg: float,
    want_grad: bool = True,
    grad_scale: Optional[Tensor] = None,
    scale_index: int = 0,
    want_loss: bool = True,
    partial: Optional[Tensor] = None,
    partial_offset: int = 0,
    coef_scale: Optional[Tensor] = None,
) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """Sigmoid focal / BCE loss of one level map, targets from the labels, in one pass.

    Every logit is read once and, with ``want_grad``, its gradient written once; the
    per-anchor weight and label are read from the (B, N) tensors of all levels in mmdet's
    anchor order, so nothing is permuted, copied or gathered, and no positive needs
    correcting afterwards.

    Args:
        x (Tensor): (B, A * C, H, W) logits of the level (float32, float16 or bfloat16).
        coef (Tensor): (B, N) float32, per-anchor weight (times the loss scale, unless
            ``coef_scale`` gives it), all levels.
        labels (Tensor): (B, N) long in [0, C]; C is background.
        level_start (int): index of this level's first anchor in N.
        num_base (int): A, anchors per location.
        gamma, alpha_pos, alpha_neg (float): focal parameters (0, 1, 1 for BCE).
        want_grad (bool): also write the gradient.
        want_loss (bool): sum the loss (the backward, which only wants the gradient, skips
            the sums and their buffer).
        grad_scale (Tensor, optional): (L,) float32 on the device; entry ``scale_index``
            multiplies the gradient (the incoming gradient of this level's total); default
            1. Read by the kernel, so it costs no host sync.
        partial (Tensor, optional): float32: where the kernel leaves its per-tile sums,
            ``sigmoid_tiles`` of them from element ``partial_offset`` on (the caller sums
            them; the total returned is then None). Default: a buffer of its own, summed
            here. An offset rather than a view of a shared buffer: a view is one more op.
        coef_scale (Tensor, optional): one float32 on the device that multiplies ``coef``
            as the kernel reads it (the same product as ``coef * coef_scale``, one op less).

    Returns:
        tuple[Tensor | None, Tensor | None]: () float32 total (None with ``partial`` or
        without ``want_loss``); (B, A * C, H, W) gradient in ``x``'s dtype, or None.
    """
    if not (want_loss or want_grad):
        raise ValueError('sigmoid_level_loss: want_loss or want_grad must be set')
    B, AC, H, W = x.shape
    x = x.contiguous()
    grid, block_c, block_s, steps = _sigmoid_grid(x, num_base)
    own = want_loss and partial is None
    if own:
        partial = torch.empty(grid[0] * grid[1] * grid[2], dtype=torch.float32, device=x.device)
    elif not want_loss:
        partial = coef  # not written without WANT_LOSS
    grad = torch.empty_like(x) if want_grad else partial  # not written without WANT_GRAD
    if grad_scale is None:  # read only with WANT_GRAD
        grad_scale = torch.ones(1, dtype=torch.float32, device=x.device) if want_grad else coef
    _sigmoid_level_kernel[grid](
        x,
        coef,
        coef if coef_scale is None else coef_scale,  # not read without HAS_COEF_SCALE
        labels,
        grad,
        grad_scale,
        partial,
        partial_offset,
        H * W,
        coef.size(1),
        level_start,
        scale_index,
        float(gamma),
        float(alpha_pos),
        float(alpha_neg),
        A=num_base,
        C=AC // num_base,
        GAMMA_MODE=_gamma_mode(float(gamma)),
        WANT_LOSS=want_loss,
        WANT_GRAD=want_grad,
        HAS_COEF_SCALE=coef_scale is not None,
        BLOCK_C=block_c,
        BLOCK_S=block_s,
        CLASS_STEPS=steps,
        num_warps=SIGMOID_NUM_WARPS,
        **_FUSED,
    )
    return (partial.sum() if own else None), (grad if want_grad else None)


def sigmoid_tiles(x: Tensor, num_base: int) -> int:
    """Programs (partial sums) of ``sigmoid_level_loss`` over a (B, A * C, H, W) map."""
    grid = _sigmoid_grid(x, num_base)[0]
    return grid[0] * grid[1] * grid[2]


def _assign_args(gts: Tensor, gt_mask: Tensor, anchors: Tensor, inside: Tensor, ignored):
    """The assignment kernels' inputs. The bool masks go in as they are (Triton reads a
    bool tensor as int1): no conversion op per mask and call."""
    B, G = gt_mask.shape
    N = anchors.size(0)
    has_ignored = ignored is not None
    return (
        gts.float().contiguous(),
        gt_mask.contiguous(),
        anchors.float().contiguous(),
        inside.contiguous(),
        ignored.contiguous() if has_ignored else inside,  # not read without HAS_IGNORED
    ), (B, G, N, has_ignored)


def assign_overlaps(
    gts: Tensor,
    gt_mask: Tensor,
    anchors: Tensor,
    inside: Tensor,
    ignored: Optional[Tensor],
    want_gt_argmax: bool = True,
) -> Tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    """The IoU maxima of ``BatchMaxIoUAssigner`` in one launch: no (B, G, N) matrix.

    Args:
        gts (Tensor): (B, G, 4) padded gts. gt_mask (Tensor): (B, G) bool.
        anchors (Tensor): (N, 4). inside (Tensor): (B, N) bool.
        ignored (Tensor, optional): (B, N) bool, anchors covered by an ignore box (IoU -1).
        want_gt_argmax (bool): also find each gt's first best anchor (only the assigner's
            ``gt_max_assign_all=False`` reads it; it costs a buffer and six small ops).

    Returns:
        tuple: max_ov (B, N) float, argmax_ov (B, N) long; gt_max (B, G) float and
        gt_argmax (B, G) long (the first anchor reaching it), or None.
    """
    args, (B, G, N, has_ignored) = _assign_args(gts, gt_mask, anchors, inside, ignored)
    grid = (triton.cdiv(N, ASSIGN_BLOCK), B)
    max_ov = torch.empty(B, N, dtype=torch.float32, device=anchors.device)
    argmax_ov = torch.empty(B, N, dtype=torch.long, device=anchors.device)
    block_max = torch.empty(B, G, grid[0], dtype=torch.float32, device=anchors.device)
    block_arg = (  # not written without WANT_ARG
        torch.empty(B, G, grid[0], dtype=torch.long, device=anchors.device)
        if want_gt_argmax
        else argmax_ov
    )
    _assign_max_kernel[grid](
        *args,
        max_ov,
        argmax_ov,
        block_max,
        block_arg,
        N,
        G,
        IOU_EPS,
        HAS_IGNORED=has_ignored,
        WANT_ARG=want_gt_argmax,
        BLOCK=ASSIGN_BLOCK,
        **_EXACT,
    )
    gt_max = block_max.amax(dim=2)
    if not want_gt_argmax:
        return max_ov, argmax_ov, gt_max, None
    first_block = (block_max == gt_max[..., None]).to(torch.int8).argmax(dim=2, keepdim=True)
    gt_argmax = block_arg.gather(2, first_block).squeeze(2)
    return max_ov, argmax_ov, gt_max, gt_argmax


def assign_ties(
    gts: Tensor,
    gt_mask: Tensor,
    anchors: Tensor,
    inside: Tensor,
    ignored: Optional[Tensor],
    gt_max: Tensor,
    thresholds: Tensor,
) -> Tensor:
    """(B, N) long: 1 + the highest eligible gt whose best IoU ``gt_max`` the anchor ties.

    A gt is eligible when real and its best IoU is at least ``thresholds[3]`` (the
    assigner's ``min_pos_iou``; ``thresholds`` is ``assign_finalize``'s, float32 on the
    device).
    """
    args, (B, G, N, has_ignored) = _assign_args(gts, gt_mask, anchors, inside, ignored)
    low = torch.empty(B, N, dtype=torch.long, device=anchors.device)
    _assign_ties_kernel[(triton.cdiv(N, ASSIGN_BLOCK), B)](
        *args,
        gt_max.float().contiguous(),
        thresholds,
        low,
        N,
        G,
        IOU_EPS,
        HAS_IGNORED=has_ignored,
        BLOCK=ASSIGN_BLOCK,
        **_EXACT,
    )
    return low


def assign_finalize(
    max_ov: Tensor,
    argmax_ov: Tensor,
    low: Optional[Tensor],
    inside: Tensor,
    has_gt: Tensor,
    gt_labels: Tensor,
    thresholds: Tensor,
) -> Tuple[Tensor, Tensor, Tensor]:
    """``iou.finalize_assignment`` in one launch (the torch version is some 25 ops eagerly),
    written over its inputs: ``argmax_ov`` becomes gt_inds, ``max_ov`` the overlaps and
    ``low`` (when given) the labels. Each element is read before the same program writes it.

    Args:
        max_ov (Tensor): (B, N) float32, each anchor's best IoU.
        argmax_ov (Tensor): (B, N) long, its gt.
        low (Tensor, optional): (B, N) long, low-quality matches (1-based gt, 0: none).
        inside (Tensor): (B, N) bool. has_gt (Tensor): (B, 1) bool.
        gt_labels (Tensor): (B, G) long.
        thresholds (Tensor): float32 on the device: lo, hi (negatives), the positive
            threshold (and min_pos_iou, read by ``assign_ties``).

    Returns:
        tuple[Tensor, Tensor, Tensor]: gt_inds (B, N) long, max_overlaps (B, N) float32
        (0 for images without gts) and labels (B, N) long (-1 unless positive).
    """
    B, N = max_ov.shape
    for name, t, dtype in (('max_ov', max_ov, torch.float32), ('argmax_ov', argmax_ov, torch.long)):
        if t.dtype != dtype or not t.is_contiguous():
            raise ValueError(f'{name} must be contiguous {dtype}, got {t.dtype}')
    labels = torch.empty_like(argmax_ov) if low is None else low.contiguous()
    _assign_finalize_kernel[(triton.cdiv(N, ASSIGN_BLOCK), B)](
        max_ov,
        argmax_ov,
        labels,  # the low-quality matches, when there are: read, then overwritten
        inside.contiguous(),
        has_gt.contiguous(),
        gt_labels.contiguous(),
        thresholds,
        argmax_ov,
        max_ov,
        labels,
        N,
        gt_labels.size(1),
        HAS_LOW=low is not None,
        BLOCK=ASSIGN_BLOCK,
        **_EXACT,
    )
    return argmax_ov, max_ov, labels


def softmax_ce_forward(x4: Tensor, labels4: Tensor) -> Tuple[Tensor, Tensor]:
    """Cross-entropy over the class axis of a level map.

    Args:
        x4 (Tensor): (B, A, C1, S) logits. labels4 (Tensor): (B, A, S) long in [0, C1).

    Returns:
        tuple[Tensor, Tensor]: log-sum-exp and cross-entropy, each (B, A, S) float32.
    """
    B, A, C1, S = x4.shape
    x = x4.contiguous()
    lab = labels4.contiguous()
    lse = torch.empty(B, A, S, dtype=torch.float32, device=x.device)
    ce = torch.empty_like(lse)
    grid = (triton.cdiv(S, SOFTMAX_BLOCK_S), B * A)
    _softmax_ce_fwd_kernel[grid](
        x,
        lab,
        lse,
        ce,
        C1,
        S,
        C1_P2=triton.next_power_of_2(C1),
        BLOCK_S=SOFTMAX_BLOCK_S,
        **_FUSED,
    )
    return lse, ce


def softmax_ce_backward(x4: Tensor, labels4: Tensor, lse: Tensor, coef: Tensor) -> Tensor:
    """Gradient ``coef * (softmax(x) - onehot(label))`` in the map's layout and dtype.

    Args:
        x4 (Tensor): (B, A, C1, S). labels4, lse, coef (Tensor): (B, A, S).

    Returns:
        Tensor: (B, A, C1, S).
    """
    B, A, C1, S = x4.shape
    x = x4.contiguous()
    grad = torch.empty_like(x)
    grid = (triton.cdiv(S, SOFTMAX_BLOCK_S), B * A)
    _softmax_ce_bwd_kernel[grid](
        x,
        labels4.contiguous(),
        lse.contiguous(),
        coef.float().contiguous(),
        grad,
        C1,
        S,
        C1_P2=triton.next_power_of_2(C1),
        BLOCK_S=SOFTMAX_BLOCK_S,
        **_FUSED,
    )
    return grad
