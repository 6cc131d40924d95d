"""Assignment statistics on hand-made examples whose counts are worked out by hand."""

import pytest
import torch

from mmdet_anchorloss.diagnostics import (
    BatchAssignStats,
    ImageAssignStats,
    batch_assign_stats,
    per_image_stats,
    size_buckets,
    summarize,
)
from mmdet_anchorloss.diagnostics.assignment_stats import (
    featmap_sizes,
    level_name,
    log_counts,
    log_values,
)

# Two levels on a 16 x 32 image. L0: 8x8 anchors tiling it (2 rows x 4 columns, order y, x);
# L1: two 16x16 anchors. L2: one big anchor that hangs outside the image.
L0 = torch.tensor(
    [[x, y, x + 8, y + 8] for y in (0, 8) for x in (0, 8, 16, 24)], dtype=torch.float32
)
L1 = torch.tensor([[0, 0, 16, 16], [16, 0, 32, 16]], dtype=torch.float32)
L2 = torch.tensor([[-8, -8, 40, 40]], dtype=torch.float32)
ANCHORS = [L0, L1, L2]
INSIDE = torch.tensor([True] * 10 + [False])
GTS = torch.tensor(
    [
        [0, 0, 8, 8],  # A: area 64, small; IoU 1 with L0[0]
        [16, 0, 32, 16],  # B: area 256, small; IoU 1 with L1[1], 0.25 with four L0 anchors
        [9, 9, 11, 11],  # C: area 4, small; IoU 4/64 with L0[5]
        [100, 100, 200, 200],  # D: area 10000, large; overlaps no anchor
    ],
    dtype=torch.float32,
)
# Hand assignment of the 10 inside anchors (0 negative, -1 ignored, k gt k-1):
# L0: A, neg, ign, ign, neg, neg, ign, ign | L1: ign, B.
GT_INDS = torch.tensor([1, 0, -1, -1, 0, 0, -1, -1, -1, 2])


def image_stats() -> ImageAssignStats:
    return per_image_stats(ANCHORS, INSIDE, GT_INDS, GTS)


def test_per_image_stats_counts_and_shapes():
    st = image_stats()
    assert st.num_anchors_per_level.tolist() == [8, 2, 1]
    assert st.num_inside_per_level.tolist() == [8, 2, 0]
    assert st.pos_per_level.tolist() == [1, 1, 0]
    assert st.neg_per_level.tolist() == [3, 0, 0]
    assert st.ignored_per_level.tolist() == [4, 1, 0]
    assert st.pos_per_gt.tolist() == [1, 1, 0, 0]
    assert st.gt_areas.tolist() == [64, 256, 4, 10000]
    assert st.gt_buckets.tolist() == [0, 0, 0, 2]
    assert st.best_iou.tolist() == pytest.approx([1.0, 1.0, 4 / 64, 0.0], abs=1e-5)
    assert st.best_level.tolist() == [0, 1, 0, -1]  # -1: no overlapping anchor at all
    assert st.pos_per_level_by_bucket.tolist() == [[1, 0, 0], [1, 0, 0], [0, 0, 0]]
    assert st.pos_anchors.tolist() == [[0, 0, 8, 8], [16, 0, 32, 16]]
    assert st.pos_levels.tolist() == [0, 1]
    assert st.pos_gt.tolist() == [0, 1]
    # dtypes and shapes the docstring claims
    for name in ('pos_per_level', 'neg_per_level', 'ignored_per_level', 'num_inside_per_level'):
        assert getattr(st, name).shape == (3,) and getattr(st, name).dtype == torch.long
    assert st.pos_per_gt.shape == (4,) and st.best_iou.shape == (4,)
    assert st.pos_per_level_by_bucket.shape == (3, 3)
    assert st.pos_anchors.shape == (2, 4)


def test_per_image_stats_without_gts():
    gt_inds = torch.zeros(10, dtype=torch.long)
    st = per_image_stats(ANCHORS, INSIDE, gt_inds, torch.zeros(0, 4))
    assert st.pos_per_level.tolist() == [0, 0, 0]
    assert st.neg_per_level.tolist() == [8, 2, 0]
    assert st.pos_per_gt.shape == (0,) and st.best_iou.shape == (0,)
    assert st.pos_anchors.shape == (0, 4)


def test_per_image_stats_rejects_mismatched_gt_inds():
    with pytest.raises(ValueError, match=r'expected \(10,\)'):
        per_image_stats(ANCHORS, INSIDE, GT_INDS[:9], GTS)


def test_summarize_counts_by_hand():
    empty = per_image_stats(ANCHORS, INSIDE, torch.zeros(10, dtype=torch.long), torch.zeros(0, 4))
    summary = summarize([image_stats(), empty], level_names=['a', 'b', 'c'], pos_iou_thr=0.5)
    assert summary['num_images'] == 2 and summary['num_gts'] == 4
    anchors = summary['anchors']
    assert anchors['total_per_image'] == 11 and anchors['inside_per_image'] == 10
    assert anchors['outside_per_image'] == 1
    assert anchors['positives'] == 2 and anchors['positives_per_image'] == 1.0
    assert anchors['negatives'] == 3 + 10 and anchors['ignored'] == 5
    assert [lv['positives'] for lv in summary['levels']] == [1, 1, 0]
    assert [lv['positives_per_image'] for lv in summary['levels']] == [0.5, 0.5, 0.0]
    assert [lv['positive_share'] for lv in summary['levels']] == [0.5, 0.5, 0.0]
    assert [lv['gts_best_here'] for lv in summary['levels']] == [2, 1, 0]
    assert summary['levels'][0]['positives_by_size'] == {'small': 1, 'medium': 0, 'large': 0}
    ppg = summary['pos_per_gt']
    assert (ppg['mean'], ppg['min'], ppg['max']) == (0.5, 0, 1)
    assert ppg['histogram']['0'] == 2 and ppg['histogram']['1'] == 2
    assert sum(ppg['histogram'].values()) == 4
    unmatched = summary['gts_without_pos']
    assert unmatched['total'] == 2 and unmatched['share'] == 0.5
    assert unmatched['by_size']['small'] == {
        'num_gts': 3,
        'without_pos': 1,
        'share_without_pos': pytest.approx(1 / 3),
        'mean_pos_per_gt': pytest.approx(2 / 3),
        'mean_best_iou': pytest.approx((2 + 4 / 64) / 3, abs=1e-6),
    }
    assert unmatched['by_size']['large']['without_pos'] == 1
    assert unmatched['by_size']['medium']['num_gts'] == 0
    best = summary['best_iou']
    assert best['below_pos_iou_thr'] == 2 and best['share_below_pos_iou_thr'] == 0.5
    assert best['quantiles']['p0'] == 0.0 and best['quantiles']['p100'] == pytest.approx(1.0)
    assert best['quantiles']['p50'] == pytest.approx((4 / 64 + 1) / 2, abs=1e-6)
    counts = best['histogram']['counts']
    assert len(counts) == 20 and counts[0] == 1 and counts[1] == 1 and counts[-1] == 2


def test_summarize_needs_stats():
    with pytest.raises(ValueError):
        summarize([])


def test_batch_assign_stats_by_hand():
    # image 0: the hand example on L0, L1 (10 anchors); image 1: no gt, all negative.
    gt_inds = torch.stack([GT_INDS, torch.zeros(10, dtype=torch.long)])
    out = batch_assign_stats(gt_inds, [8, 2], torch.tensor([4, 0]))
    assert isinstance(out, BatchAssignStats)
    assert out.pos_per_level.tolist() == [1, 1] and out.pos_per_level.shape == (2,)
    assert out.num_gts.item() == 4 and out.num_gts.shape == ()
    assert out.num_gts_without_pos.item() == 2
    assert out.num_neg.item() == 3 + 10 and out.num_ignored.item() == 5


def test_batch_assign_stats_valid_mask_and_zero_size_level():
    gt_inds = torch.tensor([[2, 2, -1, 0, 1, 0]])
    valid = torch.tensor([[True, True, True, False, True, True]])
    out = batch_assign_stats(gt_inds, [2, 0, 4], torch.tensor([3]), valid=valid)
    assert out.pos_per_level.tolist() == [2, 0, 1]
    assert out.num_gts_without_pos.item() == 1  # gt 3 (index 2) has nothing
    assert out.num_neg.item() == 1 and out.num_ignored.item() == 1


def test_batch_matches_per_image():
    gen = torch.Generator().manual_seed(0)
    sizes = [40, 10, 3]
    num_gts = torch.tensor([5, 0, 2, 7])
    rows, per_image = [], []
    for n in num_gts.tolist():
        row = torch.randint(-1, n + 1, (53,), generator=gen)
        rows.append(row)
        anchors = [torch.rand(s, 4, generator=gen) for s in sizes]
        gts = torch.rand(n, 4, generator=gen)
        per_image.append(per_image_stats(anchors, torch.ones(53, dtype=torch.bool), row, gts))
    out = batch_assign_stats(torch.stack(rows), sizes, num_gts)
    assert out.pos_per_level.tolist() == sum(s.pos_per_level for s in per_image).tolist()
    assert out.num_gts_without_pos.item() == sum(int((s.pos_per_gt == 0).sum()) for s in per_image)
    assert out.num_neg.item() == sum(int(s.neg_per_level.sum()) for s in per_image)


def test_batch_assign_stats_rejects_wrong_width():
    with pytest.raises(ValueError, match='expected'):
        batch_assign_stats(torch.zeros(2, 5, dtype=torch.long), [3, 3], torch.tensor([0, 0]))


def test_size_buckets_edges():
    areas = torch.tensor([0.0, 1023.0, 1024.0, 9215.0, 9216.0, 1e6])
    assert size_buckets(areas).tolist() == [0, 0, 1, 1, 2, 2]


def test_featmap_sizes_and_level_name():
    ssd_strides = [(s, s) for s in (8, 16, 32, 64, 100, 300)]
    assert featmap_sizes((300, 300), ssd_strides) == [
        (38, 38),
        (19, 19),
        (10, 10),
        (5, 5),
        (3, 3),
        (1, 1),
    ]
    assert featmap_sizes((160, 192), [(8.0, 8.0), (128.0, 128.0)]) == [(20, 24), (2, 2)]
    assert level_name(0, (8.0, 8.0)) == 'L0 (stride 8)'
    assert level_name(2, (8, 16)) == 'L2 (stride 8x16)'


def test_log_counts_are_the_batch_statistics_the_log_shows():
    """``log_counts`` (the heads' per-step counts) against ``batch_assign_stats``, with
    uncovered gts, padding slots, outside anchors and an image without gts."""
    gen = torch.Generator().manual_seed(3)
    sizes = [40, 10, 3]
    num_gts = torch.tensor([5, 0, 2, 7])
    G = 9
    gt_inds = torch.stack(
        [torch.randint(-1, n + 1, (53,), generator=gen) // 2 for n in num_gts.tolist()]
    )
    mask = torch.arange(G)[None] < num_gts[:, None]
    level_ids = torch.repeat_interleave(torch.arange(3), torch.tensor(sizes))
    ref = batch_assign_stats(gt_inds, sizes, num_gts, num_gt_slots=G)
    seven = torch.tensor(7)
    read = log_counts(gt_inds, level_ids, 3, mask, read_with=[seven])
    assert read[0] == 7  # what the caller reads back with them comes first
    counts = read[1:]
    assert counts[0] == ref.num_gts == 14
    assert counts[0] - counts[1] == ref.num_gts_without_pos > 0
    assert counts[2:].tolist() == ref.pos_per_level.tolist()
    assert torch.equal(log_counts(gt_inds, level_ids, 3, mask), counts)
    values = log_values(counts.tolist(), 4)
    assert values['train/assign/pos_l1'] == ref.pos_per_level[1].item() / 4
    assert values['train/assign/gts_without_pos'] == ref.num_gts_without_pos.item() / 14
    assert log_values([0, 0, 0, 0, 0], 2)['train/assign/gts_without_pos'] == 0.0  # no gts
