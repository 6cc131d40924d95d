"""Anchors of all levels, and per-image inside flags, for the whole batch at once."""

import math
from typing import List, NamedTuple, Sequence, Tuple

import torch
from mmdet.models.task_modules.prior_generators import AnchorGenerator
from mmdet.structures.bbox import cat_boxes, get_box_tensor
from torch import Tensor


class BatchAnchors(NamedTuple):
    """Anchors shared by the batch and the flags that differ per image.

    Attributes:
        anchors (Tensor): (N, 4) all levels concatenated, order (level, y, x, anchor).
        inside (Tensor): (B, N) bool, valid (inside the padded image) and inside
            ``img_shape`` by ``allowed_border`` — the anchors upstream assigns.
        level_sizes (list[int]): N_l per level, summing to N.
        level_ids (Tensor): (N,) long, level of each anchor.
    """

    anchors: Tensor
    inside: Tensor
    level_sizes: List[int]
    level_ids: Tensor


def _batch_valid_flags(prior_generator, featmap_sizes: Sequence[Tuple[int, int]],
                       pad_shapes: Sequence[Tuple[int, int]], device) -> Tensor:
    """Valid flags of every image, as ``AnchorGenerator.valid_flags`` computes them.

    Returns:
        Tensor: (B, N) bool.
    """
    B = len(pad_shapes)
    flags = []
    for lvl, (feat_h, feat_w) in enumerate(featmap_sizes):
        stride_w, stride_h = prior_generator.strides[lvl]
        num_base = prior_generator.num_base_anchors[lvl]
        # Host-side arithmetic on the metas, exactly as upstream (np.ceil of a true division).
        valid_hw = torch.tensor(
            [[min(int(math.ceil(h / stride_h)), feat_h), min(int(math.ceil(w / stride_w)), feat_w)]
             for h, w in pad_shapes], device=device).view(B, 2, 1)
        ys = torch.arange(feat_h, device=device).repeat_interleave(feat_w * num_base)
        xs = torch.arange(feat_w, device=device).repeat_interleave(num_base).repeat(feat_h)
        flags.append((ys[None] < valid_hw[:, 0]) & (xs[None] < valid_hw[:, 1]))
    return torch.cat(flags, dim=1)


def batch_anchors(prior_generator, featmap_sizes: Sequence[Tuple[int, int]],
                  batch_img_metas: Sequence[dict], allowed_border: float,
                  device) -> BatchAnchors:
    """Generate the anchors once and the inside flags of every image.

    Args:
        prior_generator: mmdet anchor generator (``AnchorGenerator`` or a subclass).
        featmap_sizes (Sequence[tuple[int, int]]): (H_l, W_l) per level.
        batch_img_metas (Sequence[dict]): B metas with ``pad_shape`` and ``img_shape``.
        allowed_border (float): ``train_cfg.allowed_border``; negative keeps every valid
            anchor (as ``anchor_inside_flags`` does).
        device: Device of the result.

    Returns:
        BatchAnchors: anchors (N, 4), inside (B, N), level sizes and ids.
    """
    featmap_sizes = [tuple(int(v) for v in s) for s in featmap_sizes]
    multi_level = prior_generator.grid_priors(featmap_sizes, device=device)
    level_sizes = [len(a) for a in multi_level]
    anchors = get_box_tensor(cat_boxes(multi_level))
    pad_shapes = [tuple(m['pad_shape'][:2]) for m in batch_img_metas]
    if type(prior_generator).valid_flags is AnchorGenerator.valid_flags:
        valid = _batch_valid_flags(prior_generator, featmap_sizes, pad_shapes, device)
    else:  # a generator with its own valid_flags: ask it, image by image
        valid = torch.stack([torch.cat(prior_generator.valid_flags(featmap_sizes, s, device))
                             for s in pad_shapes])
    inside = valid
    if allowed_border >= 0:
        img_hw = torch.tensor([list(m['img_shape'][:2]) for m in batch_img_metas],
                              dtype=anchors.dtype, device=device)
        img_h, img_w = img_hw[:, :1], img_hw[:, 1:]
        inside = valid & (anchors[None, :, 0] >= -allowed_border) \
            & (anchors[None, :, 1] >= -allowed_border) \
            & (anchors[None, :, 2] < img_w + allowed_border) \
            & (anchors[None, :, 3] < img_h + allowed_border)
    level_ids = torch.repeat_interleave(
        torch.arange(len(level_sizes), device=device),
        torch.tensor(level_sizes, device=device))
    return BatchAnchors(anchors, inside, level_sizes, level_ids)
