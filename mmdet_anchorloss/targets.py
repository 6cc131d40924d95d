"""Batched training targets: anchors -> assignment -> sampling -> encoded box targets."""

from typing import Optional, Sequence, Tuple

import torch
from mmdet.models.task_modules.samplers import PseudoSampler, RandomSampler
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
    if type(sampler) is RandomSampler and not sampler.add_gt_as_proposals:
        return _sample_random(sampler, assign)
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


def _sample_random(sampler, assign: BatchAssignResult):
    """``RandomSampler`` for the batch, with upstream's random stream.

    Upstream draws, image by image, a ``randperm`` for the positives and then one for the
    negatives, each only when there are more candidates than wanted. The counts come back
    in one host sync; the draws (small CPU calls) are made in the same order with the same
    sizes; the selection itself is batched.
    """
    pos = assign.gt_inds > 0
    neg = assign.gt_inds == 0
    num_pos, num_neg = torch.stack([pos.sum(dim=1), neg.sum(dim=1)]).tolist()
    want_pos = int(sampler.num * sampler.pos_fraction)
    chosen_pos = torch.zeros(pos.size(0), max(num_pos + [1]), dtype=torch.bool)
    chosen_neg = torch.zeros(pos.size(0), max(num_neg + [1]), dtype=torch.bool)
    total = 0
    for b in range(pos.size(0)):  # the draws must follow upstream's order: pos, neg, next image
        got_pos = _draw(chosen_pos[b], num_pos[b], want_pos)
        want_neg = sampler.num - got_pos
        if sampler.neg_pos_ub >= 0:
            want_neg = min(want_neg, int(sampler.neg_pos_ub * max(1, got_pos)))
        got_neg = _draw(chosen_neg[b], num_neg[b], want_neg)
        total += max(got_pos, 1) + max(got_neg, 1)
    pos = pos & chosen_pos.to(pos.device).gather(1, (pos.cumsum(dim=1) - 1).clamp(min=0))
    neg = neg & chosen_neg.to(neg.device).gather(1, (neg.cumsum(dim=1) - 1).clamp(min=0))
    return pos, neg, torch.tensor(float(total), device=pos.device)


def _draw(chosen: Tensor, count: int, want: int) -> int:
    """Mark ``want`` of ``count`` ranks in ``chosen`` as upstream's ``random_choice``."""
    if count > want:
        chosen[torch.randperm(count)[: max(want, 0)]] = True
        return max(want, 0)
    chosen[:count] = True
    return count


def build_targets(
    head,
    anchors: BatchAnchors,
    gts: PaddedBoxes,
    assign: BatchAssignResult,
    pos: Tensor,
    neg: Tensor,
    avg_factor: Tensor,
    num_pos: Optional[int] = None,
) -> SampledTargets:
    """Labels, weights and encoded box targets, as upstream ``_get_targets_single``.

    Args:
        head: the head (reads ``num_classes``, ``train_cfg['pos_weight']``,
            ``reg_decoded_bbox``, ``bbox_coder``).
        pos, neg (Tensor): (B, N) bool sampled masks.
        num_pos (int, optional): ``pos.sum()`` when the caller has read it already: the
            positives are then found without a host sync.
    """
    B, N = pos.shape
    labels = torch.where(pos, assign.labels, head.num_classes)
    pos_weight = head.train_cfg['pos_weight']
    label_weights = torch.where(
        pos, pos_weight if pos_weight > 0 else 1.0, torch.where(neg, 1.0, 0.0)
    ).float()
    pos_b, pos_n = positions(pos, num_pos)
    pos_gt = gts.bboxes[pos_b, assign.gt_inds[pos_b, pos_n] - 1]
    if head.reg_decoded_bbox:
        pos_targets = pos_gt
    else:
        pos_targets = encode_boxes(head.bbox_coder, anchors.anchors[pos_n], pos_gt)
    return SampledTargets(
        labels, label_weights, pos, neg, pos_b, pos_n, pos_gt, pos_targets, avg_factor, assign
    )


def encode_boxes(coder, anchors: Tensor, gts: Tensor) -> Tensor:
    """(P, box_dim) regression targets of (P, 4) gts w.r.t. (P, 4) anchors: the coder's
    batch API (``encode_batch``) when it has one, upstream's ``encode`` otherwise."""
    encode = getattr(coder, 'encode_batch', None)
    if encode is not None:
        return encode(anchors, gts)
    return get_box_tensor(coder.encode(anchors, gts))


def decode_boxes(coder, anchors: Tensor, deltas: Tensor) -> Tensor:
    """(P, 4) boxes from (P, box_dim) deltas: ``decode_batch`` when the coder has one,
    upstream's ``decode`` otherwise (no ``max_shape``, as AnchorHead's loss)."""
    decode = getattr(coder, 'decode_batch', None)
    if decode is not None:
        return decode(anchors, deltas)
    return get_box_tensor(coder.decode(anchors, deltas))


def positions(mask: Tensor, count: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """(row, column) of the True entries of a (B, N) mask, in row-major order.

    With ``count`` (the number of True entries, read back by the caller) this makes no host
    sync (``nonzero_static``); without it, ``nonzero`` reads the count itself.
    """
    if count is None or not hasattr(torch, 'nonzero_static'):
        return mask.nonzero(as_tuple=True)
    rows, cols = torch.nonzero_static(mask, size=count).t().contiguous()
    return rows, cols
