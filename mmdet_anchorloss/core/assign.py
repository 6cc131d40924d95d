"""Assignment adapter: any mmdet assigner over a batch, and one image out of a batch result."""

from typing import Optional, Sequence, Tuple

import torch
from mmdet.models.task_modules.assigners import AssignResult
from mmengine.structures import InstanceData
from torch import Tensor

from .anchors import BatchAnchors
from .structures import BatchAssignResult, PaddedBoxes


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


def assign_result_of(
    result: BatchAssignResult, index: int, inside: Tensor
) -> Tuple[AssignResult, Tensor]:
    """mmdet ``AssignResult`` of one image, restricted to its inside anchors.

    Args:
        result (BatchAssignResult): the batch's assignment, (B, N).
        index (int): the image.
        inside (Tensor): (B, N) bool, the anchors upstream hands to the assigner.

    Returns:
        tuple[AssignResult, Tensor]: the result and the (M,) indices of the anchors kept.
    """
    keep = inside[index].nonzero().squeeze(1)
    num_gts = int(result.num_gts[index])
    return AssignResult(
        num_gts=num_gts,
        gt_inds=result.gt_inds[index, keep],
        max_overlaps=result.max_overlaps[index, keep],
        labels=result.labels[index, keep],
    ), keep
