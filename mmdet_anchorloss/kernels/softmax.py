"""Softmax cross-entropy per anchor, straight from multi-level prediction maps.

Each level's map (B, A * (C + 1), H, W) is read in place as (B, A, C + 1, H * W): the
log-sum-exp runs over the class axis without the permute / concatenate copy of all logits
that upstream makes. The forward pass keeps the softmax probabilities (one fused pass,
compiled where possible); the backward turns them into the gradient in place,
``coef * (softmax - onehot)``, in the map's own layout.
"""

from typing import Sequence, Tuple

import torch
from torch import Tensor

from ..core.layout import anchor_planes, class_planes
from .backends import triton_module, use_triton
from .compile import kernel


def _lse_and_prob(x4: Tensor) -> Tuple[Tensor, Tensor]:
    """(B, A, C1, S) logits -> log-sum-exp over classes (B, A, S), softmax (B, A, C1, S)."""
    x = x4.float()
    m = x.amax(dim=2, keepdim=True)
    e = torch.exp(x - m)
    s = e.sum(dim=2, keepdim=True)
    return (m + torch.log(s)).squeeze(2), e / s


def _lse_only(x4: Tensor) -> Tensor:
    return torch.logsumexp(x4.float(), dim=2)


lse_and_prob_kernel = kernel(_lse_and_prob)
lse_only_kernel = kernel(_lse_only)


class SoftmaxLevelsCE(torch.autograd.Function):
    """(B, N) cross-entropy of every anchor over multi-level maps (see module docstring).

    On CUDA with Triton (``triton_kernels``), the forward keeps only the log-sum-exp and the
    backward recomputes the softmax from it, reading each logit once per pass.
    """

    @staticmethod
    def forward(ctx, labels: Tensor, num_base_priors: Sequence[int], *levels: Tensor) -> Tensor:
        want_grad = any(ctx.needs_input_grad[2:])
        rows, saved, labs = [], [], []
        triton = use_triton(levels[0])
        start = 0
        for x, a in zip(levels, num_base_priors):  # levels differ in shape; no host sync
            x4 = class_planes(x, a)  # (B, A, C1, S)
            B, A, _, S = x4.shape
            lab = anchor_planes(labels[:, start : start + A * S], x4.shape)  # (B, A, 1, S)
            if triton:
                lse, ce = triton_module().softmax_ce_forward(x4, lab.squeeze(2))
                saved.append(lse)
            else:
                if want_grad:
                    lse, prob = lse_and_prob_kernel(x4)
                    saved.append(prob.contiguous())
                else:
                    lse = lse_only_kernel(x4)
                ce = lse - x4.gather(2, lab).squeeze(2).float()
            labs.append(lab)
            rows.append(ce.transpose(1, 2).reshape(B, -1))
            start += A * S
        if want_grad:
            ctx.saved, ctx.labs, ctx.triton = saved, labs, triton
            ctx.levels = (
                [class_planes(x, a) for x, a in zip(levels, num_base_priors)] if triton else None
            )
            ctx.dtypes = [x.dtype for x in levels]
            ctx.level_sizes = [lab.shape[1] * lab.shape[3] for lab in labs]
            ctx.shapes = [x.shape for x in levels]
        return torch.cat(rows, dim=1)

    @staticmethod
    def backward(ctx, grad_rows: Tensor):
        saved, labs = ctx.__dict__.pop('saved', None), ctx.labs
        if saved is None:
            raise RuntimeError(
                'SoftmaxLevelsCE: backward through the same graph twice '
                '(retain_graph) is not supported'
            )
        grads = []
        for i, (keep, lab, dtype, g) in enumerate(
            zip(saved, labs, ctx.dtypes, grad_rows.split(ctx.level_sizes, dim=1))
        ):
            coef = anchor_planes(g.float(), lab.shape)  # (B, A, 1, S)
            if ctx.triton:  # keep: (B, A, S) log-sum-exp
                grad = triton_module().softmax_ce_backward(
                    ctx.levels[i], lab.squeeze(2), keep, coef.squeeze(2)
                )
            else:  # keep: the softmax, ours: the gradient takes its memory
                grad = keep.mul_(coef)
                grad.scatter_add_(2, lab, -coef)
                grad = grad.to(dtype)
            grads.append(grad)
        ctx.levels = None
        return (None, None, *[g.view(shape) for g, shape in zip(grads, ctx.shapes)])


def softmax_cross_entropy_rows(
    levels: Sequence[Tensor], num_base_priors: Sequence[int], labels: Tensor
) -> Tensor:
    """``F.cross_entropy(scores, labels, reduction='none')`` for every anchor.

    Args:
        levels (Sequence[Tensor]): L maps (B, A_l * (C + 1), H_l, W_l) of logits.
        num_base_priors (Sequence[int]): A_l per level.
        labels (Tensor): (B, N) long in [0, C].

    Returns:
        Tensor: (B, N) float, anchors ordered (level, y, x, anchor) as upstream.
    """
    return SoftmaxLevelsCE.apply(labels, list(num_base_priors), *levels)
