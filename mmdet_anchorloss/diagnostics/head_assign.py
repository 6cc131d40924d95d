"""Assign gts to anchors for one image exactly as an anchor head's ``get_targets`` does.

Only the head's prior generator and its assigner are built (no backbone, no model), from a
detector config: ``model.bbox_head`` with ``model.train_cfg`` (one-stage: RetinaNet, SSD, ...)
or ``model.rpn_head`` with ``model.train_cfg.rpn`` (two-stage). The assigner is used through
the single-image ``assign(pred_instances, gt_instances, gt_instances_ignore)`` interface that
mmdet's ``MaxIoUAssigner`` and this project's ``BatchMaxIoUAssigner`` share.
"""

from __future__ import annotations

import inspect
from typing import Any, List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from .assignment_stats import featmap_sizes, level_name


class HeadParts(NamedTuple):
    """The parts of an anchor head that decide the assignment.

    Attributes:
        head_key (str): ``'bbox_head'`` or ``'rpn_head'``.
        head_type (str): the head's registered type.
        prior_generator: the built anchor generator (``grid_priors``, ``valid_flags``).
        assigner: the built assigner.
        assigner_cfg (dict): its config.
        allowed_border (int): ``train_cfg.allowed_border`` (-1: valid flags only).
        strides (list[tuple[float, float]]): L strides (stride_w, stride_h).
        level_names (list[str]): L readable level names.
    """

    head_key: str
    head_type: str
    prior_generator: Any
    assigner: Any
    assigner_cfg: dict
    allowed_border: int
    strides: List[Tuple[float, float]]
    level_names: List[str]


class ImageAssignment(NamedTuple):
    """The assignment of one image. N anchors over L levels, N_in inside, G gts.

    Attributes:
        anchors_per_level (list[Tensor]): L tensors (N_l, 4).
        inside_flags (Tensor): (N,) bool, anchors given to the assigner.
        assign_result: mmdet ``AssignResult`` over the N_in inside anchors
            (``gt_inds`` (N_in,) long).
        gt_bboxes (Tensor): (G, 4) float, gts in the network input (x1, y1, x2, y2).
        featmap_sizes (list[tuple[int, int]]): L sizes (H_l, W_l).
    """

    anchors_per_level: List[Tensor]
    inside_flags: Tensor
    assign_result: Any
    gt_bboxes: Tensor
    featmap_sizes: List[Tuple[int, int]]


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    if cfg is None:
        return default
    return cfg.get(key, default) if hasattr(cfg, 'get') else getattr(cfg, key, default)


def build_head_parts(model_cfg: Any) -> HeadParts:
    """Build the prior generator and the assigner of a detector config's anchor head.

    Args:
        model_cfg (ConfigDict | dict): the ``model`` section of an mmdet config.

    Returns:
        HeadParts: the built parts.

    Raises:
        ValueError: the config has no anchor head with an anchor generator and an assigner.
    """
    from mmdet.registry import TASK_UTILS

    if _get(model_cfg, 'bbox_head') is not None:
        head_key = 'bbox_head'
        head = model_cfg['bbox_head']
        train_cfg = _get(head, 'train_cfg') or _get(model_cfg, 'train_cfg')
    elif _get(model_cfg, 'rpn_head') is not None:
        head_key = 'rpn_head'
        head = model_cfg['rpn_head']
        train_cfg = _get(head, 'train_cfg') or _get(_get(model_cfg, 'train_cfg'), 'rpn')
    else:
        raise ValueError('model has neither bbox_head nor rpn_head: no anchor head to analyse')
    head_type = str(_get(head, 'type', '?'))
    gen_cfg = _get(head, 'anchor_generator') or _get(head, 'prior_generator')
    if gen_cfg is None:
        raise ValueError(f'model.{head_key} ({head_type}) has no anchor_generator')
    assigner_cfg = _get(train_cfg, 'assigner')
    if assigner_cfg is None:
        where = 'model.train_cfg.rpn' if head_key == 'rpn_head' else 'model.train_cfg'
        raise ValueError(f'{where} has no assigner for model.{head_key} ({head_type})')
    prior_generator = TASK_UTILS.build(gen_cfg)
    assigner = TASK_UTILS.build(assigner_cfg)
    strides = [tuple(float(v) for v in s) for s in prior_generator.strides]
    return HeadParts(
        head_key=head_key,
        head_type=head_type,
        prior_generator=prior_generator,
        assigner=assigner,
        assigner_cfg=dict(assigner_cfg),
        allowed_border=int(_get(train_cfg, 'allowed_border', -1)),
        strides=strides,
        level_names=[level_name(i, s) for i, s in enumerate(strides)],
    )


def _wants_num_level_priors(assigner: Any) -> bool:
    try:
        return 'num_level_priors' in inspect.signature(assigner.assign).parameters
    except (TypeError, ValueError):
        return False


def assign_like_head(parts: HeadParts, data_sample: Any) -> ImageAssignment:
    """Assign one image's gts to anchors as ``AnchorHead._get_targets_single`` does.

    Anchors come from ``grid_priors`` on feature maps of the padded input, valid flags from
    the image's own ``pad_shape``, ``anchor_inside_flags`` with ``allowed_border`` on
    ``img_shape``, then ``assigner.assign`` on the inside anchors (with the ignore boxes).

    Args:
        parts (HeadParts): from :func:`build_head_parts`.
        data_sample (DetDataSample): after the data preprocessor: metainfo ``pad_shape``,
            ``img_shape`` (and ``batch_input_shape``), ``gt_instances.bboxes`` (G, 4) tensor,
            optional ``ignored_instances``.

    Returns:
        ImageAssignment: anchors, inside flags, the assign result and the gts.

    Raises:
        ValueError: no anchor is inside the image (as upstream), naming the image.
    """
    from mmdet.models.task_modules.prior_generators import anchor_inside_flags
    from mmdet.structures.bbox import BaseBoxes
    from mmengine.structures import InstanceData

    meta = data_sample.metainfo
    input_shape = meta.get('batch_input_shape', meta['pad_shape'])
    sizes = featmap_sizes(input_shape[:2], parts.strides)
    anchors = parts.prior_generator.grid_priors(sizes, device='cpu')
    valid = parts.prior_generator.valid_flags(sizes, meta['pad_shape'], device='cpu')
    flat = torch.cat(anchors)
    inside = anchor_inside_flags(
        flat, torch.cat(valid), meta['img_shape'][:2], parts.allowed_border
    )
    if not inside.any():
        raise ValueError(
            f'image {meta.get("img_path", meta.get("img_id", "?"))}: no anchor inside '
            f'img_shape {meta["img_shape"]} (allowed_border={parts.allowed_border})'
        )

    gt_instances = data_sample.gt_instances
    if isinstance(gt_instances.bboxes, BaseBoxes):
        gt_instances.bboxes = gt_instances.bboxes.tensor
    ignore: Optional[InstanceData] = data_sample.get('ignored_instances', None)
    if ignore is not None and isinstance(ignore.get('bboxes', None), BaseBoxes):
        ignore.bboxes = ignore.bboxes.tensor

    pred = InstanceData(priors=flat[inside])
    if _wants_num_level_priors(parts.assigner):
        in_levels = [int(f.sum()) for f in inside.split([a.shape[0] for a in anchors])]
        result = parts.assigner.assign(pred, in_levels, gt_instances, ignore)
    else:
        result = parts.assigner.assign(pred, gt_instances, ignore)
    return ImageAssignment(
        anchors_per_level=list(anchors),
        inside_flags=inside,
        assign_result=result,
        gt_bboxes=gt_instances.bboxes.float().reshape(-1, 4),
        featmap_sizes=sizes,
    )
