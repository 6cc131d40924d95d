"""Level maps and anchor rows: the one place that knows how they line up.

A head predicts, for each level l, a map (B, A_l * K, H_l, W_l): K values (classes, or box
deltas) for each of A_l anchors at each location. mmdet orders the anchors of an image by
(level, y, x, anchor), N = sum over levels of N_l = H_l * W_l * A_l, so anchor n of level l
at local index i = n - start_l sits at location s = i // A_l, anchor a = i % A_l, and its
value k at flat position ((b * A_l + a) * K + k) * S_l + s of the level map, with
S_l = H_l * W_l. Everything here follows from that, without copying the maps.
"""

import itertools
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..kernels.sync_policy import device_constant, remember, upload


def class_planes(x: Tensor, num_base: int) -> Tensor:
    """(B, A * K, H, W) level map -> (B, A, K, H * W) view (contiguous)."""
    B, AK, H, W = x.shape
    return x.contiguous().view(B, num_base, AK // num_base, H * W)


def anchor_planes(values: Tensor, planes_shape: Sequence[int]) -> Tensor:
    """(B, N_l) per-anchor values of one level -> (B, A, 1, S), aligned with
    ``class_planes`` of that level (a view)."""
    B, A, _, S = planes_shape
    return values.reshape(B, S, A).transpose(1, 2).unsqueeze(2)


def levels_to_rows(maps: List[Tensor], channels: int) -> Tensor:
    """(B, A*K, H, W) maps of all levels -> (B, N, K) (a copy), anchors in mmdet's order."""
    B = maps[0].size(0)
    return torch.cat([m.permute(0, 2, 3, 1).reshape(B, -1, channels) for m in maps], dim=1)


class MapIndex(NamedTuple):
    """Where selected entries lie in the level maps.

    Attributes:
        level (Tensor): (P,) long, level of each selected anchor.
        flat (Tensor): (P, K') long, flat index into that level's map of each entry.
    """

    level: Tensor
    flat: Tensor


def map_index(
    maps: Sequence[Tensor],
    num_base_priors: Sequence[int],
    batch_inds: Tensor,
    anchor_inds: Tensor,
    channel_inds: Tensor,
) -> MapIndex:
    """Flat indices of (image, anchor, channel) entries in their level's map (no host sync).

    Args:
        maps (Sequence[Tensor]): L maps (B, A_l * K, H_l, W_l) (only shapes are read).
        num_base_priors (Sequence[int]): A_l per level.
        batch_inds, anchor_inds (Tensor): (P,) image and anchor (into N) of each row.
        channel_inds (Tensor): (P, K') channels wanted per row (broadcast against (P, 1)).

    Returns:
        MapIndex: level (P,) and flat (P, K').
    """
    device = anchor_inds.device
    sizes = [a * m.size(2) * m.size(3) for m, a in zip(maps, num_base_priors)]
    ends = tuple(itertools.accumulate(sizes))
    # host constants of the level shapes: on the device once, not copied every step
    level = torch.bucketize(anchor_inds.contiguous(), device_constant(ends, device), right=True)
    per_level = device_constant(
        tuple(
            (end - size, a, m.size(1) // a, m.size(2) * m.size(3))
            for m, a, size, end in zip(maps, num_base_priors, sizes, ends)
        ),
        device,
    )[level]
    start, A, K, S = per_level.unbind(1)
    local = anchor_inds - start
    s_idx, a_idx = local // A, local % A
    flat = (((batch_inds * A + a_idx) * K)[:, None] + channel_inds) * S[:, None] + s_idx[:, None]
    return MapIndex(level, flat)


def take(maps: Sequence[Tensor], index: MapIndex) -> Tensor:
    """The entries at ``index`` (P, K') read from the level maps; differentiable."""
    out = maps[0].new_zeros(index.flat.shape)
    for lvl, x in enumerate(maps):  # L gathers, no host sync
        on = (index.level == lvl)[:, None]
        out = torch.where(on, x.reshape(-1).take(index.flat.where(on, 0)), out)
    return out


def gather_anchor_rows(
    maps: Sequence[Tensor],
    num_base_priors: Sequence[int],
    batch_inds: Tensor,
    anchor_inds: Tensor,
    tables: Optional[dict] = None,
) -> Tensor:
    """Rows (P, K) of selected anchors, read straight from the level maps (no copy of them).

    Equal to ``levels_to_rows(maps, K)[batch_inds, anchor_inds]``; differentiable.

    Args:
        maps (Sequence[Tensor]): L maps (B, A_l * K, H_l, W_l).
        num_base_priors (Sequence[int]): A_l per level.
        batch_inds, anchor_inds (Tensor): (P,) image and anchor (into N) of each row.
        tables (dict, optional): where to keep the index table between calls (the anchor
            grid's ``tables``); without it the table is built anew.
    """
    # The maps are small (K box values per anchor): one copy of all levels and one gather
    # make a few ops, where a gather per level makes five per level, and as many again in
    # the backward. Where each anchor's values lie in that copy is a table per map shapes,
    # kept in ``tables`` (the anchor grid's, which lives as long as the grid).
    shapes = tuple(tuple(m.shape) for m in maps)
    first, stride = remember(
        {} if tables is None else tables,
        ('gather_anchor_rows', shapes, tuple(num_base_priors)),
        lambda: tuple(upload(t, anchor_inds.device) for t in row_table(shapes, num_base_priors)),
    )
    flat = torch.cat([m.reshape(-1) for m in maps])
    return flat.take(first[anchor_inds] + (batch_inds * stride[anchor_inds])[:, None])


def row_table(shapes: Tuple[Tuple[int, ...], ...], num_base_priors: Tuple[int, ...]):
    """Where the values of each anchor lie in the level maps concatenated flat.

    Args:
        shapes (tuple): L map shapes (B, A_l * K, H_l, W_l).
        num_base_priors (tuple): A_l per level.

    Returns:
        tuple[Tensor, Tensor]: (N, K) long, flat position of anchor n's K values for image
        0; (N,) long, the step from one image to the next. On the host.
    """
    firsts, strides, offset = [], [], 0
    for (B, AK, H, W), A in zip(shapes, num_base_priors):
        K, S = AK // A, H * W
        local = torch.arange(S * A)
        s, a = local // A, local % A
        firsts.append(offset + (a * K * S + s)[:, None] + torch.arange(K)[None] * S)
        strides.append(torch.full((S * A,), A * K * S))
        offset += B * AK * S
    return torch.cat(firsts), torch.cat(strides)
