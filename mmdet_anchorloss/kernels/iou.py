"""Fused IoU + reductions for the batched assigner.

The kernels compute the IoU of padded gts (B, G, 4) with anchors (n, 4) with exactly
``bbox_overlaps``'s operations in its order (so the values are bitwise equal to upstream's),
mask it, and reduce it in the same compiled kernel. Boxes go in as separate coordinate
planes (x1, y1, x2, y2), which lets the compiler use contiguous vector loads. Eagerly, the
caller's anchor chunks bound the temporaries.
"""

from typing import Optional, Tuple

import torch
from torch import Tensor

from .compile import kernel
from .sync_policy import device_constant

IOU_EPS = 1e-6  # bbox_overlaps' default


def iou_planes(g: Tuple[Tensor, ...], a: Tuple[Tensor, ...]) -> Tensor:
    """IoU of broadcastable coordinate planes (x1, y1, x2, y2), in ``bbox_overlaps``'s order."""
    gx1, gy1, gx2, gy2 = g
    ax1, ay1, ax2, ay2 = a
    area_g = (gx2 - gx1) * (gy2 - gy1)
    area_a = (ax2 - ax1) * (ay2 - ay1)
    w = torch.minimum(gx2, ax2) - torch.maximum(gx1, ax1)
    h = torch.minimum(gy2, ay2) - torch.maximum(gy1, ay1)
    overlap = w.clamp(min=0) * h.clamp(min=0)
    union = (area_g + area_a) - overlap
    return overlap / union.clamp(min=IOU_EPS)


def _masked(gx1, gy1, gx2, gy2, gt_mask, ax1, ay1, ax2, ay2, inside, ignored) -> Tensor:
    """(B, G, n) IoU; padding gts / outside anchors -inf, ignored anchors -1 (as upstream)."""
    g = tuple(c[:, :, None] for c in (gx1, gy1, gx2, gy2))
    ov = iou_planes(g, (ax1, ay1, ax2, ay2))
    if ignored is not None:
        ov = torch.where(ignored[:, None, :], -1.0, ov)
    valid = gt_mask[:, :, None] & inside[:, None, :]
    return torch.where(valid, ov, float('-inf'))


def _overlap_max(gx1, gy1, gx2, gy2, gt_mask, ax1, ay1, ax2, ay2, inside, ignored):
    ov = _masked(gx1, gy1, gx2, gy2, gt_mask, ax1, ay1, ax2, ay2, inside, ignored)
    max_ov, argmax_ov = ov.max(dim=1)
    gt_max, gt_argmax = ov.max(dim=2)
    return max_ov, argmax_ov, gt_max, gt_argmax


def _low_quality_ties(
    gx1, gy1, gx2, gy2, gt_mask, ax1, ay1, ax2, ay2, inside, ignored, gt_max, eligible
):
    ov = _masked(gx1, gy1, gx2, gy2, gt_mask, ax1, ay1, ax2, ay2, inside, ignored)
    tie = (ov == gt_max[:, :, None]) & eligible[:, :, None]
    gt_ids = torch.arange(1, gx1.size(1) + 1, device=gx1.device).view(1, -1, 1)
    # upstream loops over gts and later gts overwrite earlier ones: highest tied index wins
    return torch.where(tie, gt_ids, 0).amax(dim=1)


def chunk_ties(
    gts: Tensor,
    gt_max: Tensor,
    anchors: Tensor,
    inside: Tensor,
    ignored: Optional[Tensor],
    b: Tensor,
    g: Tensor,
    idx: Tensor,
    valid: Tensor,
) -> Tensor:
    """For M (image, gt) pairs and M rows of anchor indices: where the anchor ties the gt's
    best IoU, the gt's 1-based index, else 0.

    Args:
        gts (Tensor): (B, G, 4). gt_max (Tensor): (B, G). anchors (Tensor): (N, 4).
        inside (Tensor): (B, N) bool. ignored (Tensor, optional): (B, N) bool.
        b, g (Tensor): (M,) long. idx (Tensor): (M, L) long anchor indices; valid (M, L).

    Returns:
        Tensor: (M, L) long.
    """
    box = gts[b, g]  # (M, 4)
    gp = tuple(c[:, None] for c in box.unbind(-1))
    ap = tuple(c[idx] for c in planes(anchors))  # (M, L) each
    ov = iou_planes(gp, ap)
    if ignored is not None:
        ov = torch.where(ignored[b[:, None], idx], -1.0, ov)
    ok = inside[b[:, None], idx] & valid
    tie = ok & (ov == gt_max[b, g][:, None])
    return torch.where(tie, (g + 1)[:, None], 0)


def _finalize(max_ov, argmax_ov, low, inside, has_gt, gt_labels, thresholds):
    """MaxIoUAssigner's steps on (B, N) per-anchor results, fused into one pass.

    Negative if lo <= max IoU < hi; positive (argmax gt) if max IoU >= pos_thr; low-quality
    matches overwrite; images without gts are all negative with IoU 0; anchors upstream
    does not see (outside) are ignored.
    """
    lo, hi, pos_thr = thresholds.unbind()  # float32, as upstream's float compares cast them
    gt_inds = torch.where((max_ov >= lo) & (max_ov < hi), 0, -1)
    gt_inds = torch.where(max_ov >= pos_thr, argmax_ov + 1, gt_inds)
    gt_inds = torch.where(low > 0, low, gt_inds)
    gt_inds = torch.where(has_gt, gt_inds, 0)
    gt_inds = torch.where(inside, gt_inds, -1)
    max_ov = torch.where(has_gt | ~inside, max_ov, 0.0)
    labels = torch.gather(gt_labels, 1, (gt_inds - 1).clamp(min=0))
    return gt_inds, max_ov, torch.where(gt_inds > 0, labels, -1)


finalize_kernel = kernel(_finalize)


def finalize_assignment(max_ov, argmax_ov, low, inside, has_gt, gt_labels, lo, hi, pos_thr):
    """(B, N) gt_inds, max_overlaps and labels from the per-anchor IoU results.

    The thresholds go in as a tensor kept on the device: Python floats would be turned
    into tensors by the compiler at every call (a copy from the host each time on CUDA).
    """
    thresholds = device_constant(
        (float(lo), float(hi), float(pos_thr)), max_ov.device, torch.float32
    )
    return finalize_kernel(max_ov, argmax_ov, low, inside, has_gt, gt_labels, thresholds)


overlap_max_kernel = kernel(_overlap_max, cpu_only=True)
low_quality_ties_kernel = kernel(_low_quality_ties, cpu_only=True)


def planes(boxes: Tensor) -> Tuple[Tensor, ...]:
    """(..., 4) boxes -> four contiguous coordinate planes.

    A copy with standard strides even for one box: ``contiguous()`` would keep the view's
    stride 4 there, and the compiled kernels guard on strides (one more recompile).
    """
    return tuple(c.clone(memory_format=torch.contiguous_format) for c in boxes.unbind(-1))


def overlap_max(
    gts: Tensor, gt_mask: Tensor, anchors: Tensor, inside: Tensor, ignored: Optional[Tensor]
) -> Tuple[Tensor, ...]:
    """(B, n) max IoU and argmax gt per anchor; (B, G) max IoU and argmax anchor per gt.

    Args:
        gts (Tensor): (B, G, 4). gt_mask (Tensor): (B, G) bool.
        anchors (Tensor): (n, 4). inside (Tensor): (B, n) bool.
        ignored (Tensor, optional): (B, n) bool.
    """
    return overlap_max_kernel(*planes(gts), gt_mask, *planes(anchors), inside, ignored)


def low_quality_ties(
    gts: Tensor,
    gt_mask: Tensor,
    anchors: Tensor,
    inside: Tensor,
    ignored: Optional[Tensor],
    gt_max: Tensor,
    eligible: Tensor,
) -> Tensor:
    """(B, n) long: 1 + highest gt index whose best IoU this anchor ties (0 if none)."""
    return low_quality_ties_kernel(
        *planes(gts), gt_mask, *planes(anchors), inside, ignored, gt_max, eligible
    )
