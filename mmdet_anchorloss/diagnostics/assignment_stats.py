"""Statistics of an anchor-to-gt assignment: pure functions of tensors.

Two entry points:

- :func:`per_image_stats` + :func:`summarize`: one image at a time, on the output of a
  single-image assigner (mmdet ``AssignResult``), for the offline tool
  ``tools/analyze_assignments.py``. Host syncs are fine there.
- :func:`batch_assign_stats`: batched ``gt_inds`` (B, N), pure tensor ops and no host sync.
- :func:`log_counts` + :func:`log_values`: the part of them that the training log shows,
  in a dozen ops (the heads compute it at every step).

``gt_inds`` follows mmdet's ``AssignResult`` convention: 0 = negative, -1 = ignored (neither
positive nor negative), k > 0 = positive for gt index k - 1.
"""

from __future__ import annotations

import math
from typing import Dict, List, NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from ..kernels.sync_policy import device_constant

#: ``gt_inds`` value of a negative anchor.
NEGATIVE = 0
#: ``gt_inds`` value of an ignored anchor (between thresholds, or covered by an ignore box).
IGNORED = -1

#: COCO size buckets by box area (in the network input): small < 32^2 <= medium < 96^2 <= large.
SIZE_BUCKETS = ('small', 'medium', 'large')
SMALL_MAX_AREA = 32.0**2
MEDIUM_MAX_AREA = 96.0**2

#: Bins of the "positives per gt" histogram: [low, high) and their labels.
POS_PER_GT_BINS = ((0, 1), (1, 2), (2, 3), (3, 4), (4, 5), (5, 6), (6, 11), (11, 21), (21, 51))
POS_PER_GT_LABELS = ('0', '1', '2', '3', '4', '5', '6-10', '11-20', '21-50', '>50')

#: Number of equal-width bins on [0, 1] of the best-IoU histogram.
IOU_HIST_BINS = 20
IOU_QUANTILES = (0.0, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 1.0)


class ImageAssignStats(NamedTuple):
    """Assignment statistics of one image. L levels, G gts, P positive anchors.

    Attributes:
        num_anchors_per_level (Tensor): (L,) long, all anchors of each level.
        num_inside_per_level (Tensor): (L,) long, anchors the assigner saw (valid and inside).
        pos_per_level (Tensor): (L,) long, positive anchors per level.
        neg_per_level (Tensor): (L,) long, negative anchors per level.
        ignored_per_level (Tensor): (L,) long, ignored anchors per level.
        pos_per_gt (Tensor): (G,) long, positive anchors of each gt.
        gt_areas (Tensor): (G,) float, box area in the network input.
        gt_buckets (Tensor): (G,) long, index into :data:`SIZE_BUCKETS`.
        best_iou (Tensor): (G,) float, best IoU of each gt with any inside anchor
            (0 when no anchor is inside).
        best_level (Tensor): (G,) long, level of that best anchor (-1 when no inside anchor
            overlaps the gt).
        pos_per_level_by_bucket (Tensor): (L, 3) long, positives per level split by the
            size bucket of the gt they are assigned to.
        pos_anchors (Tensor): (P, 4) float, positive anchors (x1, y1, x2, y2).
        pos_levels (Tensor): (P,) long, level of each positive anchor.
        pos_gt (Tensor): (P,) long, 0-based gt index of each positive anchor.
    """

    num_anchors_per_level: Tensor
    num_inside_per_level: Tensor
    pos_per_level: Tensor
    neg_per_level: Tensor
    ignored_per_level: Tensor
    pos_per_gt: Tensor
    gt_areas: Tensor
    gt_buckets: Tensor
    best_iou: Tensor
    best_level: Tensor
    pos_per_level_by_bucket: Tensor
    pos_anchors: Tensor
    pos_levels: Tensor
    pos_gt: Tensor


class BatchAssignStats(NamedTuple):
    """Assignment statistics of a batch, as 0-d or (L,) tensors on the input's device.

    Attributes:
        pos_per_level (Tensor): (L,) long, positive anchors per level, summed over images.
        num_gts (Tensor): () long, gts in the batch.
        num_gts_without_pos (Tensor): () long, gts that no anchor is assigned to.
        num_neg (Tensor): () long, negative anchors (valid ones only).
        num_ignored (Tensor): () long, ignored anchors (valid ones only).
    """

    pos_per_level: Tensor
    num_gts: Tensor
    num_gts_without_pos: Tensor
    num_neg: Tensor
    num_ignored: Tensor


def size_buckets(areas: Tensor) -> Tensor:
    """COCO size bucket of each box area.

    Args:
        areas (Tensor): (G,) float, box areas in pixels^2.

    Returns:
        Tensor: (G,) long, 0 = small (< 32^2), 1 = medium (< 96^2), 2 = large.
    """
    return (areas >= SMALL_MAX_AREA).long() + (areas >= MEDIUM_MAX_AREA).long()


def level_ids(level_sizes: Sequence[int], device: Optional[torch.device] = None) -> Tensor:
    """Level index of every anchor of the concatenated levels.

    Args:
        level_sizes (Sequence[int]): N_l, anchors per level (L entries).
        device (torch.device, optional): device of the result.

    Returns:
        Tensor: (N,) long with N = sum(N_l).
    """
    sizes = torch.as_tensor(list(level_sizes), dtype=torch.long, device=device)
    return torch.repeat_interleave(
        torch.arange(len(level_sizes), device=device), sizes, output_size=int(sum(level_sizes))
    )


def per_image_stats(
    anchors_per_level: Sequence[Tensor],
    inside_flags: Tensor,
    gt_inds: Tensor,
    gt_bboxes: Tensor,
) -> ImageAssignStats:
    """Statistics of the assignment of one image.

    Args:
        anchors_per_level (Sequence[Tensor]): L tensors (N_l, 4), anchors of each level as the
            prior generator returns them (x1, y1, x2, y2).
        inside_flags (Tensor): (N,) bool, N = sum(N_l): anchors given to the assigner (valid
            flags and ``anchor_inside_flags``).
        gt_inds (Tensor): (N_inside,) long, ``AssignResult.gt_inds`` of the inside anchors, in
            their order in the concatenated levels.
        gt_bboxes (Tensor): (G, 4) float, gt boxes (x1, y1, x2, y2) in the network input.

    Returns:
        ImageAssignStats: see its attributes for shapes.
    """
    from mmdet.structures.bbox import bbox_overlaps

    num_levels = len(anchors_per_level)
    sizes = [int(a.shape[0]) for a in anchors_per_level]
    anchors = torch.cat(list(anchors_per_level), dim=0)
    device = anchors.device
    inside_flags = inside_flags.to(device=device, dtype=torch.bool)
    if inside_flags.shape != (anchors.shape[0],):
        raise ValueError(
            f'inside_flags has shape {tuple(inside_flags.shape)}, expected ({anchors.shape[0]},)'
        )
    num_inside = int(inside_flags.sum())
    if gt_inds.shape != (num_inside,):
        raise ValueError(
            f'gt_inds has shape {tuple(gt_inds.shape)}, expected ({num_inside},) '
            '(one entry per inside anchor)'
        )
    gt_inds = gt_inds.to(device=device, dtype=torch.long)
    gt_bboxes = gt_bboxes.to(device=device, dtype=torch.float32).reshape(-1, 4)
    num_gts = gt_bboxes.shape[0]

    levels = level_ids(sizes, device)[inside_flags]  # (N_inside,)
    inside_anchors = anchors[inside_flags]
    pos = gt_inds > 0

    def per_level(mask: Tensor) -> Tensor:
        return torch.bincount(levels[mask], minlength=num_levels)

    widths = (gt_bboxes[:, 2] - gt_bboxes[:, 0]).clamp(min=0)
    heights = (gt_bboxes[:, 3] - gt_bboxes[:, 1]).clamp(min=0)
    areas = widths * heights
    buckets = size_buckets(areas)

    pos_gt = gt_inds[pos] - 1
    pos_levels = levels[pos]
    pos_per_gt = torch.bincount(pos_gt, minlength=num_gts)[:num_gts]
    by_bucket = torch.zeros(num_levels * len(SIZE_BUCKETS), dtype=torch.long, device=device)
    if pos_gt.numel():
        by_bucket.index_add_(
            0,
            pos_levels * len(SIZE_BUCKETS) + buckets[pos_gt],
            torch.ones_like(pos_levels),
        )

    if num_gts and num_inside:
        best_iou, best_idx = bbox_overlaps(gt_bboxes, inside_anchors).max(dim=1)
        best_level = torch.where(best_iou > 0, levels[best_idx], torch.full_like(best_idx, -1))
    else:
        best_iou = gt_bboxes.new_zeros(num_gts)
        best_level = torch.full((num_gts,), -1, dtype=torch.long, device=device)

    return ImageAssignStats(
        num_anchors_per_level=torch.tensor(sizes, dtype=torch.long, device=device),
        num_inside_per_level=per_level(torch.ones_like(pos)),
        pos_per_level=per_level(pos),
        neg_per_level=per_level(gt_inds == NEGATIVE),
        ignored_per_level=per_level(gt_inds == IGNORED),
        pos_per_gt=pos_per_gt,
        gt_areas=areas,
        gt_buckets=buckets,
        best_iou=best_iou,
        best_level=best_level,
        pos_per_level_by_bucket=by_bucket.view(num_levels, len(SIZE_BUCKETS)),
        pos_anchors=inside_anchors[pos],
        pos_levels=pos_levels,
        pos_gt=pos_gt,
    )


def batch_assign_stats(
    gt_inds: Tensor,
    level_sizes: Sequence[int],
    num_gts: Tensor,
    valid: Optional[Tensor] = None,
    num_gt_slots: Optional[int] = None,
) -> BatchAssignStats:
    """Positives per level and gts without a positive anchor, for a batch, without host sync.

    Args:
        gt_inds (Tensor): (B, N) long, N = sum(N_l), anchors of all levels concatenated;
            0 = negative, -1 = ignored, k > 0 = assigned to gt k - 1 of that image.
        level_sizes (Sequence[int]): N_l, anchors per level (L Python ints).
        num_gts (Tensor): (B,) long, number of real gts of each image.
        valid (Tensor, optional): (B, N) bool, anchors the assigner saw (valid and inside);
            others are not counted as negative or ignored. Defaults to all anchors.
        num_gt_slots (int, optional): an upper bound G on the gt indices (the padded gt
            count). With it, covered gts are counted with one scatter into (B, G + 1)
            instead of a sort of (B, N).

    Returns:
        BatchAssignStats: tensors on ``gt_inds.device``; ``pos_per_level`` is (L,).
    """
    if gt_inds.dim() != 2 or gt_inds.shape[1] != sum(level_sizes):
        raise ValueError(
            f'gt_inds has shape {tuple(gt_inds.shape)}, expected (B, {sum(level_sizes)}) '
            f'for level sizes {list(level_sizes)}'
        )
    if valid is not None:
        gt_inds = gt_inds.masked_fill(~valid, -2)  # neither positive, negative nor ignored
    pos = gt_inds > 0  # (B, N)

    # Per level sums from one cumulative sum over anchors: cs[end_l] - cs[start_l].
    bounds = [0]
    for size in level_sizes:
        bounds.append(bounds[-1] + int(size))
    cumsum = torch.nn.functional.pad(pos.sum(0).cumsum(0), (1, 0))  # (N + 1,)
    bounds_t = device_constant(tuple(bounds), gt_inds.device)  # no copy per step
    pos_per_level = cumsum[bounds_t[1:]] - cumsum[bounds_t[:-1]]

    # A gt is covered when its index occurs among the positives: count distinct positive
    # values per row (sort, then count the first occurrence of each value).
    if num_gt_slots is not None:
        covered = torch.zeros(gt_inds.size(0), num_gt_slots + 1, device=gt_inds.device)
        covered.scatter_(1, gt_inds.clamp(min=0), 1.0)
        num_covered = covered[:, 1:].sum().long()
    else:
        ordered = gt_inds.clamp(min=0).sort(dim=1).values
        first = torch.ones_like(ordered, dtype=torch.bool)
        first[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
        num_covered = (first & (ordered > 0)).sum()
    total_gts = num_gts.to(gt_inds.device).long().sum()
    return BatchAssignStats(
        pos_per_level=pos_per_level,
        num_gts=total_gts,
        num_gts_without_pos=total_gts - num_covered,
        num_neg=(gt_inds == NEGATIVE).sum(),
        num_ignored=(gt_inds == IGNORED).sum(),
    )


def log_counts(
    gt_inds: Tensor,
    level_ids: Tensor,
    num_levels: int,
    gt_mask: Tensor,
    read_with: Sequence[Tensor] = (),
) -> Tensor:
    """What the training log shows of a batch's assignment, without host sync.

    ``batch_assign_stats``'s ``pos_per_level``, ``num_gts`` and the gts with a positive
    anchor, in a dozen ops: the heads compute it at every step (read back with the count of
    positives), so it skips what only the offline statistics need.

    Args:
        gt_inds (Tensor): (B, N) long, the assignment (outside anchors are -1).
        level_ids (Tensor): (N,) long, level of each anchor.
        num_levels (int): L.
        gt_mask (Tensor): (B, G) bool, real gts; ``gt_inds`` <= G.
        read_with (Sequence[Tensor]): 0-d long values the caller reads back with the
            counts (the heads: the number of sampled positives); they come first.

    Returns:
        Tensor: (len(read_with) + 2 + L,) long: ``read_with``, the number of gts, the
        number of gts that some anchor is assigned to, and the positives per level
        (``log_values`` turns the last 2 + L into log keys).
    """
    pos_per_anchor = (gt_inds > 0).sum(dim=0)  # (N,)
    pos_per_level = gt_inds.new_zeros(num_levels).index_add_(0, level_ids, pos_per_anchor)
    covered = gt_inds.new_zeros(gt_inds.size(0), gt_mask.size(1) + 1)  # slot 0: not positive
    covered.scatter_(1, gt_inds.clamp(min=0), 1)
    totals = torch.stack([*read_with, gt_mask.sum(), covered[:, 1:].sum()])
    return torch.cat([totals, pos_per_level])


def log_values(counts: Sequence[float], num_images: int) -> Dict[str, float]:
    """The training-log keys from ``log_counts``, read back.

    Args:
        counts (Sequence[float]): ``log_counts``'s 2 + L values (without ``read_with``).
        num_images (int): B.

    Returns:
        dict: ``train/assign/pos_l{l}`` (positives per image on level l) and
        ``train/assign/gts_without_pos`` (the share of the batch's gts that no anchor is
        assigned to).
    """
    num_gts, covered, *per_level = counts
    out = {f'train/assign/pos_l{lvl}': v / max(num_images, 1) for lvl, v in enumerate(per_level)}
    out['train/assign/gts_without_pos'] = (num_gts - covered) / max(num_gts, 1.0)
    return out


def _quantiles(values: Tensor) -> Dict[str, float]:
    if values.numel() == 0:
        return {}
    q = torch.quantile(values.double(), torch.tensor(IOU_QUANTILES, dtype=torch.float64))
    return {f'p{round(p * 100)}': float(v) for p, v in zip(IOU_QUANTILES, q)}


def _share(num: float, den: float) -> float:
    return float(num) / den if den else 0.0


def pos_per_gt_histogram(pos_per_gt: Tensor) -> Dict[str, int]:
    """Histogram of positives per gt over :data:`POS_PER_GT_LABELS`.

    Args:
        pos_per_gt (Tensor): (G,) long.

    Returns:
        dict[str, int]: label -> number of gts, in bin order.
    """
    hist = {}
    for label, (low, high) in zip(POS_PER_GT_LABELS, POS_PER_GT_BINS):
        hist[label] = int(((pos_per_gt >= low) & (pos_per_gt < high)).sum())
    hist[POS_PER_GT_LABELS[-1]] = int((pos_per_gt >= POS_PER_GT_BINS[-1][1]).sum())
    return hist


def iou_histogram(best_iou: Tensor, bins: int = IOU_HIST_BINS) -> Dict[str, List[float]]:
    """Histogram of IoUs on [0, 1] with equal-width bins.

    Args:
        best_iou (Tensor): (G,) float.
        bins (int): number of bins.

    Returns:
        dict: ``edges`` (bins + 1 floats) and ``counts`` (bins ints); 1.0 falls in the last bin.
    """
    idx = (best_iou.double().clamp(0, 1) * bins).floor().long().clamp(max=bins - 1)
    counts = torch.bincount(idx, minlength=bins)
    return {
        'edges': [i / bins for i in range(bins + 1)],
        'counts': [int(c) for c in counts],
    }


def summarize(
    stats: Sequence[ImageAssignStats],
    *,
    level_names: Optional[Sequence[str]] = None,
    pos_iou_thr: Optional[float] = None,
) -> dict:
    """Summarize per-image statistics into a JSON-serialisable dict.

    Args:
        stats (Sequence[ImageAssignStats]): one entry per image, all with the same L.
        level_names (Sequence[str], optional): L names, e.g. ``'P3 (stride 8)'``; defaults to
            ``'level 0'``, ...
        pos_iou_thr (float, optional): the assigner's positive threshold; when given the
            summary counts gts whose best IoU is below it (positive only through low-quality
            matching, or not at all).

    Returns:
        dict: keys ``num_images``, ``num_gts``, ``anchors``, ``levels``, ``pos_per_gt``,
        ``gts_without_pos``, ``best_iou`` (see ``docs/diagnostics.md``).
    """
    if not stats:
        raise ValueError('summarize() needs the statistics of at least one image')
    num_images = len(stats)
    num_levels = int(stats[0].pos_per_level.numel())
    if level_names is None:
        level_names = [f'level {i}' for i in range(num_levels)]
    if len(level_names) != num_levels:
        raise ValueError(f'{len(level_names)} level names for {num_levels} levels')

    def total(field: str) -> Tensor:
        return torch.stack([getattr(s, field).cpu() for s in stats]).sum(0)

    def cat(field: str) -> Tensor:
        return torch.cat([getattr(s, field).cpu() for s in stats])

    anchors_l = total('num_anchors_per_level')
    inside_l = total('num_inside_per_level')
    pos_l = total('pos_per_level')
    neg_l = total('neg_per_level')
    ign_l = total('ignored_per_level')
    by_bucket = total('pos_per_level_by_bucket')
    pos_per_gt = cat('pos_per_gt')
    buckets = cat('gt_buckets')
    best_iou = cat('best_iou')
    best_level = cat('best_level')
    num_gts = int(pos_per_gt.numel())
    num_pos = int(pos_l.sum())

    levels = []
    for i, name in enumerate(level_names):
        levels.append(
            {
                'name': name,
                'anchors_per_image': int(anchors_l[i]) / num_images,
                'inside_per_image': int(inside_l[i]) / num_images,
                'positives': int(pos_l[i]),
                'positives_per_image': int(pos_l[i]) / num_images,
                'positive_share': _share(pos_l[i], num_pos),
                'positives_by_size': {b: int(by_bucket[i, j]) for j, b in enumerate(SIZE_BUCKETS)},
                'negatives_per_image': int(neg_l[i]) / num_images,
                'ignored_per_image': int(ign_l[i]) / num_images,
                'gts_best_here': int((best_level == i).sum()),
            }
        )

    unmatched = pos_per_gt == 0
    by_size = {}
    for j, bucket in enumerate(SIZE_BUCKETS):
        in_bucket = buckets == j
        n = int(in_bucket.sum())
        by_size[bucket] = {
            'num_gts': n,
            'without_pos': int((unmatched & in_bucket).sum()),
            'share_without_pos': _share((unmatched & in_bucket).sum(), n),
            'mean_pos_per_gt': float(pos_per_gt[in_bucket].double().mean()) if n else 0.0,
            'mean_best_iou': float(best_iou[in_bucket].double().mean()) if n else 0.0,
        }

    best = {
        'mean': float(best_iou.double().mean()) if num_gts else 0.0,
        'quantiles': _quantiles(best_iou),
        'histogram': iou_histogram(best_iou),
    }
    if pos_iou_thr is not None:
        below = best_iou < pos_iou_thr
        best['pos_iou_thr'] = float(pos_iou_thr)
        best['below_pos_iou_thr'] = int(below.sum())
        best['share_below_pos_iou_thr'] = _share(below.sum(), num_gts)

    return {
        'num_images': num_images,
        'num_gts': num_gts,
        'gts_per_image': num_gts / num_images,
        'anchors': {
            'total_per_image': int(anchors_l.sum()) / num_images,
            'inside_per_image': int(inside_l.sum()) / num_images,
            'outside_per_image': int(anchors_l.sum() - inside_l.sum()) / num_images,
            'positives': num_pos,
            'positives_per_image': num_pos / num_images,
            'negatives': int(neg_l.sum()),
            'negatives_per_image': int(neg_l.sum()) / num_images,
            'ignored': int(ign_l.sum()),
            'ignored_per_image': int(ign_l.sum()) / num_images,
        },
        'levels': levels,
        'pos_per_gt': {
            'mean': float(pos_per_gt.double().mean()) if num_gts else 0.0,
            'min': int(pos_per_gt.min()) if num_gts else 0,
            'max': int(pos_per_gt.max()) if num_gts else 0,
            'histogram': pos_per_gt_histogram(pos_per_gt),
        },
        'gts_without_pos': {
            'total': int(unmatched.sum()),
            'share': _share(unmatched.sum(), num_gts),
            'by_size': by_size,
        },
        'best_iou': best,
    }


def level_name(index: int, stride: Sequence[float]) -> str:
    """Readable name of a pyramid level, e.g. ``'L0 (stride 8)'`` or ``'L1 (stride 8x16)'``.

    Args:
        index (int): level index.
        stride (Sequence[float]): (stride_w, stride_h) or a single number.
    """
    if isinstance(stride, (int, float)):
        stride = (stride, stride)
    sw, sh = (int(s) if float(s).is_integer() else s for s in stride[:2])
    text = f'{sw}' if sw == sh else f'{sw}x{sh}'
    return f'L{index} (stride {text})'


def featmap_sizes(pad_shape: Sequence[int], strides: Sequence[Sequence[float]]) -> List[tuple]:
    """Feature-map sizes of a padded input, as stride-2 convs with padding produce them.

    Args:
        pad_shape (Sequence[int]): (H, W) of the padded network input.
        strides (Sequence[Sequence[float]]): L strides (stride_w, stride_h), as
            ``prior_generator.strides``.

    Returns:
        list[tuple[int, int]]: L sizes (H_l, W_l) = (ceil(H / stride_h), ceil(W / stride_w)).
    """
    h, w = int(pad_shape[0]), int(pad_shape[1])
    out = []
    for stride in strides:
        sw, sh = (stride, stride) if isinstance(stride, (int, float)) else stride[:2]
        out.append((math.ceil(h / sh), math.ceil(w / sw)))
    return out
