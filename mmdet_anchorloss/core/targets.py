"""Training targets of a batch: labels, weights and encoded box targets of the positives."""

from typing import NamedTuple, Optional, Tuple

import torch
from mmdet.structures.bbox import get_box_tensor
from torch import Tensor

from .anchors import BatchAnchors
from .structures import BatchAssignResult, PaddedBoxes, SampledTargets


class TargetOptions(NamedTuple):
    """What the target step reads from a head's config.

    Attributes:
        num_classes (int): C; label C is background.
        pos_weight (float): label weight of positives (``train_cfg.pos_weight``; <= 0: 1).
        reg_decoded_bbox (bool): regress the gt box itself instead of encoded deltas.
        bbox_coder: the box coder (``encode_batch`` used when it has one).
    """

    num_classes: int
    pos_weight: float
    reg_decoded_bbox: bool
    bbox_coder: object


def build_targets(
    options: TargetOptions,
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
        options (TargetOptions): classes, pos_weight, reg_decoded_bbox and the coder.
        pos, neg (Tensor): (B, N) bool sampled masks.
        avg_factor (Tensor): () the loss normaliser.
        num_pos (int, optional): ``pos.sum()`` when the caller has read it already: the
            positives are then found without a host sync.
    """
    labels = torch.where(pos, assign.labels, options.num_classes)
    # 1 for sampled anchors (positives and negatives are disjoint), 0 for the rest;
    # positives take ``pos_weight`` when it is set (> 0)
    label_weights = (pos | neg).float()
    if options.pos_weight > 0 and options.pos_weight != 1:
        label_weights = torch.where(pos, float(options.pos_weight), label_weights)
    pos_b, pos_n = positions(pos, num_pos)
    pos_gt = gts.bboxes[pos_b, assign.gt_inds[pos_b, pos_n] - 1]
    if options.reg_decoded_bbox:
        pos_targets = pos_gt
    else:
        pos_targets = encode_boxes(options.bbox_coder, anchors.anchors[pos_n], pos_gt)
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
    rows, cols = torch.nonzero_static(mask, size=count).unbind(1)  # strided views
    return rows, cols
