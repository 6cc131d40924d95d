"""layout.py: level maps and anchor rows line up as mmdet orders anchors."""

import torch

from mmdet_anchorloss.core.layout import (
    anchor_planes,
    class_planes,
    gather_anchor_rows,
    levels_to_rows,
    map_index,
    take,
)

A = [3, 2]
K = 4


def _maps(B=2, sizes=((5, 6), (2, 3))):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(B, a * K, h, w, generator=gen) for a, (h, w) in zip(A, sizes)]


def test_levels_to_rows_follows_level_y_x_anchor():
    maps = _maps()
    rows = levels_to_rows(maps, K)
    assert rows.shape == (2, 3 * 5 * 6 + 2 * 2 * 3, K)
    # anchor 2 at location (y=1, x=4) of level 0: n = (1 * 6 + 4) * 3 + 2
    n = (1 * 6 + 4) * 3 + 2
    assert torch.equal(rows[1, n], maps[0][1, 2 * K : 3 * K, 1, 4])
    # anchor 1 at (y=1, x=0) of level 1
    n = 90 + (1 * 3 + 0) * 2 + 1
    assert torch.equal(rows[0, n], maps[1][0, 1 * K : 2 * K, 1, 0])


def test_gather_anchor_rows_equals_indexing_the_rows():
    maps = _maps()
    b = torch.tensor([0, 1, 1, 0, 1])
    n = torch.tensor([0, 89, 90, 101, 47])
    got = gather_anchor_rows(maps, A, b, n)
    assert got.shape == (5, K)
    assert torch.equal(got, levels_to_rows(maps, K)[b, n])


def test_gather_anchor_rows_keeps_a_table_per_map_shapes():
    """The index table is kept per map shapes: another batch size gets its own (the level
    offsets change with B), and a kept one gives the same rows."""
    tables = {}
    for B in (2, 3, 2):
        maps = _maps(B=B)
        b = torch.arange(B).repeat_interleave(4)
        n = torch.tensor([0, 89, 90, 101]).repeat(B)
        got = gather_anchor_rows(maps, A, b, n, tables)
        assert torch.equal(got, levels_to_rows(maps, K)[b, n])
    assert len(tables) == 2


def test_gather_anchor_rows_gradient_reaches_each_level():
    maps = [m.requires_grad_() for m in _maps()]
    b, n = torch.tensor([1, 0, 1]), torch.tensor([95, 7, 7])
    gather_anchor_rows(maps, A, b, n).sum().backward()
    assert maps[0].grad.sum() == 2 * K and maps[1].grad.sum() == K
    assert maps[0].grad[0, 1 * K : 2 * K, 0, 2].tolist() == [1.0] * K  # n = 7: y 0, x 2, a 1


def test_map_index_single_channel_and_gradient_flows_back():
    maps = [m.requires_grad_() for m in _maps()]
    b, n, c = torch.tensor([1, 0]), torch.tensor([95, 7]), torch.tensor([[3], [0]])
    index = map_index(maps, A, b, n, c)
    assert index.level.tolist() == [1, 0]
    vals = take(maps, index)
    rows = levels_to_rows([m.detach() for m in maps], K)
    assert torch.equal(vals[:, 0], torch.stack([rows[1, 95, 3], rows[0, 7, 0]]))
    vals.sum().backward()
    assert maps[0].grad.sum() == 1 and maps[1].grad.sum() == 1


def test_planes_views_align_classes_and_anchor_values():
    x = _maps()[0]
    planes = class_planes(x, A[0])
    assert planes.shape == (2, 3, K, 30)
    per_anchor = torch.arange(2 * 90.0).view(2, 90)
    aligned = anchor_planes(per_anchor, planes.shape)
    assert aligned.shape == (2, 3, 1, 30)
    # anchor a at location s has n = s * A + a
    assert aligned[1, 2, 0, 7] == per_anchor[1, 7 * 3 + 2]
