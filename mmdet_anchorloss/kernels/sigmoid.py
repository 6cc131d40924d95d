"""Sigmoid focal / binary cross-entropy over class maps, with an analytic gradient.

Most entries of a sigmoid classification target are 0 (background for that class). The
loss of a target-0 entry is ``alpha_neg * p**gamma * softplus(x)`` with p = sigmoid(x); the
few target-1 entries (one per positive anchor) are corrected on a gathered (P,) vector. So
the full-size work is one fused pass for the forward (a per-anchor row sum) and one for the
backward (the gradient, written straight into the prediction map's own layout), with no
one-hot target and no full-size temporaries when ``torch.compile`` is available. Without a
compiler the same functions run eagerly over bounded chunks.

Focal loss: gamma, alpha_pos = alpha, alpha_neg = 1 - alpha (mmdet's ``FocalLoss``).
Binary cross-entropy: gamma = 0, alpha_pos = alpha_neg = 1 (``CrossEntropyLoss``
with ``use_sigmoid=True``).
"""

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..core.layout import anchor_planes, class_planes, map_index, take
from .backends import triton_module, use_triton
from .compile import kernel
from .sync_policy import avoid_host_sync

_EAGER_CHUNK = 1 << 22  # elements per eager chunk: temporaries stay a few MB


def _sigmoid_softplus(x: Tensor):
    """sigmoid(x) and softplus(x) from one exp: e = exp(-|x|)."""
    e = torch.exp(-x.abs())
    inv = 1 / (1 + e)
    p = torch.where(x >= 0, inv, e * inv)
    sp = torch.clamp(x, min=0) + torch.log1p(e)
    return p, sp


def _pow(p: Tensor, gamma: float) -> Tensor:
    return p * p if gamma == 2.0 else p.pow(gamma)


def _neg_loss(x: Tensor, gamma: float, alpha_neg: float) -> Tensor:
    """Loss of a target-0 entry: alpha_neg * p**gamma * softplus(x)."""
    p, sp = _sigmoid_softplus(x)
    return alpha_neg * _pow(p, gamma) * sp


def _neg_grad(x: Tensor, gamma: float, alpha_neg: float) -> Tensor:
    """d/dx of ``_neg_loss``: alpha_neg * p**gamma * (gamma * (1 - p) * softplus(x) + p)."""
    p, sp = _sigmoid_softplus(x)
    return alpha_neg * _pow(p, gamma) * (gamma * (1 - p) * sp + p)


def _pos_loss(x: Tensor, gamma: float, alpha_pos: float) -> Tensor:
    """Loss of a target-1 entry: alpha_pos * (1 - p)**gamma * softplus(-x)."""
    q, sp = _sigmoid_softplus(-x)
    return alpha_pos * _pow(q, gamma) * sp


def _pos_grad(x: Tensor, gamma: float, alpha_pos: float) -> Tensor:
    """d/dx of ``_pos_loss``."""
    q, sp = _sigmoid_softplus(-x)
    return -alpha_pos * _pow(q, gamma) * (gamma * (1 - q) * sp + q)


def _loss_and_grad(
    x4: Tensor, coef4: Tensor, gamma: float, alpha_neg: float
) -> Tuple[Tensor, Tensor]:
    """One pass: weighted target-0 loss total and its gradient.

    Args:
        x4 (Tensor): (B, A, C, S) logits. coef4 (Tensor): (B, A, 1, S) per-anchor weight
            times the loss scale.

    Returns:
        tuple[Tensor, Tensor]: () total of coef4 * loss; (B, A, C, S) its gradient.
    """
    x = x4.float()  # half-precision maps are computed in float32, as mmcv's kernel does
    p, sp = _sigmoid_softplus(x)
    pg = _pow(p, gamma)
    total = (alpha_neg * pg * sp * coef4).sum()
    grad = coef4 * (alpha_neg * pg * (gamma * (1 - p) * sp + p))
    return total, grad.to(x4.dtype)


def _loss_only(x4: Tensor, coef4: Tensor, gamma: float, alpha_neg: float) -> Tensor:
    """() total of coef4 * target-0 loss, for calls that need no gradient."""
    return (_neg_loss(x4.float(), gamma, alpha_neg) * coef4).sum()


def _chunks(x4: Tensor, coef4: Tensor):
    """Split (B, A, C, S) and (B, A, 1, S) into aligned chunks of about _EAGER_CHUNK items."""
    B, A, C, S = x4.shape
    step = max(1, _EAGER_CHUNK // max(1, C * S))
    return zip(
        x4.reshape(1, B * A, C, S).split(step, dim=1),
        coef4.reshape(1, B * A, 1, S).split(step, dim=1),
    )


def _eager_loss_and_grad(x4, coef4, gamma, alpha_neg):
    grad = torch.empty_like(x4)
    total = x4.new_zeros(())
    outs = grad.view(1, -1, *x4.shape[2:]).split(
        max(1, _EAGER_CHUNK // max(1, x4.shape[2] * x4.shape[3])), dim=1
    )
    for out, (x, c) in zip(outs, _chunks(x4, coef4)):
        t, g = _loss_and_grad(x, c, gamma, alpha_neg)
        total = total + t
        out.copy_(g)
    return total, grad


def _eager_loss_only(x4, coef4, gamma, alpha_neg):
    return sum(
        (_loss_only(x, c, gamma, alpha_neg) for x, c in _chunks(x4, coef4)), x4.new_zeros(())
    )


# The full-size torch kernels, compiled where possible (see ``..compile``).
loss_and_grad_kernel = kernel(_loss_and_grad, eager=_eager_loss_and_grad)
loss_only_kernel = kernel(_loss_only, eager=_eager_loss_only)


def _triton_levels(labels, weights, scale, params, num_base_priors, levels, grad_scales=None):
    """Per-level totals, or gradients scaled by ``grad_scales`` (L,), through
    ``triton_kernels.sigmoid_level_loss``: one kernel per level. ``weights`` (B, N) and the
    one-element ``scale`` are multiplied as the kernel reads them."""
    kernels = triton_module()
    want_grad = grad_scales is not None
    tiles = max(kernels.sigmoid_tiles(x, a) for x, a in zip(levels, num_base_priors))
    # the forward's per-tile sums, one zero-padded row per level, summed at once; the
    # backward makes none
    partials = None if want_grad else weights.new_zeros(len(levels), tiles)
    grads, start = [], 0
    for lvl, (x, a) in enumerate(zip(levels, num_base_priors)):
        _, grad = kernels.sigmoid_level_loss(
            x,
            weights,
            labels,
            start,
            a,
            *params,
            want_grad=want_grad,
            grad_scale=grad_scales,
            scale_index=lvl,
            want_loss=not want_grad,
            partial=partials,
            partial_offset=lvl * tiles,
            coef_scale=scale,
        )
        grads.append(grad)
        start += a * x.size(2) * x.size(3)
    return (None if want_grad else partials.sum(dim=1)), grads


class SigmoidLevelsLoss(torch.autograd.Function):
    """Per-level totals (L,) of a scaled, weighted sigmoid focal / BCE loss.

    Torch kernels (CPU, or CUDA without Triton): the forward computes the loss and, when a
    gradient is needed, the gradient too, in the same pass (the transcendental work is done
    once); the backward only scales it by the incoming per-level gradient, and on CPU skips
    even that when it is exactly 1 (the usual case: mmengine sums the loss terms). Triton
    kernels (CUDA): the forward computes the loss only, and the backward computes the
    gradient, already scaled, in one pass (see ``forward``).
    """

    @staticmethod
    def forward(
        ctx,
        labels: Tensor,
        weights: Tensor,
        scale: Tensor,
        params: Tuple[float, float, float],
        num_base_priors: Sequence[int],
        positives: Optional[Tuple[Tensor, Tensor]],
        *levels: Tensor,
    ) -> Tensor:
        gamma, alpha_pos, alpha_neg = params
        want_grad = any(ctx.needs_input_grad[6:])
        if use_triton(levels[0]):
            # Targets read from the labels (no positive to correct). The forward reads each
            # logit once for the loss; the backward reads it once more and writes the
            # gradient once, scaled by the incoming gradient in the same pass: on CUDA that
            # scale cannot be read without a host sync, so it is not known here.
            weights, labels = weights.float().contiguous(), labels.contiguous()
            scale = scale.float()  # 0-d, read by the kernels as they go
            ctx.triton = (params, list(num_base_priors))
            if want_grad:
                ctx.save_for_backward(weights, scale, labels, *levels)
            return _triton_levels(labels, weights, scale, params, num_base_priors, levels)[0]
        ctx.triton = None
        x4s = [class_planes(x, a) for x, a in zip(levels, num_base_priors)]
        shapes = [tuple(x.shape) for x in x4s]
        level_sizes = [s[1] * s[3] for s in shapes]
        coef = (weights * scale).float()  # (B, N)
        totals, grads = [], []
        # One fused kernel per level (levels differ in shape; no host sync between them).
        for x4, c in zip(x4s, coef.split(level_sizes, dim=1)):
            c4 = anchor_planes(c, x4.shape).contiguous()  # so the gradient comes out contiguous
            if want_grad:
                total, grad = loss_and_grad_kernel(x4, c4, gamma, alpha_neg)
                grads.append(grad.contiguous())  # a no-op unless the compiler chose strides
            else:
                total = loss_only_kernel(x4, c4, gamma, alpha_neg)
            totals.append(total)
        totals = torch.stack(totals).float()
        # target-1 entries: swap the target-0 term for the target-1 term, on (P,) values
        if positives is None:  # the caller did not hand them over: find them (a host sync)
            positives = (labels < shapes[0][2]).nonzero(as_tuple=True)
        pos_b, pos_n = positives
        index = map_index(levels, num_base_priors, pos_b, pos_n, labels[pos_b, pos_n][:, None])
        level, flat = index.level, index.flat[:, 0]
        x_pos = take(levels, index)[:, 0].float()
        c_pos = coef[pos_b, pos_n]
        corr = (_pos_loss(x_pos, gamma, alpha_pos) - _neg_loss(x_pos, gamma, alpha_neg)) * c_pos
        totals = totals.index_add(0, level, corr.float())
        if want_grad:
            g_corr = _pos_grad(x_pos, gamma, alpha_pos) - _neg_grad(x_pos, gamma, alpha_neg)
            g_corr = g_corr * c_pos
            for lvl, g in enumerate(grads):
                on = level == lvl
                g.view(-1).index_put_(
                    (flat.where(on, 0),), (g_corr * on).to(g.dtype), accumulate=True
                )
            ctx.grads = [g.view_as(x) for g, x in zip(grads, levels)]
        return totals

    @staticmethod
    def backward(ctx, grad_totals: Tensor):
        if ctx.triton is not None:
            weights, scale, labels, *levels = ctx.saved_tensors
            params, num_base_priors = ctx.triton
            scales = grad_totals.float().contiguous()
            _, grads = _triton_levels(
                labels, weights, scale, params, num_base_priors, levels, scales
            )
            return (None, None, None, None, None, None, *grads)
        grads = ctx.__dict__.pop('grads', None)  # handed over, so autograd can keep them
        if grads is None:
            raise RuntimeError(
                'SigmoidLevelsLoss: backward through the same graph twice '
                '(retain_graph) is not supported'
            )
        if avoid_host_sync(grad_totals) or not bool((grad_totals == 1).all()):
            grads = [g.mul_(s.to(g.dtype)) for g, s in zip(grads, grad_totals)]  # we own g
        return (None, None, None, None, None, None, *grads)


def sigmoid_level_losses(
    levels: Sequence[Tensor],
    num_base_priors: Sequence[int],
    labels: Tensor,
    weights: Tensor,
    scale,
    gamma: float,
    alpha_pos: float,
    alpha_neg: float,
    positives: Optional[Tuple[Tensor, Tensor]] = None,
) -> Tensor:
    """Sigmoid focal / BCE loss of multi-level maps, summed per level.

    Args:
        levels (Sequence[Tensor]): L maps (B, A_l * C, H_l, W_l) of logits.
        num_base_priors (Sequence[int]): A_l per level.
        labels (Tensor): (B, N) long in [0, C]; C is background (all targets 0).
        weights (Tensor): (B, N) float per-anchor weights.
        scale (Tensor | float): multiplies every term, e.g. loss_weight / (avg_factor + eps).
        positives (tuple[Tensor, Tensor], optional): (P,) image and anchor index of the
            labels < C, in row-major order, when the caller has them (spares a host sync).

    Returns:
        Tensor: (L,) float; entry l is scale * sum over anchors n of level l and classes c
        of weights[b, n] * loss(x[b, n, c], target[b, n, c]) (anchors ordered level, y, x,
        anchor, as upstream).
    """
    if isinstance(scale, Tensor):
        scale = scale.to(labels.device, torch.float32)
    else:  # a fill, not a copy from the host
        scale = torch.full((), float(scale), dtype=torch.float32, device=labels.device)
    return SigmoidLevelsLoss.apply(
        labels,
        weights.float(),
        scale,
        (float(gamma), float(alpha_pos), float(alpha_neg)),
        list(num_base_priors),
        positives,
        *levels,
    )
