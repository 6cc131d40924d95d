"""Fused IoU + reductions for the batched assigner.

``overlap_max`` and ``low_quality_ties`` compute the IoU of padded gts (B, G, 4) with an
anchor chunk (n, 4) with exactly ``bbox_overlaps``'s operations in its order (so the values
are bitwise equal to upstream's), mask it, and reduce it in the same kernel: compiled, no
(B, G, n) tensor is stored. Eagerly, the chunk size bounds the temporaries.
"""

from typing import Optional, Tuple

import torch
from torch import Tensor

from ..compile import MaybeCompiled

EPS = 1e-6  # bbox_overlaps' default


def iou(g: Tensor, a: Tensor) -> Tensor:
    """IoU of broadcastable boxes (..., 4), with ``bbox_overlaps``'s operations in its order."""
    area_g = (g[..., 2] - g[..., 0]) * (g[..., 3] - g[..., 1])
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    w = torch.minimum(g[..., 2], a[..., 2]) - torch.maximum(g[..., 0], a[..., 0])
    h = torch.minimum(g[..., 3], a[..., 3]) - torch.maximum(g[..., 1], a[..., 1])
    overlap = w.clamp(min=0) * h.clamp(min=0)
    union = (area_g + area_a) - overlap
    return overlap / union.clamp(min=EPS)


def masked_iou(
    gts: Tensor, gt_mask: Tensor, anchors: Tensor, inside: Tensor, ignored: Optional[Tensor]
) -> Tensor:
    """IoU (B, G, n) as upstream computes it; padding gts / outside anchors -inf, ignored -1.

    Args:
        gts (Tensor): (B, G, 4). gt_mask (Tensor): (B, G) bool.
        anchors (Tensor): (n, 4). inside (Tensor): (B, n) bool.
        ignored (Tensor, optional): (B, n) bool, anchors covered by an ignore box.
    """
    ov = iou(gts[:, :, None, :], anchors)
    if ignored is not None:
        ov = torch.where(ignored[:, None, :], -1.0, ov)
    valid = gt_mask[:, :, None] & inside[:, None, :]
    return torch.where(valid, ov, float('-inf'))


def _overlap_max(gts, gt_mask, anchors, inside, ignored) -> Tuple[Tensor, ...]:
    ov = masked_iou(gts, gt_mask, anchors, inside, ignored)
    max_ov, argmax_ov = ov.max(dim=1)
    gt_max, gt_argmax = ov.max(dim=2)
    return max_ov, argmax_ov, gt_max, gt_argmax


def _low_quality_ties(gts, gt_mask, anchors, inside, ignored, gt_max, eligible) -> Tensor:
    ov = masked_iou(gts, gt_mask, anchors, inside, ignored)
    tie = (ov == gt_max[:, :, None]) & eligible[:, :, None]
    gt_ids = torch.arange(1, gts.size(1) + 1, device=gts.device).view(1, -1, 1)
    # upstream loops over gts and later gts overwrite earlier ones: highest tied index wins
    return torch.where(tie, gt_ids, 0).amax(dim=1)


def _paired_ties(gts, gt_mask, gt_max, eligible, anchors, ignored, cand_b, cand_n) -> Tensor:
    """``_low_quality_ties`` for K (image, anchor) candidates only: (K,) long."""
    ov = iou(gts[cand_b], anchors[cand_n][:, None, :])  # (K, G)
    if ignored is not None:
        ov = torch.where(ignored[cand_b, cand_n][:, None], -1.0, ov)
    ov = torch.where(gt_mask[cand_b], ov, float('-inf'))
    tie = (ov == gt_max[cand_b]) & eligible[cand_b]
    gt_ids = torch.arange(1, gts.size(1) + 1, device=gts.device)
    return torch.where(tie, gt_ids, 0).amax(dim=1)


overlap_max = MaybeCompiled(_overlap_max, cpu_only=True)
"""(B, n) max IoU and argmax gt per anchor; (B, G) max IoU and argmax anchor per gt."""

low_quality_ties = MaybeCompiled(_low_quality_ties, cpu_only=True)
"""(B, n) long: 1 + highest gt index whose best IoU this anchor ties (0 if none)."""

paired_ties = MaybeCompiled(_paired_ties, cpu_only=True)
"""``low_quality_ties`` restricted to (K,) candidate (image, anchor) pairs."""
