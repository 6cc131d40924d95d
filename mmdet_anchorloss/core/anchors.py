"""Anchors of all levels, and per-image inside flags, for the whole batch at once."""

import math
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
from mmdet.models.task_modules.prior_generators import AnchorGenerator
from mmdet.structures.bbox import cat_boxes, get_box_tensor
from torch import Tensor

from ..kernels.sync_policy import device_constant, remember, upload


class BatchAnchors(NamedTuple):
    """Anchors shared by the batch and the flags that differ per image.

    Attributes:
        anchors (Tensor): (N, 4) all levels concatenated, order (level, y, x, anchor).
        inside (Tensor): (B, N) bool, valid (inside the padded image) and inside
            ``img_shape`` by ``allowed_border`` — the anchors upstream assigns. Kept with
            the grid for the next batch of the same image shapes: not to be modified in
            place.
        level_sizes (list[int]): N_l per level, summing to N.
        level_ids (Tensor): (N,) long, level of each anchor.
        tables (dict, optional): tensors derived from this anchor grid, kept as long as the
            grid is: the inside flags per batch of image shapes, ``gather_anchor_rows``'
            index per map shapes (``sync_policy.remember``).
    """

    anchors: Tensor
    inside: Tensor
    level_sizes: List[int]
    level_ids: Tensor
    tables: Optional[dict] = None


class _Grid(NamedTuple):
    """What does not change between iterations of one feature-map size (cached)."""

    anchors: Tensor  # (N, 4)
    level_sizes: List[int]
    level_ids: Tensor  # (N,) long
    ys: Tensor  # (N,) long, feature-map row of each anchor
    xs: Tensor  # (N,) long, feature-map column of each anchor
    tables: dict  # index tables derived from the grid (``BatchAnchors.tables``)


_CACHE_SIZE = 16


def _grid(
    prior_generator, featmap_sizes: Sequence[Tuple[int, int]], device, cache: Optional[dict]
) -> _Grid:
    """Anchors and their grid coordinates, kept in ``cache`` per sizes and device."""
    cache = {} if cache is None else cache
    key = (tuple(featmap_sizes), str(device))
    if key not in cache:
        multi_level = prior_generator.grid_priors(featmap_sizes, device=device)
        level_sizes = [len(a) for a in multi_level]
        ys, xs = [], []
        for lvl, (feat_h, feat_w) in enumerate(featmap_sizes):
            a = prior_generator.num_base_anchors[lvl]
            idx = torch.arange(feat_h * feat_w * a, device=device) // a
            ys.append(idx // feat_w)
            xs.append(idx % feat_w)
        level_ids = torch.repeat_interleave(
            torch.arange(len(level_sizes), device=device),
            device_constant(tuple(level_sizes), device),
            output_size=sum(level_sizes),
        )
        if len(cache) >= _CACHE_SIZE:
            cache.pop(next(iter(cache)))
        cache[key] = _Grid(
            get_box_tensor(cat_boxes(multi_level)),
            level_sizes,
            level_ids,
            torch.cat(ys),
            torch.cat(xs),
            {},
        )
    return cache[key]


def _batch_valid_flags(
    prior_generator,
    grid: _Grid,
    featmap_sizes: Sequence[Tuple[int, int]],
    pad_shapes: Sequence[Tuple[int, int]],
) -> Tensor:
    """Valid flags of every image, as ``AnchorGenerator.valid_flags`` computes them.

    Returns:
        Tensor: (B, N) bool.
    """
    # Host-side arithmetic on the metas, exactly as upstream (np.ceil of a true division).
    valid_h, valid_w = [], []
    for h, w in pad_shapes:
        valid_h.append(
            [
                min(int(math.ceil(h / sh)), fh)
                for (_, sh), (fh, _) in zip(prior_generator.strides, featmap_sizes)
            ]
        )
        valid_w.append(
            [
                min(int(math.ceil(w / sw)), fw)
                for (sw, _), (_, fw) in zip(prior_generator.strides, featmap_sizes)
            ]
        )
    device = grid.level_ids.device
    # the extents repeat with the batch shape: kept on the device, not copied every step
    valid_h = device_constant(tuple(map(tuple, valid_h)), device)[:, grid.level_ids]
    valid_w = device_constant(tuple(map(tuple, valid_w)), device)[:, grid.level_ids]
    return (grid.ys < valid_h) & (grid.xs < valid_w)


def batch_anchors(
    prior_generator,
    featmap_sizes: Sequence[Tuple[int, int]],
    batch_img_metas: Sequence[dict],
    allowed_border: float,
    device,
    cache: Optional[dict] = None,
) -> BatchAnchors:
    """Generate the anchors once and the inside flags of every image.

    Args:
        prior_generator: mmdet anchor generator (``AnchorGenerator`` or a subclass).
        featmap_sizes (Sequence[tuple[int, int]]): (H_l, W_l) per level.
        batch_img_metas (Sequence[dict]): B metas with ``pad_shape`` and ``img_shape``.
        allowed_border (float): ``train_cfg.allowed_border``; negative keeps every valid
            anchor (as ``anchor_inside_flags`` does).
        device: Device of the result.
        cache (dict, optional): the caller's store for the anchor grids, which do not
            change between iterations of one feature-map size (the heads keep one each).

    Returns:
        BatchAnchors: anchors (N, 4), inside (B, N), level sizes and ids.
    """
    featmap_sizes = [tuple(int(v) for v in s) for s in featmap_sizes]
    grid = _grid(prior_generator, featmap_sizes, device, cache)
    pad_shapes = tuple(tuple(m['pad_shape'][:2]) for m in batch_img_metas)
    img_shapes = tuple(tuple(m['img_shape'][:2]) for m in batch_img_metas)
    # The flags depend only on the images' shapes, which repeat from step to step with
    # fixed-size inputs: kept with the grid per batch layout.
    inside = remember(
        grid.tables,
        ('inside', pad_shapes, img_shapes if allowed_border >= 0 else None, allowed_border),
        lambda: _inside_flags(
            prior_generator, grid, featmap_sizes, pad_shapes, img_shapes, allowed_border, device
        ),
    )
    return BatchAnchors(grid.anchors, inside, grid.level_sizes, grid.level_ids, grid.tables)


def _inside_flags(
    prior_generator, grid: _Grid, featmap_sizes, pad_shapes, img_shapes, allowed_border, device
) -> Tensor:
    """(B, N) bool: valid (inside the padded image) and, with ``allowed_border`` >= 0,
    inside ``img_shape`` by that border."""
    anchors = grid.anchors
    if type(prior_generator).valid_flags is AnchorGenerator.valid_flags:
        valid = _batch_valid_flags(prior_generator, grid, featmap_sizes, pad_shapes)
    else:  # a generator with its own valid_flags: ask it, image by image
        valid = torch.stack(
            [torch.cat(prior_generator.valid_flags(featmap_sizes, s, device)) for s in pad_shapes]
        )
    inside = valid
    if allowed_border >= 0:
        img_hw = upload([list(hw) for hw in img_shapes], device, dtype=anchors.dtype)
        img_h, img_w = img_hw[:, :1], img_hw[:, 1:]
        inside = (
            valid
            & (anchors[None, :, 0] >= -allowed_border)
            & (anchors[None, :, 1] >= -allowed_border)
            & (anchors[None, :, 2] < img_w + allowed_border)
            & (anchors[None, :, 3] < img_h + allowed_border)
        )
    return inside
