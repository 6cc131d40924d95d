"""Input checks at the loss boundary: one host sync for the whole batch, clear messages.

Every check raises ``ValueError`` naming the image (index, and ``img_id`` / ``img_path``
when the meta has them), the box and the offending value, before anything is computed.
"""

import math
from typing import List, Optional, Sequence

import torch
from torch import Tensor

from .structures import PaddedBoxes


def describe_image(index: int, metas: Sequence[dict]) -> str:
    """Human-readable name of image ``index`` of the batch, with its id and path if known."""
    meta = metas[index] if index < len(metas) else {}
    known = ', '.join(
        f'{key}={meta[key]}' for key in ('img_id', 'img_path') if meta.get(key) is not None
    )
    return f'image {index} of the batch' + (f' ({known})' if known else '')


def check_batch_lengths(
    batch_gt_instances: Sequence,
    batch_img_metas: Sequence[dict],
    batch_gt_instances_ignore: Optional[Sequence] = None,
) -> None:
    """The per-image lists of a batch must agree in length."""
    if len(batch_gt_instances) != len(batch_img_metas):
        raise ValueError(
            f'batch_gt_instances has {len(batch_gt_instances)} entries but batch_img_metas '
            f'has {len(batch_img_metas)}: they must describe the same images'
        )
    if batch_gt_instances_ignore is not None and len(batch_gt_instances_ignore) != len(
        batch_img_metas
    ):
        raise ValueError(
            f'batch_gt_instances_ignore has {len(batch_gt_instances_ignore)} entries but '
            f'batch_img_metas has {len(batch_img_metas)}'
        )


def check_predictions(
    cls_scores: Sequence[Tensor],
    bbox_preds: Sequence[Tensor],
    num_levels: int,
    num_base_priors: Sequence[int],
    cls_out_channels: int,
    box_dim: int,
    batch_size: int,
) -> None:
    """Prediction maps must match the anchor generator level by level.

    Args:
        cls_scores (Sequence[Tensor]): L tensors (B, A_l * cls_out_channels, H_l, W_l).
        bbox_preds (Sequence[Tensor]): L tensors (B, A_l * box_dim, H_l, W_l).
    """
    if len(cls_scores) != num_levels or len(bbox_preds) != num_levels:
        raise ValueError(
            f'the anchor generator has {num_levels} levels but got {len(cls_scores)} '
            f'cls_scores and {len(bbox_preds)} bbox_preds maps'
        )
    for lvl, (cls, reg) in enumerate(zip(cls_scores, bbox_preds)):
        a = num_base_priors[lvl]
        want_cls = (batch_size, a * cls_out_channels)
        want_reg = (batch_size, a * box_dim)
        if cls.dim() != 4 or tuple(cls.shape[:2]) != want_cls:
            raise ValueError(
                f'level {lvl}: cls_score has shape {tuple(cls.shape)}, expected '
                f'({batch_size}, {a}*{cls_out_channels}, H, W) for {batch_size} images, '
                f'{a} anchors per location and {cls_out_channels} class channels'
            )
        if reg.dim() != 4 or tuple(reg.shape[:2]) != want_reg:
            raise ValueError(
                f'level {lvl}: bbox_pred has shape {tuple(reg.shape)}, expected '
                f'({batch_size}, {a}*{box_dim}, H, W)'
            )
        if cls.shape[-2:] != reg.shape[-2:]:
            raise ValueError(
                f'level {lvl}: cls_score is {tuple(cls.shape[-2:])} (H, W) but bbox_pred is '
                f'{tuple(reg.shape[-2:])}'
            )


def gt_problems(gts: PaddedBoxes, num_classes: int) -> Tensor:
    """(B, G) bool, on the device: real boxes that are not finite, have x2 < x1 or y2 < y1,
    or (when ``num_classes`` > 0) a label outside [0, num_classes). No host sync."""
    b = gts.bboxes
    # |v| < inf is False for NaN and +-inf: ``isfinite`` in two ops (it dispatches four)
    ok = torch.cat([b.abs() < math.inf, b[..., 2:] >= b[..., :2]], dim=-1).all(dim=-1)
    if num_classes > 0:
        ok = ok & (gts.labels.clamp(0, num_classes - 1) == gts.labels)
    return gts.mask > ok  # real and not ok, in one op


def raise_gt_error(
    gts: PaddedBoxes, num_classes: int, metas: Sequence[dict], what: str = 'gt'
) -> None:
    """Raise the ``ValueError`` that names the first bad box of the batch (the error path;
    it reads the offending values back)."""
    b = gts.bboxes
    bad = gt_problems(gts, num_classes)
    img, box = (int(v) for v in bad.nonzero()[0])
    coords = [round(float(v), 4) for v in b[img, box].tolist()]
    where = f'{describe_image(img, metas)}, {what} box {box} {coords}'
    if not bool(torch.isfinite(b[img, box]).all()):
        problem = 'has a NaN or infinite coordinate'
    elif bool((b[img, box, 2] < b[img, box, 0]) | (b[img, box, 3] < b[img, box, 1])):
        problem = 'has x2 < x1 or y2 < y1 (boxes are x1, y1, x2, y2)'
    else:
        problem = (
            f'has label {int(gts.labels[img, box])}, outside [0, {num_classes}) '
            f'for num_classes={num_classes}'
        )
    count = int(bad.sum())
    more = f'; {count - 1} more bad box(es) in the batch' if count > 1 else ''
    raise ValueError(f'invalid ground truth: {where} {problem}{more}')


def check_gts(gts: PaddedBoxes, num_classes: int, metas: Sequence[dict], what: str = 'gt') -> None:
    """Boxes must be finite with x2 >= x1, y2 >= y1; labels in [0, num_classes).

    One host sync for the batch; the message names the first bad box.
    """
    if bool(gt_problems(gts, num_classes).any()):
        raise_gt_error(gts, num_classes, metas, what)


def check_finite_predictions(cls_scores: List[Tensor], bbox_preds: List[Tensor]) -> None:
    """Raise if any prediction map holds NaN or inf, naming the level (one sync)."""
    flags = torch.stack(
        [torch.isfinite(c).all() & torch.isfinite(r).all() for c, r in zip(cls_scores, bbox_preds)]
    )
    if bool(flags.all()):
        return
    bad = [i for i, ok in enumerate(flags.tolist()) if not ok]
    lvl = bad[0]
    which = 'cls_score' if not bool(torch.isfinite(cls_scores[lvl]).all()) else 'bbox_pred'
    raise ValueError(
        f'non-finite predictions (NaN or inf) in {which} of level {lvl} '
        f'(levels with non-finite values: {bad}); the model diverged or its input is bad. '
        'Lower the learning rate, check the data, or enable gradient clipping.'
    )
