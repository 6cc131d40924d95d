"""Batched containers: ground truth padded to (B, G_max, 4) with a mask, and named results."""

import itertools
from typing import List, NamedTuple, Optional, Sequence

import torch
from mmdet.structures.bbox import get_box_tensor
from mmengine.structures import InstanceData
from torch import Tensor

from ..kernels.sync_policy import upload


class PaddedBoxes(NamedTuple):
    """Boxes of a batch, padded to the largest count.

    Attributes:
        bboxes (Tensor): (B, G, 4) float, x1y1x2y2; padding rows are zeros.
        labels (Tensor): (B, G) long; padding entries are -1.
        mask (Tensor): (B, G) bool, True for real boxes.
    """

    bboxes: Tensor
    labels: Tensor
    mask: Tensor

    @property
    def num_gts(self) -> Tensor:
        """Tensor: (B,) long, real boxes per image."""
        return self.mask.sum(dim=1)


def pad_instances(
    instances: Sequence[Optional[InstanceData]], device: torch.device, with_labels: bool = True
) -> PaddedBoxes:
    """Pad per-image ``InstanceData`` (``bboxes``, ``labels``) to one batch.

    Args:
        instances (Sequence[InstanceData | None]): B items; None counts as no box.
        device (torch.device): Device of the result.
        with_labels (bool): Read ``labels`` too (ignore boxes have none).

    Returns:
        PaddedBoxes: bboxes (B, G, 4), labels (B, G), mask (B, G); G >= 1 so that
        shapes stay valid for an all-empty batch.
    """
    boxes: List[Tensor] = []
    labels: List[Tensor] = []
    counts: List[int] = []
    for i, inst in enumerate(instances):  # host side: no copy unless dtype / device differ
        if inst is None or 'bboxes' not in inst:
            counts.append(0)
            continue
        b = get_box_tensor(inst.bboxes).to(device=device, dtype=torch.float32)
        b = b if b.dim() == 2 else b.reshape(-1, 4)
        boxes.append(b)
        counts.append(len(b))
        if with_labels:
            lab = inst.labels.to(device=device, dtype=torch.long)
            lab = lab if lab.dim() == 1 else lab.reshape(-1)
            if len(lab) != len(b):
                raise ValueError(
                    f'image {i} of the batch has {len(b)} gt boxes but {len(lab)} labels'
                )
            labels.append(lab)
    B, num = len(counts), max(counts + [1])
    # One copy of all boxes into the padded layout: row i * num + j holds box j of image i.
    slots = list(
        itertools.chain.from_iterable(range(i * num, i * num + n) for i, n in enumerate(counts))
    )
    index = upload(slots, device, dtype=torch.long)  # no host sync on CUDA
    out_boxes = torch.zeros(B * num, 4, device=device)
    out_labels = torch.full((B * num,), -1, dtype=torch.long, device=device)
    if slots:
        out_boxes.index_copy_(0, index, torch.cat(boxes))
        if with_labels:
            out_labels.index_copy_(0, index, torch.cat(labels))
        else:
            out_labels.index_fill_(0, index, 0)
    # the mask from the host, where it is known: one copy, no op on the device
    mask = upload([[True] * n + [False] * (num - n) for n in counts], device, torch.bool)
    mask = mask.view(B, num) if B == 0 else mask
    out_boxes, out_labels = out_boxes.view(B, num, 4), out_labels.view(B, num)
    return PaddedBoxes(out_boxes, out_labels, mask)


class BatchAssignResult(NamedTuple):
    """Assignment of every anchor of every image.

    Attributes:
        gt_inds (Tensor): (B, N) long. 0: negative, -1: ignored (or outside the image),
            k > 0: assigned to gt k - 1 (mmdet's ``AssignResult.gt_inds`` convention).
        max_overlaps (Tensor): (B, N) float, best IoU of each anchor (-inf outside).
        labels (Tensor): (B, N) long, label of the assigned gt, -1 if not positive.
        num_gts (Tensor): (B,) long.
    """

    gt_inds: Tensor
    max_overlaps: Tensor
    labels: Tensor
    num_gts: Tensor


class SampledTargets(NamedTuple):
    """Training targets of a batch, in compact form.

    Attributes:
        labels (Tensor): (B, N) long in [0, C]; C is background.
        label_weights (Tensor): (B, N) float.
        pos_mask (Tensor): (B, N) bool, sampled positives.
        neg_mask (Tensor): (B, N) bool, sampled negatives.
        pos_batch_inds (Tensor): (P,) long, image index of each positive.
        pos_anchor_inds (Tensor): (P,) long, anchor index (into N) of each positive.
        pos_gt_bboxes (Tensor): (P, 4) float, the gt box assigned to each positive.
        pos_bbox_targets (Tensor): (P, 4) float, encoded deltas (or the gt box with
            ``reg_decoded_bbox``).
        avg_factor (Tensor): () float, sum over images of ``SamplingResult.avg_factor``.
        assign (BatchAssignResult): the assignment these were sampled from.
    """

    labels: Tensor
    label_weights: Tensor
    pos_mask: Tensor
    neg_mask: Tensor
    pos_batch_inds: Tensor
    pos_anchor_inds: Tensor
    pos_gt_bboxes: Tensor
    pos_bbox_targets: Tensor
    avg_factor: Tensor
    assign: BatchAssignResult

    def dense_bbox_targets(self) -> 'tuple[Tensor, Tensor]':
        """Dense regression targets and weights, as upstream's ``get_targets`` builds them.

        Returns:
            tuple[Tensor, Tensor]: bbox_targets (B, N, 4) and bbox_weights (B, N, 4).
        """
        B, N = self.labels.shape
        targets = self.pos_bbox_targets.new_zeros(B, N, self.pos_bbox_targets.size(-1))
        weights = torch.zeros_like(targets)
        targets[self.pos_batch_inds, self.pos_anchor_inds] = self.pos_bbox_targets
        weights[self.pos_batch_inds, self.pos_anchor_inds] = 1.0
        return targets, weights
