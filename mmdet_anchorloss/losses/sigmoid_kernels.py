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

import os
import warnings
from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

_EAGER_CHUNK = 1 << 22  # elements per eager chunk: temporaries stay a few MB


def _neg_loss(x: Tensor, gamma: float, alpha_neg: float) -> Tensor:
    p = torch.sigmoid(x)
    return alpha_neg * p.pow(gamma) * F.softplus(x)


def _neg_grad(x: Tensor, gamma: float, alpha_neg: float) -> Tensor:
    p = torch.sigmoid(x)
    return alpha_neg * p.pow(gamma) * (gamma * (1 - p) * F.softplus(x) + p)


def _pos_loss(x: Tensor, gamma: float, alpha_pos: float) -> Tensor:
    q = torch.sigmoid(-x)
    return alpha_pos * q.pow(gamma) * F.softplus(-x)


def _pos_grad(x: Tensor, gamma: float, alpha_pos: float) -> Tensor:
    q = torch.sigmoid(-x)
    return -alpha_pos * q.pow(gamma) * (gamma * (1 - q) * F.softplus(-x) + q)


def _rowsum(x4: Tensor, gamma: float, alpha_neg: float) -> Tensor:
    """(B, A, C, S) logits -> (B, A, S) sum over classes of the target-0 loss."""
    return _neg_loss(x4, gamma, alpha_neg).sum(dim=2)


def _grad(x4: Tensor, coef: Tensor, gamma: float, alpha_neg: float) -> Tensor:
    """(B, A, C, S) logits, (B, A, 1, S) row coefficients -> (B, A, C, S) gradient."""
    return coef * _neg_grad(x4, gamma, alpha_neg)


def _eager_rowsum(x4: Tensor, gamma: float, alpha_neg: float) -> Tensor:
    B, A, C, S = x4.shape
    flat = x4.reshape(B * A, C, S)
    step = max(1, _EAGER_CHUNK // max(1, C * S))
    out = [_rowsum(c.unsqueeze(0), gamma, alpha_neg)[0] for c in flat.split(step)]
    return torch.cat(out).view(B, A, S)


def _eager_grad(x4: Tensor, coef: Tensor, gamma: float, alpha_neg: float) -> Tensor:
    B, A, C, S = x4.shape
    out = torch.empty_like(x4)
    step = max(1, _EAGER_CHUNK // max(1, C * S))
    for o, c, k in zip(out.view(B * A, C, S).split(step), x4.reshape(B * A, C, S).split(step),
                       coef.reshape(B * A, 1, S).split(step)):
        torch.mul(k, _neg_grad(c, gamma, alpha_neg), out=o)
    return out


class _Kernels:
    """Chooses compiled or eager kernels once per process.

    ``MMDET_ANCHORLOSS_COMPILE``: ``auto`` (default: compile where a compiler works, else
    eager), ``1`` (compile, raise if it fails), ``0`` (eager).
    """

    def __init__(self) -> None:
        self.mode = os.environ.get('MMDET_ANCHORLOSS_COMPILE', 'auto').lower()
        self._compiled = None
        self.failed = False

    def _get_compiled(self):
        if self._compiled is None:
            opts = dict(dynamic=True, fullgraph=True)
            self._compiled = (torch.compile(_rowsum, **opts), torch.compile(_grad, **opts))
        return self._compiled

    def use_compiled(self, x: Tensor) -> bool:
        if self.mode in ('0', 'false', 'off', 'eager') or self.failed:
            return False
        if torch.compiler.is_compiling():
            return False
        return True

    def run(self, which: int, eager, *args):
        if self.use_compiled(args[0]):
            try:
                return self._get_compiled()[which](*args)
            except Exception as err:  # no C compiler / Triton: fall back, say so once
                if self.mode in ('1', 'true', 'on'):
                    raise
                self.failed = True
                warnings.warn(f'mmdet_anchorloss: torch.compile unavailable ({type(err).__name__}:'
                              f' {str(err).splitlines()[0][:200]}); using eager kernels')
        return eager(*args)

    def rowsum(self, x4, gamma, alpha_neg):
        return self.run(0, _eager_rowsum, x4, gamma, alpha_neg)

    def grad(self, x4, coef, gamma, alpha_neg):
        return self.run(1, _eager_grad, x4, coef, gamma, alpha_neg)


KERNELS = _Kernels()


def _as_4d(x: Tensor, num_base: int) -> Tensor:
    """(B, A*C, H, W) prediction map -> (B, A, C, H*W) view."""
    B, AC, H, W = x.shape
    return x.contiguous().view(B, num_base, AC // num_base, H * W)


def _positive_flat_index(labels: Tensor, level_sizes: Sequence[int],
                         shapes: Sequence[Tuple[int, int, int, int]]) -> Tuple[Tensor, Tensor,
                                                                                 Tensor, Tensor]:
    """Where the target-1 entries lie.

    Returns:
        tuple: pos_b, pos_n (P,) long; level (P,) long; flat (P,) long index into that
        level's (B, A, C, S) map. Positives are labels < C.
    """
    C = shapes[0][2]
    pos_b, pos_n = (labels < C).nonzero(as_tuple=True)
    bounds = torch.tensor(list(level_sizes), device=labels.device).cumsum(0)
    level = torch.bucketize(pos_n, bounds, right=True)
    starts = torch.cat([bounds.new_zeros(1), bounds[:-1]])
    local = pos_n - starts[level]
    A = torch.tensor([s[1] for s in shapes], device=labels.device)[level]
    S = torch.tensor([s[3] for s in shapes], device=labels.device)[level]
    s_idx, a_idx = local // A, local % A
    c_idx = labels[pos_b, pos_n]
    flat = ((pos_b * A + a_idx) * C + c_idx) * S + s_idx
    return pos_b, pos_n, level, flat


class SigmoidLevelsLoss(torch.autograd.Function):
    """Row losses (B, N) of sigmoid focal / BCE over multi-level prediction maps."""

    @staticmethod
    def forward(ctx, labels: Tensor, weights: Tensor, params: Tuple[float, float, float],
                num_base_priors: Sequence[int], *levels: Tensor) -> Tensor:
        gamma, alpha_pos, alpha_neg = params
        x4s = [_as_4d(x, a) for x, a in zip(levels, num_base_priors)]
        shapes = [tuple(x.shape) for x in x4s]
        level_sizes = [s[1] * s[3] for s in shapes]
        # One fused kernel per level (levels differ in shape; no host sync between them).
        rows = torch.cat([KERNELS.rowsum(x4, gamma, alpha_neg).transpose(1, 2).reshape(
            x4.size(0), -1) for x4 in x4s], dim=1)
        pos_b, pos_n, level, flat = _positive_flat_index(labels, level_sizes, shapes)
        x_pos = _take_levels(x4s, level, flat)
        rows = rows.float()
        corr = _pos_loss(x_pos, gamma, alpha_pos) - _neg_loss(x_pos, gamma, alpha_neg)
        rows.index_put_((pos_b, pos_n), corr.to(rows.dtype), accumulate=True)
        ctx.save_for_backward(weights, pos_b, pos_n, level, flat, x_pos, *levels)
        ctx.params = params
        ctx.num_base_priors = list(num_base_priors)
        ctx.level_sizes = level_sizes
        return rows * weights

    @staticmethod
    def backward(ctx, grad_rows: Tensor):
        weights, pos_b, pos_n, level, flat, x_pos, *levels = ctx.saved_tensors
        gamma, alpha_pos, alpha_neg = ctx.params
        coef = (grad_rows * weights).to(levels[0].dtype)  # (B, N)
        grads = []
        for lvl, (x, a, coef_l) in enumerate(
                zip(levels, ctx.num_base_priors, coef.split(ctx.level_sizes, dim=1))):
            x4 = _as_4d(x, a)
            B, A, C, S = x4.shape
            c4 = coef_l.reshape(B, S, A).transpose(1, 2).unsqueeze(2)  # (B, A, 1, S)
            g = KERNELS.grad(x4, c4, gamma, alpha_neg).contiguous()
            on_level = level == lvl
            corr = (_pos_grad(x_pos, gamma, alpha_pos) - _neg_grad(x_pos, gamma, alpha_neg))
            corr = corr * coef[pos_b, pos_n] * on_level
            g.view(-1).index_put_((flat.where(on_level, 0),), corr.to(g.dtype), accumulate=True)
            grads.append(g.view_as(x))
        return (None, None, None, None, *grads)


def _take_levels(x4s: List[Tensor], level: Tensor, flat: Tensor) -> Tensor:
    """x at ``flat`` of level ``level`` for each of P entries (no host sync)."""
    out = x4s[0].new_zeros(flat.shape)
    for lvl, x4 in enumerate(x4s):
        on = level == lvl
        out = torch.where(on, x4.reshape(-1).take(flat.where(on, 0)), out)
    return out


def sigmoid_level_losses(levels: Sequence[Tensor], num_base_priors: Sequence[int],
                         labels: Tensor, weights: Tensor, gamma: float, alpha_pos: float,
                         alpha_neg: float) -> Tensor:
    """Weighted per-anchor sigmoid focal / BCE loss over multi-level maps.

    Args:
        levels (Sequence[Tensor]): L maps (B, A_l * C, H_l, W_l) of logits.
        num_base_priors (Sequence[int]): A_l per level.
        labels (Tensor): (B, N) long in [0, C]; C is background (all targets 0).
        weights (Tensor): (B, N) float per-anchor weights.

    Returns:
        Tensor: (B, N) float; row n of image b is weights[b, n] times the loss summed over
        the C classes of anchor n (anchors ordered level, y, x, anchor, as upstream).
    """
    return SigmoidLevelsLoss.apply(labels, weights.float(), (float(gamma), float(alpha_pos),
                                   float(alpha_neg)), list(num_base_priors), *levels)
