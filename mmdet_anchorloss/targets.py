"""Batched training targets: anchors -> assignment -> sampling -> encoded box targets."""

from typing import List, Optional, Sequence

import torch
from mmdet.models.task_modules.samplers import PseudoSampler
from mmdet.structures.bbox import get_box_tensor
from mmengine.structures import InstanceData
from torch import Tensor

from .anchors import BatchAnchors
from .assigners.batch_max_iou_assigner import assign_result_of
from .structures import BatchAssignResult, PaddedBoxes, SampledTargets


def assign_batch(
    assigner,
    anchors: BatchAnchors,
    gts: PaddedBoxes,
    ignore: Optional[PaddedBoxes],
    batch_gt_instances: Sequence[InstanceData],
    batch_gt_instances_ignore: Optional[Sequence],
) -> BatchAssignResult:
    """Assign with ``assigner.assign_batch`` when it has one, else image by image.

    The fallback keeps any mmdet assigner usable (e.g. upstream ``MaxIoUAssigner``): it
    runs ``assign`` on each image's inside anchors and scatters the result back.
    """
    if hasattr(assigner, 'assign_batch') and getattr(assigner, 'perm_repeat_gt_cfg', None) is None:
        return assigner.assign_batch(anchors.anchors, anchors.inside, gts, ignore)
    B, N = anchors.inside.shape
    device = anchors.anchors.device
    gt_inds = torch.full((B, N), -1, dtype=torch.long, device=device)
    max_ov = anchors.anchors.new_full((B, N), float('-inf'))
    labels = torch.full((B, N), -1, dtype=torch.long, device=device)
    for i in range(B):  # fallback for assigners without a batched form
        keep = anchors.inside[i]
        res = assigner.assign(
            InstanceData(priors=anchors.anchors[keep]),
            batch_gt_instances[i],
            batch_gt_instances_ignore[i] if batch_gt_instances_ignore else None,
        )
        gt_inds[i, keep] = res.gt_inds
        max_ov[i, keep] = res.max_overlaps.to(max_ov.dtype)
        labels[i, keep] = res.labels
    return BatchAssignResult(gt_inds, max_ov, labels, gts.num_gts)


def sample_batch(
    sampler,
    assign: BatchAssignResult,
    anchors: BatchAnchors,
    batch_gt_instances: Sequence[InstanceData],
):
    """Sampled positive / negative masks (B, N) and the avg_factor (0-d tensor).

    ``PseudoSampler`` is batched (every positive and negative; avg_factor counts
    max(#pos, 1) per image). Other samplers run per image with upstream's own ``sample``,
    which keeps ``RandomSampler``'s random stream identical to upstream's.
    """
    if isinstance(sampler, PseudoSampler):
        pos = assign.gt_inds > 0
        neg = assign.gt_inds == 0
        avg_factor = pos.sum(dim=1).clamp(min=1).sum().float()
        return pos, neg, avg_factor
    B, N = assign.gt_inds.shape
    pos = torch.zeros(B, N, dtype=torch.bool, device=assign.gt_inds.device)
    neg = torch.zeros_like(pos)
    total = 0
    for i in range(B):  # RandomSampler draws per image, in upstream's order
        res, keep = assign_result_of(assign, i, anchors.inside)
        sampling = sampler.sample(
            res, InstanceData(priors=anchors.anchors[keep]), batch_gt_instances[i]
        )
        pos[i, keep[sampling.pos_inds]] = True
        neg[i, keep[sampling.neg_inds]] = True
        total += sampling.avg_factor
    return pos, neg, torch.tensor(float(total), device=pos.device)


def build_targets(
    head,
    anchors: BatchAnchors,
    gts: PaddedBoxes,
    assign: BatchAssignResult,
    pos: Tensor,
    neg: Tensor,
    avg_factor: Tensor,
) -> SampledTargets:
    """Labels, weights and encoded box targets, as upstream ``_get_targets_single``.

    Args:
        head: the head (reads ``num_classes``, ``train_cfg['pos_weight']``,
            ``reg_decoded_bbox``, ``bbox_coder``).
        pos, neg (Tensor): (B, N) bool sampled masks.
    """
    B, N = pos.shape
    labels = torch.where(pos, assign.labels, head.num_classes)
    pos_weight = head.train_cfg['pos_weight']
    label_weights = torch.where(
        pos, pos_weight if pos_weight > 0 else 1.0, torch.where(neg, 1.0, 0.0)
    ).float()
    pos_b, pos_n = pos.nonzero(as_tuple=True)  # the one host sync of the target step
    pos_gt = gts.bboxes[pos_b, assign.gt_inds[pos_b, pos_n] - 1]
    if head.reg_decoded_bbox:
        pos_targets = pos_gt
    else:
        pos_targets = get_box_tensor(head.bbox_coder.encode(anchors.anchors[pos_n], pos_gt))
    return SampledTargets(
        labels, label_weights, pos, neg, pos_b, pos_n, pos_gt, pos_targets, avg_factor, assign
    )


def levels_to_rows(maps: List[Tensor], channels: int) -> Tensor:
    """(B, A*K, H, W) maps of all levels -> (B, N, K), anchors ordered (level, y, x, a)."""
    B = maps[0].size(0)
    return torch.cat([m.permute(0, 2, 3, 1).reshape(B, -1, channels) for m in maps], dim=1)
