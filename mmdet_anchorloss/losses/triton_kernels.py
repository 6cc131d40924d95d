"""Hand-written Triton kernels for the full-size classification passes on CUDA.

Why not the compiled graph: inductor turns ``_loss_and_grad``'s sum over a (B, A, C, S)
map into a reduction kernel whose reduction axis is not the contiguous one; on an H100 it
ran at about 70 GB/s. These kernels instead walk each map along its contiguous H x W axis:
every program reads a block of logits once, writes their gradient once, and leaves one
partial sum; a cheap ``sum`` over the partials finishes the total.

- ``sigmoid_level_loss``: sigmoid focal / binary cross-entropy of one level map, the target
  of each entry (1 where the class is the anchor's label) decided in the kernel from the
  (B, N) labels, so nothing is gathered or corrected afterwards. Half-precision maps are
  read as half, computed in float32 and the gradient is written in the map's dtype.
- ``softmax_ce_forward`` / ``softmax_ce_backward``: cross-entropy over the class axis of a
  (B, A, C + 1, S) map, tiles coalesced along S; the backward recomputes the softmax from
  the saved log-sum-exp instead of storing probabilities.

Triton is optional (``pip install triton``, or the ``triton`` extra); without it, or on
CPU, the callers use the compiled / eager torch kernels. With ``TRITON_INTERPRET=1`` set
before this module is imported, the kernels run on CPU tensors through Triton's
interpreter: that is how the tests check their numbers without a GPU. The module is
imported on first use on CUDA (``sigmoid_kernels.triton_module``), never at package import.
"""

from typing import Optional, Tuple

import torch
from torch import Tensor

try:  # optional dependency
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is missing
    triton = None
    tl = None

SIGMOID_BLOCK_S = 1024  # locations per program of the per-level kernel (one map row)
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
    def _sigmoid_level_kernel(
        x_ptr,
        coef_ptr,
        label_ptr,
        grad_ptr,
        partial_ptr,
        S,
        N,
        level_start,
        gamma,
        alpha_pos,
        alpha_neg,
        A: tl.constexpr,
        C: tl.constexpr,
        GAMMA_MODE: tl.constexpr,
        WANT_GRAD: tl.constexpr,
        BLOCK_S: tl.constexpr,
    ):
        """One row (b, a, c) of a level map, BLOCK_S locations: target 0 or 1 by label."""
        row = tl.program_id(1)  # (b * A + a) * C + c
        c = row % C
        a = (row // C) % A
        b = row // (C * A)
        s = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
        mask = s < S
        offs = row.to(tl.int64) * S + s
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        anchor = b.to(tl.int64) * N + level_start + s * A + a  # (b, n), n in mmdet's order
        coef = tl.load(coef_ptr + anchor, mask=mask, other=0.0)
        label = tl.load(label_ptr + anchor, mask=mask, other=-1)
        # sigmoid and softplus of x and -x from one exp; log1p(e) without libdevice as
        # log(u) * e / (u - 1) (Goldberg), exact where u rounds to 1 (e tiny)
        e = tl.exp(-tl.abs(x))
        u = 1.0 + e
        inv = 1.0 / u
        lg = tl.where(u == 1.0, e, tl.log(u) * (e / tl.where(u == 1.0, 1.0, u - 1.0)))
        pos_x = x >= 0
        p = tl.where(pos_x, inv, e * inv)  # sigmoid(x)
        q = tl.where(pos_x, e * inv, inv)  # sigmoid(-x)
        sp = tl.maximum(x, 0.0) + lg  # softplus(x)
        spn = tl.maximum(-x, 0.0) + lg  # softplus(-x)
        target = label == c
        # target 1: alpha_pos q^g softplus(-x); target 0: alpha_neg p^g softplus(x)
        base = tl.where(target, q, p)
        soft = tl.where(target, spn, sp)
        alpha = tl.where(target, alpha_pos, alpha_neg)
        pg = _power(base, gamma, GAMMA_MODE)
        loss = alpha * pg * soft * coef
        tl.store(
            partial_ptr + tl.program_id(1) * tl.num_programs(0) + tl.program_id(0),
            tl.sum(tl.where(mask, loss, 0.0), axis=0),
        )
        if WANT_GRAD:
            # d/dx: target 0: +alpha p^g (g (1-p) sp + p); target 1: -alpha q^g (g (1-q) spn + q)
            sign = tl.where(target, -1.0, 1.0)
            grad = coef * sign * alpha * pg * (gamma * (1.0 - base) * soft + base)
            tl.store(grad_ptr + offs, grad.to(grad_ptr.dtype.element_ty), mask=mask)

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
) -> Tuple[Tensor, Optional[Tensor]]:
    """Sigmoid focal / BCE loss of one level map, targets from the labels, in one pass.

    Every logit is read once and its gradient written once; the per-anchor weight and label
    are read from the (B, N) tensors of all levels in mmdet's anchor order, so nothing is
    permuted, copied or gathered, and no positive needs correcting afterwards.

    Args:
        x (Tensor): (B, A * C, H, W) logits of the level (float32, float16 or bfloat16).
        coef (Tensor): (B, N) float32, per-anchor weight times the loss scale, all levels.
        labels (Tensor): (B, N) long in [0, C]; C is background.
        level_start (int): index of this level's first anchor in N.
        num_base (int): A, anchors per location.
        gamma, alpha_pos, alpha_neg (float): focal parameters (0, 1, 1 for BCE).
        want_grad (bool): also write the gradient.

    Returns:
        tuple[Tensor, Tensor | None]: () float32 total; (B, A * C, H, W) gradient in ``x``'s
        dtype, or None.
    """
    B, AC, H, W = x.shape
    S = H * W
    x = x.contiguous()
    grid = (triton.cdiv(S, SIGMOID_BLOCK_S), B * AC)
    partial = torch.empty(grid[0] * grid[1], dtype=torch.float32, device=x.device)
    grad = torch.empty_like(x) if want_grad else partial
    _sigmoid_level_kernel[grid](
        x,
        coef,
        labels,
        grad,
        partial,
        S,
        coef.size(1),
        level_start,
        float(gamma),
        float(alpha_pos),
        float(alpha_neg),
        A=num_base,
        C=AC // num_base,
        GAMMA_MODE=_gamma_mode(float(gamma)),
        WANT_GRAD=want_grad,
        BLOCK_S=SIGMOID_BLOCK_S,
    )
    return partial.sum(), (grad if want_grad else None)


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
        x, lab, lse, ce, C1, S, C1_P2=triton.next_power_of_2(C1), BLOCK_S=SOFTMAX_BLOCK_S
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
    )
    return grad
