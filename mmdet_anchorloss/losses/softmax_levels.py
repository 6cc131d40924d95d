"""Softmax cross-entropy per anchor, straight from multi-level prediction maps.

Each level's map (B, A * (C + 1), H, W) is read in place as (B, A, C + 1, H * W): the
log-sum-exp runs over the class axis without the permute / concatenate copy of all logits
that upstream makes, and the gradient comes back in the map's own layout.
"""

from typing import Sequence

import torch
from torch import Tensor

from .sigmoid_kernels import _anchor_layout, _as_4d


def softmax_cross_entropy_rows(levels: Sequence[Tensor], num_base_priors: Sequence[int],
                               labels: Tensor) -> Tensor:
    """``F.cross_entropy(scores, labels, reduction='none')`` for every anchor.

    Args:
        levels (Sequence[Tensor]): L maps (B, A_l * (C + 1), H_l, W_l) of logits.
        num_base_priors (Sequence[int]): A_l per level.
        labels (Tensor): (B, N) long in [0, C].

    Returns:
        Tensor: (B, N) float, anchors ordered (level, y, x, anchor) as upstream.
    """
    rows = []
    start = 0
    for x, a in zip(levels, num_base_priors):  # levels differ in shape; no host sync
        x4 = _as_4d(x, a)  # (B, A, C + 1, S)
        B, A, _, S = x4.shape
        lab = _anchor_layout(labels[:, start:start + A * S], x4.shape)  # (B, A, 1, S)
        ce = torch.logsumexp(x4, dim=2) - x4.gather(2, lab).squeeze(2)  # (B, A, S)
        rows.append(ce.transpose(1, 2).reshape(B, -1))
        start += A * S
    return torch.cat(rows, dim=1)
