"""Parity on hand-made inputs that sit exactly on each boundary of the loss path.

IoU and IoF exactly at the assigner's thresholds (the float values are checked with
upstream's ``bbox_overlaps`` in each test), ties at a gt's best IoU across anchor-chunk
borders, ``RandomSampler`` with positives above, equal to and below the wanted count, and
backward through weighted and scaled sums of the losses. Each case compares with the
installed mmdet and with the number worked out by hand.
"""

import pytest
import torch
from helpers import (
    assert_grads_match,
    build,
    make_batch,
    retina_cfg,
    rpn_cfg,
    ssd_cfg,
    to_plugin,
    upstream_assign_stats,
)
from mmdet.models.task_modules.assigners import AssignResult, BboxOverlaps2D, MaxIoUAssigner
from mmdet.models.task_modules.samplers import RandomSampler
from mmdet.structures.bbox import bbox_overlaps
from mmengine.structures import InstanceData

from mmdet_anchorloss.assigners import BatchMaxIoUAssigner
from mmdet_anchorloss.core.sampling import sample_batch
from mmdet_anchorloss.core.structures import BatchAssignResult, pad_instances


def boxes(*rows):
    return torch.tensor(rows, dtype=torch.float32)


def exactly(value: float) -> torch.Tensor:
    """The float32 a threshold becomes when compared with a float32 IoU."""
    return torch.tensor(value, dtype=torch.float32)


def both(kw, anchors, gts, labels=None, ignore=None):
    """gt_inds of upstream ``MaxIoUAssigner`` and of ``BatchMaxIoUAssigner``, same input."""
    labels = torch.arange(len(gts)) if labels is None else labels
    args = (InstanceData(priors=anchors), InstanceData(bboxes=gts, labels=labels))
    ign = None if ignore is None else InstanceData(bboxes=ignore)
    ref = MaxIoUAssigner(**kw).assign(*args, ign)
    got = BatchMaxIoUAssigner(**kw).assign(*args, ign)
    assert torch.equal(got.labels, ref.labels)
    torch.testing.assert_close(got.max_overlaps, ref.max_overlaps, rtol=0, atol=0)
    return ref.gt_inds.tolist(), got.gt_inds.tolist()


# gt [0, 0, 10, 10]; anchor k covers its left part [0, 0, w_k, 10] (IoU w_k / 10) or
# extends it to [0, 0, 10, 20] (IoU 100 / 200): every IoU below is an exact float32.
GT = boxes([0, 0, 10, 10])
ANCHORS = boxes(
    [0, 0, 10, 10],  # IoU 1: the gt's best anchor
    [0, 0, 10, 20],  # IoU 0.5
    [0, 0, 4, 10],  # IoU 0.4
    [0, 0, 3, 10],  # IoU 0.3
    [0, 0, 1, 10],  # IoU 0.1
    [50, 50, 60, 60],  # IoU 0
)
IOUS = [1.0, 0.5, 0.4, 0.3, 0.1, 0.0]


def test_hand_made_ious_are_exact():
    iou = bbox_overlaps(GT, ANCHORS)[0]
    assert torch.equal(iou, torch.tensor(IOUS, dtype=torch.float32))
    for value in IOUS:  # float32(0.4) == float32(40) / float32(100): the boundary itself
        assert exactly(value).item() in iou.tolist()


@pytest.mark.parametrize(
    'kw, expected',
    [
        # IoU 0.5 == pos_iou_thr is positive; 0.4 == neg_iou_thr is not negative
        (dict(pos_iou_thr=0.5, neg_iou_thr=0.4), [1, 1, -1, 0, 0, 0]),
        # tuple: 0.1 == lower end is negative, 0.4 == upper end is not, 0 < 0.1 is not
        (dict(pos_iou_thr=0.5, neg_iou_thr=(0.1, 0.4)), [1, 1, -1, 0, 0, -1]),
        (dict(pos_iou_thr=0.4, neg_iou_thr=(0.0, 0.3)), [1, 1, 1, -1, 0, 0]),
        (dict(pos_iou_thr=0.3, neg_iou_thr=(0.1, 0.3)), [1, 1, 1, 1, 0, -1]),
    ],
)
def test_iou_exactly_at_pos_and_neg_thresholds(kw, expected):
    ref, got = both(kw, ANCHORS, GT)
    assert ref == got == expected


@pytest.mark.parametrize('min_pos_iou, claimed', [(0.3, True), (0.4, False)])
@pytest.mark.parametrize('assign_all', [True, False])
def test_best_iou_exactly_at_min_pos_iou(min_pos_iou, claimed, assign_all):
    # gt 1's best anchor is anchor 0 with IoU exactly 0.3 (below pos_iou_thr): a
    # low-quality match only when min_pos_iou <= 0.3.
    gts = boxes([100, 100, 110, 110], [0, 0, 10, 10])
    anchors = boxes([100, 100, 103, 110], [0, 0, 10, 10], [100, 100, 101, 110], [0, 0, 10, 20])
    assert bbox_overlaps(gts[:1], anchors[:1])[0, 0] == exactly(0.3)
    kw = dict(
        pos_iou_thr=0.5, neg_iou_thr=0.4, min_pos_iou=min_pos_iou, gt_max_assign_all=assign_all
    )
    ref, got = both(kw, anchors, gts)
    assert ref == got == [1 if claimed else 0, 2, 0, 2]


def test_tie_at_best_iou_exactly_at_min_pos_iou():
    # gt 0's best IoU (0.3) is reached by anchors 0 and 2; both tie, both are claimed
    gts = boxes([100, 100, 110, 110])
    anchors = boxes([100, 100, 103, 110], [0, 0, 10, 10], [107, 100, 110, 110])
    assert bbox_overlaps(gts, anchors)[0].tolist() == [exactly(0.3).item(), 0.0] + [
        exactly(0.3).item()
    ]
    ref, got = both(dict(pos_iou_thr=0.5, neg_iou_thr=0.2, min_pos_iou=0.3), anchors, gts)
    assert ref == got == [1, 0, 1]


@pytest.mark.parametrize('wrt_candidates', [True, False])
def test_iof_exactly_at_ignore_iof_thr(wrt_candidates):
    # Anchors far from the gt (negatives unless ignored). Ignore box [5, 0, 25, 10]:
    # anchor 0 [0, 0, 10, 10] overlaps it by 50: IoF 0.5 of the anchor (area 100) and
    # 0.25 of the ignore box (area 200); anchor 1 [0, 0, 11, 10] overlaps by 60.
    # Anchor 4 is the gt itself (without it the gt's best IoU would be 0 and, with
    # min_pos_iou=0, it would claim every IoU-0 anchor: mmdet issue 8289).
    gts = boxes([100, 100, 140, 140])
    anchors = boxes(
        [0, 0, 10, 10], [0, 0, 11, 10], [15, 0, 35, 10], [60, 60, 70, 70], [100, 100, 140, 140]
    )
    ignore = boxes([5, 0, 25, 10])
    thr = 0.5 if wrt_candidates else 0.25
    iof = (
        bbox_overlaps(anchors, ignore, mode='iof')[:, 0]
        if wrt_candidates
        else bbox_overlaps(ignore, anchors, mode='iof')[0]
    )
    assert iof[0] == exactly(thr) and iof[1] > exactly(thr) and iof[3] == 0
    kw = dict(
        pos_iou_thr=0.5,
        neg_iou_thr=0.4,
        ignore_iof_thr=thr,
        ignore_wrt_candidates=wrt_candidates,
    )
    ref, got = both(kw, anchors, gts, ignore=ignore)
    # exactly at the threshold: not ignored (negative); above it: ignored (-1)
    assert ref == got
    assert ref[:2] == [0, -1] and ref[3:] == [0, 1]
    assert ref[2] == (-1 if iof[2] > exactly(thr) else 0)


# ---------------------------------------------------------------- chunk borders
def _grid_case(seed: int, B: int = 2):
    """Integer boxes on a coarse grid: many exact IoU ties, duplicates among anchors."""
    gen = torch.Generator().manual_seed(seed)
    xy = torch.randint(0, 6, (40, 2), generator=gen).float() * 4
    wh = torch.randint(1, 4, (40, 2), generator=gen).float() * 4
    anchors = torch.cat([xy, xy + wh], dim=1)
    anchors = torch.cat([anchors, anchors[torch.randperm(40, generator=gen)[:20]]])  # 60
    gts = []
    for n in (5, 3, 4)[:B]:
        gxy = torch.randint(0, 6, (n, 2), generator=gen).float() * 4
        gwh = torch.randint(1, 4, (n, 2), generator=gen).float() * 4
        g = torch.cat([gxy, gxy + gwh], dim=1)
        g[-1] = g[0]  # a duplicate gt: later gts overwrite earlier ones
        gts.append(InstanceData(bboxes=g, labels=torch.randint(0, 3, (n,), generator=gen)))
    return anchors, gts


def _ties_across_chunks(anchors, gts, chunk):
    """How many gts have their best IoU at anchors of different chunks."""
    count = 0
    for gt in gts:
        iou = bbox_overlaps(gt.bboxes, anchors)
        for row in iou:
            tied = (row == row.max()).nonzero().squeeze(1)
            count += len(set((tied // chunk).tolist())) > 1
    return count


@pytest.mark.parametrize('assign_all', [True, False])
@pytest.mark.parametrize('seed', [0, 1, 2])
@pytest.mark.parametrize('anchors_per_chunk', [1, 3, 7])
def test_ties_across_chunk_borders(assign_all, seed, anchors_per_chunk):
    anchors, gts = _grid_case(seed)
    padded = pad_instances(gts, 'cpu')
    B, G = padded.mask.shape
    kw = dict(pos_iou_thr=0.7, neg_iou_thr=0.3, min_pos_iou=0.1, gt_max_assign_all=assign_all)
    assigner = BatchMaxIoUAssigner(max_chunk_elems=B * G * anchors_per_chunk, **kw)
    res = assigner.assign_batch(anchors, torch.ones(B, len(anchors), dtype=torch.bool), padded)
    assert _ties_across_chunks(anchors, gts, anchors_per_chunk) > 0  # what the case is for
    for i, gt in enumerate(gts):
        ref = MaxIoUAssigner(**kw).assign(InstanceData(priors=anchors), gt)
        assert res.gt_inds[i].tolist() == ref.gt_inds.tolist(), f'image {i}'
        assert torch.equal(res.max_overlaps[i], ref.max_overlaps)
        low = (ref.gt_inds > 0) & (ref.max_overlaps < 0.7)
        assert i == 1 or low.any()  # low-quality matches decide the result


@pytest.mark.parametrize(
    'assign_all, expected',
    [(False, [0, 1, 0, 0, -1, 0, 0, -1, 0]), (True, [0, 1, 0, 0, 1, 0, 0, 1, 0])],
)
def test_tie_in_every_chunk(assign_all, expected):
    # gt's best IoU (0.5) is reached by anchors 1, 4 and 7 (identical boxes in three
    # chunks of 3); with gt_max_assign_all=False upstream gives it the first (anchor 1),
    # with True all three.
    gt = boxes([0, 0, 10, 10])
    far = [200, 200, 210, 210]
    tie = [0, 0, 10, 20]
    anchors = boxes(far, tie, far, far, tie, far, far, tie, far)
    assert bbox_overlaps(gt, anchors[1:2])[0, 0] == exactly(0.5)
    kw = dict(pos_iou_thr=0.6, neg_iou_thr=0.4, min_pos_iou=0.1, gt_max_assign_all=assign_all)
    gts = InstanceData(bboxes=gt, labels=torch.tensor([0]))
    ref = MaxIoUAssigner(**kw).assign(InstanceData(priors=anchors), gts)
    got = BatchMaxIoUAssigner(max_chunk_elems=3, **kw).assign_batch(
        anchors, torch.ones(1, 9, dtype=torch.bool), pad_instances([gts], 'cpu')
    )
    assert ref.gt_inds.tolist() == got.gt_inds[0].tolist() == expected


# ---------------------------------------------------------------- RandomSampler
def _assign(counts, N=60, seed=0):
    """(B, N) assignment with (#pos, #neg) per image; the rest ignored; gts 1 and 2."""
    gen = torch.Generator().manual_seed(seed)
    gt_inds = torch.full((len(counts), N), -1, dtype=torch.long)
    for b, (p, n) in enumerate(counts):
        order = torch.randperm(N, generator=gen)
        gt_inds[b, order[:p]] = torch.randint(1, 3, (p,), generator=gen)
        gt_inds[b, order[p : p + n]] = 0
    labels = torch.where(gt_inds > 0, gt_inds + 4, -1)
    num_gts = torch.full((len(counts),), 2)
    return BatchAssignResult(gt_inds, torch.rand(len(counts), N, generator=gen), labels, num_gts)


# num=16, pos_fraction=0.5: 8 positives wanted. Images: above, equal to and below it.
SAMPLER_CASES = {
    'above_equal_below_ub_half': ([(12, 30), (8, 30), (3, 30)], 0.5),
    'below_above_equal_ub_1': ([(2, 40), (20, 5), (8, 9)], 1.0),
    'equal_above_none_no_ub': ([(8, 20), (10, 20), (0, 20)], -1),
    'above_no_negatives_ub_2': ([(9, 0), (8, 3), (1, 40)], 2.0),
    'ub_exactly_0_no_negative_drawn': ([(12, 30), (8, 30), (3, 30)], 0.0),
}


@pytest.mark.parametrize('case', list(SAMPLER_CASES))
@pytest.mark.parametrize('seed', [0, 5])
def test_random_sampler_draws_like_upstream(case, seed):
    counts, ub = SAMPLER_CASES[case]
    assign = _assign(counts, seed=seed)
    sampler = RandomSampler(num=16, pos_fraction=0.5, neg_pos_ub=ub, add_gt_as_proposals=False)
    gts = [InstanceData(bboxes=boxes([0, 0, 10, 10], [5, 5, 20, 20]), labels=torch.tensor([5, 6]))]
    priors = InstanceData(priors=torch.rand(assign.gt_inds.size(1), 4) * 10)
    wanted = 8
    assert {p > wanted for p, _ in counts} == {True, False}  # subsampled and not, together
    assert any(p == wanted for p, _ in counts)
    torch.manual_seed(seed)
    ref_pos, ref_neg, ref_avg = [], [], 0
    for b in range(len(counts)):
        res = assign.gt_inds[b]
        sampling = sampler.sample(
            AssignResult(2, res, assign.max_overlaps[b], assign.labels[b]), priors, gts[0]
        )
        ref_pos.append(sorted(sampling.pos_inds.tolist()))
        ref_neg.append(sorted(sampling.neg_inds.tolist()))
        ref_avg += sampling.avg_factor
    after_ref = torch.rand(())  # upstream's stream after its draws
    torch.manual_seed(seed)
    pos, neg, avg = sample_batch(sampler, assign, None, gts * len(counts))
    after_got = torch.rand(())
    for b in range(len(counts)):
        assert pos[b].nonzero().squeeze(1).tolist() == ref_pos[b], f'image {b} positives'
        assert neg[b].nonzero().squeeze(1).tolist() == ref_neg[b], f'image {b} negatives'
    assert float(avg) == float(ref_avg)
    assert after_got == after_ref  # the same number of draws, of the same sizes
    # the neg_pos_ub bound is active for at least one image (it changes the draw)
    if ub >= 0:
        assert any(
            int(ub * max(1, min(p, wanted))) < min(16 - min(p, wanted), n) for p, n in counts
        )


def _rpn_sampler_batch(seed):
    """An RPN batch where image 0 has more positives than wanted, image 1 exactly as many
    and image 2 fewer; returns (cfg, batch, wanted)."""
    cfg = rpn_cfg(train_cfg=dict(sampler=dict(num=16, neg_pos_ub=1.0)))
    head = build(cfg)
    shapes = [(128, 128), (96, 128), (128, 96)]
    batch = make_batch(head, seed, (8, 3, 1), shapes)
    counts = _upstream_positive_counts(head, batch)
    return cfg, batch, counts


def _upstream_positive_counts(head, batch):
    cls, _, gts, metas, ignore = batch
    anchors, valid = head.get_anchors([c.shape[-2:] for c in cls], metas, device='cpu')
    assigner = head.assigner
    out = []
    for i, gt in enumerate(gts):
        priors = torch.cat(anchors[i])[torch.cat(valid[i])]
        res = assigner.assign(InstanceData(priors=priors), gt)
        out.append(int((res.gt_inds > 0).sum()))
    return out


def _weighted_loss_and_grads(head, batch, weight_of, scale=1.0, seed=0):
    cls, reg, gts, metas, ignore = batch
    cls = [c.detach().clone().requires_grad_() for c in cls]
    reg = [b.detach().clone().requires_grad_() for b in reg]
    torch.manual_seed(seed)
    losses = head.loss_by_feat(cls, reg, gts, metas, ignore)
    total = sum(weight_of(k, i) * v for k, vs in sorted(losses.items()) for i, v in enumerate(vs))
    (total * scale).backward()
    grads = [x.grad if x.grad is not None else torch.zeros_like(x) for x in cls + reg]
    return float(total.detach()), grads


def test_rpn_sampler_above_equal_below_through_the_head():
    """The head's draws match upstream's when images are above, at and below the count."""
    for seed in range(40):  # the first batch whose counts straddle the wanted number
        cfg, batch, counts = _rpn_sampler_batch(seed)
        wanted = counts[1]
        if counts[0] > wanted > counts[2] > 0:
            break
    else:
        pytest.fail(f'no seed gives positives above / at / below the wanted count: {counts}')
    cfg = rpn_cfg(train_cfg=dict(sampler=dict(num=2 * wanted, neg_pos_ub=1.0)))
    upstream, plugin = build(cfg), build(to_plugin(cfg))
    plugin.load_state_dict(upstream.state_dict())
    for s in (0, 3):
        ref = _weighted_loss_and_grads(upstream, batch, lambda k, i: 1.0, seed=s)
        got = _weighted_loss_and_grads(plugin, batch, lambda k, i: 1.0, seed=s)
        assert got[0] == pytest.approx(ref[0], rel=1e-5)
        assert_grads_match(ref[1], got[1])


# ---------------------------------------------------------------- backward
HEADS = {
    'retina_focal': (retina_cfg, (3, 0, 5), [(100, 120), (64, 90), (128, 128)]),
    'rpn_sigmoid_ce': (rpn_cfg, (3, 2), [(100, 120), (64, 90)]),
    'ssd_softmax': (ssd_cfg, (3, 1), [(300, 300), (280, 300)]),
}


@pytest.mark.parametrize('name', list(HEADS))
@pytest.mark.parametrize(
    'weights, scale',
    [
        ('per_level', 1.0),  # a different loss weight per level and per loss term
        ('ones', 65536.0),  # AMP's loss scale
        ('per_level', 2.0**-10),
        ('one_and_two', 1.0),  # some levels' incoming gradient exactly 1, others not
    ],
)
def test_backward_of_weighted_and_scaled_sums(name, weights, scale):
    make_cfg, num_gts, shapes = HEADS[name]
    cfg = make_cfg()
    upstream, plugin = build(cfg), build(to_plugin(cfg))
    kw = dict(pad_divisor=1) if name.startswith('ssd') else {}
    batch = make_batch(upstream, 1, num_gts, shapes, **kw)
    if weights == 'ones':
        weight_of = lambda k, i: 1.0  # noqa: E731
    elif weights == 'one_and_two':
        weight_of = lambda k, i: 1.0 if i % 2 else 2.0  # noqa: E731
    else:
        weight_of = lambda k, i: (0.3 + 0.45 * i) * (1.7 if 'bbox' in k else 0.8)  # noqa: E731
    ref = _weighted_loss_and_grads(upstream, batch, weight_of, scale)
    got = _weighted_loss_and_grads(plugin, batch, weight_of, scale)
    assert got[0] == pytest.approx(ref[0], rel=1e-5)
    assert_grads_match(ref[1], got[1])
    # the scale reaches the gradient: compare with the unscaled, unweighted gradient
    plain = _weighted_loss_and_grads(plugin, batch, lambda k, i: 1.0)
    cls_ratio = got[1][0].abs().sum() / plain[1][0].abs().sum()
    expected = scale * (weight_of('loss_cls', 0) if name != 'ssd_softmax' else 1.0)
    if name != 'ssd_softmax':  # SSD's loss_cls is per image, not per level
        assert float(cls_ratio) == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize('min_pos_iou', [0.2, 0.45, 0.6])
@pytest.mark.parametrize('seed', [0, 3])
def test_tie_gather_path_with_ineligible_gts(min_pos_iou, seed, monkeypatch):
    """Few (chunk, gt) pairs hold a gt's best IoU: the ties are recomputed on those pairs
    only (``chunk_ties``); gts whose best IoU is under min_pos_iou must claim nothing."""
    from mmdet_anchorloss.assigners import batch_max_iou_assigner as bmia

    calls = []
    real = bmia.chunk_ties
    monkeypatch.setattr(bmia, 'chunk_ties', lambda *a: calls.append(1) or real(*a))
    anchors, gts = _grid_case(seed, B=3)
    padded = pad_instances(gts, 'cpu')
    B, G = padded.mask.shape
    kw = dict(pos_iou_thr=0.8, neg_iou_thr=0.3, min_pos_iou=min_pos_iou)
    assigner = BatchMaxIoUAssigner(max_chunk_elems=B * G * 2, **kw)
    res = assigner.assign_batch(anchors, torch.ones(B, len(anchors), dtype=torch.bool), padded)
    assert calls, 'the gather path was not taken'
    best = [bbox_overlaps(g.bboxes, anchors).amax(dim=1) for g in gts]
    assert any(bool((b < min_pos_iou).any()) for b in best) or min_pos_iou == 0.2
    for i, gt in enumerate(gts):
        ref = MaxIoUAssigner(**kw).assign(InstanceData(priors=anchors), gt)
        assert res.gt_inds[i].tolist() == ref.gt_inds.tolist(), f'image {i}'


@pytest.mark.parametrize('thr', [-1, 0.0])
def test_ignore_boxes_are_unused_unless_ignore_iof_thr_is_positive(thr):
    # upstream applies ignore boxes only when ignore_iof_thr > 0: at -1 (off) and at exactly
    # 0 an anchor inside an ignore box (IoF 1) stays negative
    gts = boxes([100, 100, 140, 140])
    anchors = boxes([0, 0, 10, 10], [2, 2, 8, 8], [100, 100, 140, 140])
    ignore = boxes([0, 0, 10, 10])
    assert bbox_overlaps(anchors[:2], ignore, mode='iof').min() == 1
    kw = dict(pos_iou_thr=0.5, neg_iou_thr=0.4, ignore_iof_thr=thr)
    ref, got = both(kw, anchors, gts, ignore=ignore)
    assert ref == got == [0, 0, 1]
    padded = pad_instances([InstanceData(bboxes=gts, labels=torch.tensor([0]))] * 2, 'cpu')
    ign = pad_instances([InstanceData(bboxes=ignore), InstanceData(bboxes=ignore)], 'cpu', False)
    res = BatchMaxIoUAssigner(**kw).assign_batch(
        anchors, torch.ones(2, 3, dtype=torch.bool), padded, ign
    )
    assert res.gt_inds.tolist() == [[0, 0, 1], [0, 0, 1]]


class _GenericIoU(BboxOverlaps2D):
    """Not the default calculator: the assigner takes its unfused path."""


def _ignore_boxes(seed, B):
    gen = torch.Generator().manual_seed(100 + seed)
    out = []
    for _ in range(B):
        xy = torch.randint(0, 6, (2, 2), generator=gen).float() * 4
        out.append(InstanceData(bboxes=torch.cat([xy, xy + 8], dim=1)))
    return out


@pytest.mark.parametrize('generic', [False, True])
@pytest.mark.parametrize('wrt_candidates', [True, False])
@pytest.mark.parametrize('seed', [0, 1])
def test_small_chunks_with_ignore_boxes(generic, wrt_candidates, seed):
    """Ignore boxes and ties in anchor chunks of 2, fused and unfused IoU, against upstream."""
    anchors, gts = _grid_case(seed, B=3)
    ignore = _ignore_boxes(seed, 3)
    kw = dict(
        pos_iou_thr=0.7,
        neg_iou_thr=0.3,
        min_pos_iou=0.1,
        ignore_iof_thr=0.5,
        ignore_wrt_candidates=wrt_candidates,
    )
    assigner = BatchMaxIoUAssigner(max_chunk_elems=2 * 3 * 5, **kw)
    if generic:
        assigner.iou_calculator = _GenericIoU()
    inside = torch.ones(3, len(anchors), dtype=torch.bool)
    inside[1:, ::5] = False  # outside anchors: upstream never sees them
    res = assigner.assign_batch(
        anchors,
        inside,
        pad_instances(gts, 'cpu'),
        pad_instances(ignore, 'cpu', with_labels=False),
    )
    ignored = 0
    for i, (gt, ign) in enumerate(zip(gts, ignore)):
        ref = MaxIoUAssigner(**kw).assign(InstanceData(priors=anchors[inside[i]]), gt, ign)
        assert res.gt_inds[i, inside[i]].tolist() == ref.gt_inds.tolist(), f'image {i}'
        assert (res.gt_inds[i, ~inside[i]] == -1).all()
        assert torch.equal(res.max_overlaps[i, inside[i]], ref.max_overlaps)
        assert torch.equal(res.labels[i, inside[i]], ref.labels)
        ignored += int((ref.max_overlaps == -1).sum())
    assert ignored > 0  # the ignore boxes decide some anchors


def test_union_below_eps_like_upstream():
    # boxes of 1e-4 x 1e-3 px: the union (1e-7) is clamped to bbox_overlaps' eps (1e-6)
    gts = boxes([0, 0, 1e-4, 1e-3], [5, 5, 6, 6])
    anchors = boxes([0, 0, 1e-4, 1e-3], [5, 5, 6, 6], [20, 20, 30, 30])
    iou = bbox_overlaps(gts, anchors)
    assert 0 < iou[0, 0] < 0.5  # IoU of identical boxes below 1: the clamp is active
    ref, got = both(dict(pos_iou_thr=0.5, neg_iou_thr=0.05, min_pos_iou=0.5), anchors, gts)
    assert ref == got == [-1, 2, 0]


def test_per_image_fallback_equals_the_batched_assigner():
    """core.assign.assign_batch with upstream's MaxIoUAssigner (image by image) gives the same
    BatchAssignResult as BatchMaxIoUAssigner, outside anchors included."""
    from mmdet_anchorloss.core.anchors import BatchAnchors
    from mmdet_anchorloss.core.assign import assign_batch

    anchors, gts = _grid_case(2, B=2)
    inside = torch.ones(2, len(anchors), dtype=torch.bool)
    inside[0, ::3] = False
    inside[1, 1::4] = False
    batch = BatchAnchors(anchors, inside, [len(anchors)], torch.zeros(len(anchors)).long())
    padded = pad_instances(gts, 'cpu')
    kw = dict(pos_iou_thr=0.7, neg_iou_thr=0.3, min_pos_iou=0.1)
    per_image = assign_batch(MaxIoUAssigner(**kw), batch, padded, None, gts, None)
    batched = assign_batch(BatchMaxIoUAssigner(**kw), batch, padded, None, gts, None)
    for name in ('gt_inds', 'max_overlaps', 'labels', 'num_gts'):
        assert torch.equal(getattr(per_image, name), getattr(batched, name)), name
    assert (batched.gt_inds == -1).sum() >= (~inside).sum() and (batched.gt_inds > 0).any()


class _FirstPositivesSampler(RandomSampler):
    """A RandomSampler subclass that keeps the first positives: not the batched draw."""

    def _sample_pos(self, assign_result, num_expected, **kwargs):
        pos = torch.nonzero(assign_result.gt_inds > 0, as_tuple=False).squeeze(1)
        return pos[:num_expected]


def test_other_samplers_run_upstreams_own_sample():
    from mmdet.registry import TASK_UTILS

    TASK_UTILS.register_module(module=_FirstPositivesSampler, force=True)
    cfg = rpn_cfg(
        train_cfg=dict(sampler=dict(type='_FirstPositivesSampler', num=16, neg_pos_ub=1.0))
    )
    upstream, plugin = build(cfg), build(to_plugin(cfg))
    plugin.load_state_dict(upstream.state_dict())
    batch = make_batch(upstream, 1, (8, 3, 1), [(128, 128), (96, 128), (128, 96)])
    assert max(_upstream_positive_counts(upstream, batch)) > 8  # positives are subsampled
    ref = _weighted_loss_and_grads(upstream, batch, lambda k, i: 1.0, seed=2)
    got = _weighted_loss_and_grads(plugin, batch, lambda k, i: 1.0, seed=2)
    assert got[0] == pytest.approx(ref[0], rel=1e-5)
    assert_grads_match(ref[1], got[1])


@pytest.mark.parametrize('pos_weight', [0.0, 0.5, 1.0])
def test_pos_weight_at_and_around_its_boundaries(pos_weight):
    # upstream: pos_weight <= 0 means weight 1 for positives, else pos_weight itself
    cfg = retina_cfg(train_cfg=dict(pos_weight=pos_weight))
    upstream, plugin = build(cfg), build(to_plugin(cfg))
    plugin.load_state_dict(upstream.state_dict())
    batch = make_batch(upstream, 0, (3, 2), [(100, 120), (64, 90)])
    assert sum(s['pos'] for s in upstream_assign_stats(upstream, *batch)) > 0
    ref = _weighted_loss_and_grads(upstream, batch, lambda k, i: 1.0)
    got = _weighted_loss_and_grads(plugin, batch, lambda k, i: 1.0)
    assert got[0] == pytest.approx(ref[0], rel=1e-5)
    assert_grads_match(ref[1], got[1])


@pytest.mark.parametrize('name', ['retina_focal', 'ssd_softmax'])
def test_levels_without_grad_and_large_logits(name):
    """Some level maps need no gradient (a frozen level), and logits of magnitude ~100:
    the loss and the other levels' gradients are upstream's, and finite."""
    make_cfg, num_gts, shapes = HEADS[name]
    cfg = make_cfg()
    upstream, plugin = build(cfg), build(to_plugin(cfg))
    kw = dict(pad_divisor=1) if name.startswith('ssd') else {}
    cls, reg, gts, metas, ignore = make_batch(upstream, 2, num_gts, shapes, **kw)
    cls = [c.detach() * 40 for c in cls]  # |logit| up to ~300: exp(x - min) would overflow
    results = []
    for head in (upstream, plugin):
        maps = [c.clone().requires_grad_(i != 1) for i, c in enumerate(cls)]
        regs = [r.detach().clone().requires_grad_() for r in reg]
        losses = head.loss_by_feat(maps, regs, gts, metas, ignore)
        total = sum((1.0 if i % 2 else 2.0) * v for vs in losses.values() for i, v in enumerate(vs))
        total.backward()
        assert maps[1].grad is None
        grads = [m.grad for i, m in enumerate(maps) if i != 1] + [r.grad for r in regs]
        results.append((total.detach(), grads))
    (ref, ref_g), (got, got_g) = results
    assert torch.isfinite(ref) and torch.isfinite(got)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    assert_grads_match(ref_g, got_g)


@pytest.mark.parametrize(
    'make_cfg',
    [
        retina_cfg,
        lambda: retina_cfg(
            type='AnchorHead',
            loss_cls=dict(_replace_=1, type='CrossEntropyLoss', use_sigmoid=False),
        ),
    ],
    ids=['focal', 'softmax_ce'],
)
def test_non_square_feature_maps(make_cfg):
    """Level maps of H != W (a wide and a tall image): layouts read as (H, W), not (W, W)."""
    cfg = make_cfg()
    if cfg['type'] == 'AnchorHead':
        cfg.pop('stacked_convs')
    upstream, plugin = build(cfg), build(to_plugin(cfg))
    batch = make_batch(upstream, 4, (4, 2), [(64, 160), (60, 150)])
    assert all(c.shape[-2] != c.shape[-1] for c in batch[0][:3])
    ref = _weighted_loss_and_grads(upstream, batch, lambda k, i: 1.0)
    got = _weighted_loss_and_grads(plugin, batch, lambda k, i: 1.0)
    assert got[0] == pytest.approx(ref[0], rel=1e-5)
    assert_grads_match(ref[1], got[1])


@pytest.mark.parametrize(
    'extra',
    [
        dict(class_weight=[1.0, 2.0, 0.5, 1.0, 3.0, 0.7]),
        dict(ignore_index=2),
        dict(avg_non_ignore=True),
    ],
    ids=['class_weight', 'ignore_index', 'avg_non_ignore'],
)
def test_softmax_head_with_loss_options(extra):
    """Softmax CE options the level path cannot take go to upstream's loss, same numbers."""
    loss_cls = dict(_replace_=1, type='CrossEntropyLoss', use_sigmoid=False, **extra)
    cfg = retina_cfg(type='AnchorHead', loss_cls=loss_cls)
    cfg.pop('stacked_convs')
    upstream, plugin = build(cfg), build(to_plugin(cfg))
    batch = make_batch(upstream, 5, (5, 3), [(100, 120), (64, 90)])
    assert any(int((g.labels == 2).sum()) for g in batch[2])  # the ignored class is present
    ref = _weighted_loss_and_grads(upstream, batch, lambda k, i: 1.0)
    got = _weighted_loss_and_grads(plugin, batch, lambda k, i: 1.0)
    assert got[0] == pytest.approx(ref[0], rel=1e-5)
    assert_grads_match(ref[1], got[1])


@pytest.mark.parametrize('name', ['retina_focal', 'ssd_softmax'])
def test_no_grad_losses_equal_upstream(name):
    """Under torch.no_grad the loss-only kernels run; the values are upstream's."""
    make_cfg, num_gts, shapes = HEADS[name]
    cfg = make_cfg()
    upstream, plugin = build(cfg), build(to_plugin(cfg))
    kw = dict(pad_divisor=1) if name.startswith('ssd') else {}
    cls, reg, gts, metas, ignore = make_batch(upstream, 6, num_gts, shapes, **kw)
    cls, reg = [c.detach() for c in cls], [r.detach() for r in reg]  # no input needs grad
    with torch.no_grad():
        ref = upstream.loss_by_feat(cls, reg, gts, metas, ignore)
        got = plugin.loss_by_feat(cls, reg, gts, metas, ignore)
    for key in ref:
        torch.testing.assert_close(
            torch.stack(got[key]), torch.stack(ref[key]), rtol=1e-5, atol=1e-7
        )
    assert all(not v.requires_grad for vs in got.values() for v in vs)


def test_random_sampler_wanting_no_positive():
    """pos_fraction=0: upstream still draws an empty permutation of the positives."""
    assign = _assign([(5, 30), (0, 30)], seed=1)
    sampler = RandomSampler(num=16, pos_fraction=0.0, neg_pos_ub=-1, add_gt_as_proposals=False)
    gts = InstanceData(bboxes=boxes([0, 0, 10, 10], [5, 5, 20, 20]), labels=torch.tensor([5, 6]))
    priors = InstanceData(priors=torch.rand(assign.gt_inds.size(1), 4) * 10)
    torch.manual_seed(0)
    ref_neg, ref_avg = [], 0
    for b in range(2):
        res = AssignResult(2, assign.gt_inds[b], assign.max_overlaps[b], assign.labels[b])
        sampling = sampler.sample(res, priors, gts)
        assert len(sampling.pos_inds) == 0
        ref_neg.append(sorted(sampling.neg_inds.tolist()))
        ref_avg += sampling.avg_factor
    torch.manual_seed(0)
    pos, neg, avg = sample_batch(sampler, assign, None, [gts, gts])
    assert not pos.any()
    assert [n.nonzero().squeeze(1).tolist() for n in neg] == ref_neg
    assert float(avg) == float(ref_avg)


def test_ignored_anchor_next_to_a_perfect_match():
    """An ignored anchor (IoU set to -1) in the chunk of a gt's IoU-1 anchor: the ties
    recomputed on that chunk must keep it at -1. Many chunks, so only that one is redone."""
    gt = boxes([0, 0, 10, 10])
    far = [[200 + 20 * i, 200, 210 + 20 * i, 210] for i in range(20)]
    anchors = boxes([0, 0, 10, 10], [100, 100, 110, 110], *far)
    ignore = boxes([100, 100, 110, 110])
    kw = dict(pos_iou_thr=0.5, neg_iou_thr=0.4, min_pos_iou=0.0, ignore_iof_thr=0.5)
    gts = InstanceData(bboxes=gt, labels=torch.tensor([0]))
    ref = MaxIoUAssigner(**kw).assign(
        InstanceData(priors=anchors), gts, InstanceData(bboxes=ignore)
    )
    got = BatchMaxIoUAssigner(max_chunk_elems=2, **kw).assign_batch(
        anchors,
        torch.ones(1, len(anchors), dtype=torch.bool),
        pad_instances([gts], 'cpu'),
        pad_instances([InstanceData(bboxes=ignore)], 'cpu', with_labels=False),
    )
    assert got.gt_inds[0].tolist() == ref.gt_inds.tolist()
    assert ref.gt_inds[:3].tolist() == [1, -1, 0]  # the gt's anchor, the ignored one, far
