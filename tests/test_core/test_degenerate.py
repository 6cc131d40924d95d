"""Degenerate shapes against upstream, on every twin: heads, assigner, coder, losses.

Zero and one anchors; zero and one gts; batches where every image is empty, a batch of one
image, ignore boxes only; a gt equal to an anchor, a gt covering the whole image, a
zero-area gt; 1x1 feature maps. Every case runs upstream first: where upstream returns,
the twin must give its result (values, shapes, dtypes; losses and gradients); where
upstream raises, the twin must raise the same exception type.
"""

from typing import Callable, NamedTuple, Optional

import pytest
import torch
from helpers import (
    anchor_head_cfg,
    assert_grads_match,
    assert_losses_match,
    build,
    loss_and_grads,
    make_batch,
    merge,
    retina_cfg,
    rpn_cfg,
    ssd_cfg,
    to_plugin,
)
from mmdet.models.losses import CrossEntropyLoss, FocalLoss
from mmdet.models.task_modules.assigners import MaxIoUAssigner
from mmdet.models.task_modules.coders import DeltaXYWHBBoxCoder
from mmengine.structures import InstanceData

from mmdet_anchorloss.assigners import BatchMaxIoUAssigner
from mmdet_anchorloss.coders import BatchDeltaXYWHBBoxCoder
from mmdet_anchorloss.core.structures import pad_instances
from mmdet_anchorloss.kernels import iou as iou_kernels
from mmdet_anchorloss.losses import FusedCrossEntropyLoss, FusedFocalLoss


class Raised(NamedTuple):
    """Upstream raised ``type``; the twin raised it too."""

    type: type


def upstream_then_twin(upstream: Callable, twin: Callable):
    """(upstream's result, the twin's), or (Raised(type), None) when upstream raises: the
    twin must then raise the same exception type (its message may differ)."""
    try:
        ref = upstream()
    except Exception as err:  # upstream's own behaviour: the twin must fail the same way
        with pytest.raises(type(err)):
            twin()
        return Raised(type(err)), None
    return ref, twin()


def boxes(*rows, device='cpu'):
    return torch.tensor(rows, dtype=torch.float32, device=device).reshape(-1, 4)


def assert_same(ref: torch.Tensor, got: torch.Tensor, name: str = '') -> None:
    """Bitwise equal (inf and NaN included), same shape, dtype and device."""
    assert got.shape == ref.shape, (name, got.shape, ref.shape)
    assert got.dtype == ref.dtype, (name, got.dtype, ref.dtype)
    assert got.device == ref.device, (name, got.device, ref.device)
    torch.testing.assert_close(got, ref, rtol=0, atol=0, equal_nan=True, msg=name)


# ----------------------------------------------------------------------------- assigner
# one 64 x 48 image; anchor 0 is [8, 8, 40, 40]
ANCHORS = {
    'zero': [],
    'one': [[8, 8, 40, 40]],
    'three': [[8, 8, 40, 40], [0, 0, 64, 48], [30, 20, 50, 44]],
}
GTS = {
    'zero': [],
    'one': [[10, 12, 36, 40]],
    'equal_to_anchor': [[8, 8, 40, 40]],
    'whole_image': [[0, 0, 64, 48]],
    'zero_area': [[20, 20, 20, 30]],
    'point_and_box': [[20, 20, 20, 20], [28, 18, 52, 46]],
}
IGNORE = {
    'none': None,
    'empty': [],
    'one': [[6, 6, 42, 42]],  # IoF with anchor 0 is 1
}
ASSIGNERS = {
    'retina': dict(pos_iou_thr=0.5, neg_iou_thr=0.4, min_pos_iou=0.0, ignore_iof_thr=0.5),
    'rpn': dict(pos_iou_thr=0.7, neg_iou_thr=0.3, min_pos_iou=0.3, ignore_iof_thr=0.5),
    'ssd_first_best': dict(
        pos_iou_thr=0.5, neg_iou_thr=0.5, gt_max_assign_all=False, ignore_iof_thr=0.5
    ),
    'no_low_quality_wrt_gts': dict(
        pos_iou_thr=0.5,
        neg_iou_thr=(0.1, 0.4),
        match_low_quality=False,
        ignore_iof_thr=0.5,
        ignore_wrt_candidates=False,
    ),
}


def _instances(anchors, gts, ignore, device):
    pred = InstanceData(priors=boxes(*anchors, device=device))
    gt = InstanceData(
        bboxes=boxes(*gts, device=device),
        labels=torch.arange(len(gts), device=device) + 2,
    )
    ign = None if ignore is None else InstanceData(bboxes=boxes(*ignore, device=device))
    return pred, gt, ign


def assert_assign_equal(ref, got) -> None:
    assert type(got.num_gts) is type(ref.num_gts) and got.num_gts == ref.num_gts
    for name in ('gt_inds', 'max_overlaps', 'labels'):
        assert_same(getattr(ref, name), getattr(got, name), name)


@pytest.mark.parametrize('cfg', list(ASSIGNERS))
@pytest.mark.parametrize('ignore', list(IGNORE))
@pytest.mark.parametrize('gts', list(GTS))
@pytest.mark.parametrize('anchors', list(ANCHORS))
def test_assign_matches_upstream(anchors, gts, ignore, cfg, device):
    pred, gt, ign = _instances(ANCHORS[anchors], GTS[gts], IGNORE[ignore], device)
    ref, got = upstream_then_twin(
        lambda: MaxIoUAssigner(**ASSIGNERS[cfg]).assign(pred, gt, ign),
        lambda: BatchMaxIoUAssigner(**ASSIGNERS[cfg]).assign(pred, gt, ign),
    )
    assert not isinstance(ref, Raised)  # upstream returns on every one of these
    assert_assign_equal(ref, got)
    assert len(got.gt_inds) == len(ANCHORS[anchors]) and got.num_gts == len(GTS[gts])


def test_zero_priors_empty_result(device):
    """Issue 12: zero priors, with gts and ignore boxes, returns upstream's empty result."""
    pred, gt, ign = _instances([], GTS['point_and_box'], IGNORE['one'], device)
    got = BatchMaxIoUAssigner(**ASSIGNERS['retina']).assign(pred, gt, ign)
    assert got.num_gts == 2
    assert got.gt_inds.shape == got.max_overlaps.shape == got.labels.shape == (0,)
    assert got.gt_inds.dtype == got.labels.dtype == torch.long


# B = 3: no gt, one gt, two gts (one of them zero-area); ignore boxes on the empty image
BATCH_GTS = ([], [[10, 12, 36, 40]], [[20, 20, 20, 30], [0, 0, 64, 48]])
BATCH_IGNORE = ([[6, 6, 42, 42]], [], [])


@pytest.mark.parametrize('with_ignore', [False, True])
@pytest.mark.parametrize('anchors', list(ANCHORS))
def test_assign_batch_matches_upstream_image_by_image(anchors, with_ignore, device):
    priors = boxes(*ANCHORS[anchors], device=device)
    gt_list = [_instances([], g, None, device)[1] for g in BATCH_GTS]
    ign_list = [InstanceData(bboxes=boxes(*i, device=device)) for i in BATCH_IGNORE]
    gts = pad_instances(gt_list, device)
    ignore = pad_instances(ign_list, device, with_labels=False) if with_ignore else None
    inside = torch.ones(len(gt_list), len(priors), dtype=torch.bool, device=device)
    cfg = ASSIGNERS['retina']
    res = BatchMaxIoUAssigner(**cfg).assign_batch(priors, inside, gts, ignore)
    assert res.gt_inds.shape == res.max_overlaps.shape == res.labels.shape == inside.shape
    assert res.num_gts.tolist() == [0, 1, 2]
    for i, gt in enumerate(gt_list):
        ref = MaxIoUAssigner(**cfg).assign(
            InstanceData(priors=priors), gt, ign_list[i] if with_ignore else None
        )
        assert_same(ref.gt_inds, res.gt_inds[i], f'gt_inds[{i}]')
        assert_same(ref.labels, res.labels[i], f'labels[{i}]')
        if ref.num_gts:  # the batched form keeps the IoU; upstream zeroes it without gts
            assert_same(ref.max_overlaps, res.max_overlaps[i], f'max_overlaps[{i}]')


def test_assign_batch_no_gt_column(device):
    """PaddedBoxes with G = 0 (built by hand, not by pad_instances): all negative."""
    priors = boxes(*ANCHORS['three'], device=device)
    gts = pad_instances([_instances([], [], None, device)[1]], device)
    gts = type(gts)(gts.bboxes[:, :0], gts.labels[:, :0], gts.mask[:, :0])
    inside = torch.ones(1, 3, dtype=torch.bool, device=device)
    res = BatchMaxIoUAssigner(**ASSIGNERS['retina']).assign_batch(priors, inside, gts)
    assert res.gt_inds.tolist() == [[0, 0, 0]] and res.labels.tolist() == [[-1, -1, -1]]
    assert res.num_gts.tolist() == [0]


COMPILED_CASES = [  # (anchors, gts, ignore): shapes the compiled kernels specialise on
    ('zero', 'one', 'one'),
    ('one', 'one', 'one'),
    ('three', 'point_and_box', 'one'),
]
COMPILED_CASES_MORE = [
    ('zero', 'zero', 'none'),
    ('one', 'zero', 'one'),
    ('three', 'zero_area', 'none'),
    ('three', 'whole_image', 'empty'),
]


@pytest.mark.parametrize(
    'cases',
    [COMPILED_CASES, pytest.param(COMPILED_CASES_MORE, marks=pytest.mark.slow)],
    ids=['main', 'more'],
)
def test_compiled_kernels_on_degenerate_shapes(cases, monkeypatch):
    """The compiled path (used in training) on zero / one anchor and gt (CPU inductor)."""
    for kernel in (
        iou_kernels.overlap_max_kernel,
        iou_kernels.low_quality_ties_kernel,
        iou_kernels.finalize_kernel,
    ):
        monkeypatch.setattr(kernel, 'mode', '1')
    for anchors, gts, ignore in cases:
        pred, gt, ign = _instances(ANCHORS[anchors], GTS[gts], IGNORE[ignore], 'cpu')
        for cfg in ('retina', 'ssd_first_best'):
            ref = MaxIoUAssigner(**ASSIGNERS[cfg]).assign(pred, gt, ign)
            got = BatchMaxIoUAssigner(**ASSIGNERS[cfg]).assign(pred, gt, ign)
            assert_assign_equal(ref, got)
    assert iou_kernels.overlap_max_kernel._compiled is not None


# ----------------------------------------------------------------------------- coder
CODER_CASES = {
    # (anchors, gts), one gt per anchor
    'zero_boxes': ([], []),
    'one_box': ([[8, 8, 40, 40]], [[10, 12, 36, 40]]),
    'equal_to_anchor': ([[8, 8, 40, 40]], [[8, 8, 40, 40]]),
    'whole_image': ([[8, 8, 40, 40], [30, 20, 50, 44]], [[0, 0, 64, 48], [0, 0, 64, 48]]),
    'zero_area': ([[8, 8, 40, 40], [30, 20, 50, 44]], [[20, 20, 20, 30], [40, 30, 40, 30]]),
}
CODER_KW = dict(target_means=(0.1, 0.0, -0.1, 0.2), target_stds=(0.1, 0.1, 0.2, 0.2))


@pytest.mark.parametrize('case', list(CODER_CASES))
def test_coder_matches_upstream(case, device):
    a, g = (boxes(*x, device=device) for x in CODER_CASES[case])
    up, ours = DeltaXYWHBBoxCoder(**CODER_KW), BatchDeltaXYWHBBoxCoder(**CODER_KW)
    ref, got = upstream_then_twin(lambda: up.encode(a, g), lambda: ours.encode(a, g))
    assert not isinstance(ref, Raised)
    assert_same(ref, got, 'encode')
    assert_same(ref[None].expand(2, -1, -1), ours.encode_batch(a, g[None].expand(2, -1, -1)))
    if case == 'zero_area':
        assert bool(torch.isinf(ref[:, 2:]).any())  # log(0): upstream's -inf, no epsilon
    if case == 'equal_to_anchor':  # zero deltas: (0 - means) / stds
        means, stds = (torch.tensor(CODER_KW[k]) for k in ('target_means', 'target_stds'))
        torch.testing.assert_close(ref.cpu(), (-means / stds)[None])
    gen = torch.Generator().manual_seed(0)
    deltas = (torch.randn(len(a), 4, generator=gen) * 3).to(device)  # dw, dh get clamped
    for d in (deltas, ref.clamp(-10, 10)):
        ref_box, got_box = upstream_then_twin(
            lambda d=d: up.decode(a, d), lambda d=d: ours.decode(a, d)
        )
        assert not isinstance(ref_box, Raised)
        assert_same(ref_box, got_box, 'decode')
        batched = ours.decode_batch(a, d[None].expand(3, -1, -1))
        assert_same(ref_box[None].expand(3, -1, -1), batched, 'decode_batch')


# ----------------------------------------------------------------------------- losses
C = 3
LOSSES = {
    'focal': (FocalLoss, FusedFocalLoss, dict(use_sigmoid=True, gamma=2.0, alpha=0.25), C),
    'sigmoid_ce': (CrossEntropyLoss, FusedCrossEntropyLoss, dict(use_sigmoid=True), C),
    'softmax_ce': (
        CrossEntropyLoss,
        FusedCrossEntropyLoss,
        dict(use_sigmoid=False, loss_weight=1.5),
        C + 1,
    ),
}
ROWS = {  # labels (C is background) and weights
    'zero_rows': ([], []),
    'one_foreground': ([1], [1.0]),
    'one_background': ([C], [1.0]),
    'one_zero_weight': ([2], [0.0]),
}
CALLS = {
    'avg_factor': dict(avg_factor=1.0),
    'avg_factor_0': dict(avg_factor=0.0),
    'mean': {},
    'sum': dict(reduction_override='sum'),
}


@pytest.mark.parametrize('call', list(CALLS))
@pytest.mark.parametrize('rows', list(ROWS))
@pytest.mark.parametrize('loss', list(LOSSES))
def test_loss_matches_upstream(loss, rows, call, device):
    up_type, twin_type, kw, channels = LOSSES[loss]
    labels, weights = ROWS[rows]
    gen = torch.Generator().manual_seed(0)
    pred = torch.randn(len(labels), channels, generator=gen).to(device)
    target = torch.tensor(labels, dtype=torch.long, device=device)
    weight = torch.tensor(weights, device=device)

    def run(loss_type):
        x = pred.clone().requires_grad_()
        out = loss_type(**kw)(x, target, weight, **CALLS[call])
        (grad,) = torch.autograd.grad(out.sum(), x, allow_unused=True)
        return out.detach(), torch.zeros_like(x) if grad is None else grad

    ref, got = upstream_then_twin(lambda: run(up_type), lambda: run(twin_type))
    if isinstance(ref, Raised):
        return
    for name, a, b in zip(('loss', 'grad'), ref, got):
        assert b.shape == a.shape, (name, b.shape, a.shape)
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7, equal_nan=True, msg=name)


# ----------------------------------------------------------------------------- heads
HEADS = {
    'anchor': anchor_head_cfg,
    'retina': retina_cfg,
    'rpn': rpn_cfg,
    'ssd': ssd_cfg,
}
# one level, one anchor per location: a 1x1 map (a 32 x 32 image) has a single anchor
ONE_ANCHOR = {
    'anchor': dict(
        anchor_generator=dict(
            _replace_=1,
            type='AnchorGenerator',
            octave_base_scale=4,
            scales_per_octave=1,
            ratios=[1.0],
            strides=[32],
        )
    ),
    'rpn': dict(
        anchor_generator=dict(
            _replace_=1, type='AnchorGenerator', scales=[8], ratios=[1.0], strides=[32]
        )
    ),
    'ssd': dict(
        in_channels=(8,),
        anchor_generator=dict(
            _replace_=1, type='AnchorGenerator', scales=[4], ratios=[1.0], strides=[32]
        ),
    ),
}
ONE_ANCHOR['retina'] = ONE_ANCHOR['anchor']
IGNORE_CFG = dict(train_cfg=dict(assigner=dict(ignore_iof_thr=0.5)))

# num_gts per image, image shapes (None: one per smallest stride, so every map is 1x1),
# gts: how the boxes are replaced; cfg: 'ignore' or 'one_anchor'; zero_anchors: 0x0 maps
SCENES = {
    'every_image_empty': dict(num_gts=(0, 0)),
    'one_image_no_gt': dict(num_gts=(0,), shapes=[(64, 96)]),
    'one_image_one_gt': dict(num_gts=(1,), shapes=[(64, 96)]),
    'ignore_boxes_only': dict(num_gts=(0, 0), num_ignore=(2, 1), cfg='ignore'),
    'ignore_and_one_gt': dict(num_gts=(0, 1), num_ignore=(1, 1), cfg='ignore'),
    'gt_equal_to_anchor': dict(num_gts=(1, 0), gts='anchor'),
    'gt_whole_image': dict(num_gts=(1, 1), gts='whole_image'),
    'zero_area_gt': dict(num_gts=(2, 1), gts='zero_area'),
    'featmap_1x1': dict(num_gts=(1, 0), shapes=None),
    'featmap_1x1_no_gt': dict(num_gts=(0,), shapes=None),
    'one_anchor_one_gt': dict(num_gts=(1,), shapes=[(32, 32)], cfg='one_anchor'),
    'one_anchor_no_gt': dict(num_gts=(0, 0), shapes=[(32, 32)] * 2, cfg='one_anchor'),
    'one_anchor_gt_equal': dict(num_gts=(1,), shapes=[(32, 32)], cfg='one_anchor', gts='anchor'),
    'zero_anchors': dict(num_gts=(1, 0), zero_anchors=True),
    'zero_anchors_no_gt': dict(num_gts=(0,), shapes=[(64, 96)], zero_anchors=True),
    # allowed_border=0: no anchor of the 8 x 8 image lies inside it, the other image's do
    'no_inside_anchor_in_one_image': dict(
        num_gts=(1, 1), shapes=[(64, 96), (8, 8)], cfg='border_0'
    ),
}
# where upstream itself raises (the twin must raise the same type): an image without any
# anchor to assign is "no valid anchor inside the image" in AnchorHead._get_targets_single
UPSTREAM_RAISES = {
    'zero_anchors': ValueError,
    'zero_anchors_no_gt': ValueError,
    'no_inside_anchor_in_one_image': ValueError,
}


def _replace_gts(head, kind: Optional[str], gts, metas, featmap_sizes, device):
    if kind is None:
        return
    anchors = head.prior_generator.grid_priors(featmap_sizes, device=device)[0]
    for gt, meta in zip(gts, metas):
        h, w = meta['img_shape']
        b = gt.bboxes.clone()
        if len(b) == 0:
            continue
        if kind == 'anchor':  # the first anchor of level 0 that lies inside the image
            inside = (anchors[:, :2] >= 0).all(1) & (anchors[:, 2] <= w) & (anchors[:, 3] <= h)
            b[0] = anchors[int(inside.nonzero()[0]) if bool(inside.any()) else 0]
        elif kind == 'whole_image':
            b[0] = b.new_tensor([0.0, 0.0, w, h])
        elif kind == 'zero_area':  # a vertical line, then a point
            b[0, 2] = b[0, 0]
            if len(b) > 1:
                b[1, 2:] = b[1, :2]
        gt.bboxes = b


@pytest.mark.parametrize('scene', list(SCENES))
@pytest.mark.parametrize('head', list(HEADS))
def test_head_loss_matches_upstream(head, scene, device):
    spec = SCENES[scene]
    cfg = HEADS[head]()
    if spec.get('cfg') == 'ignore':
        cfg = merge(cfg, IGNORE_CFG)
    elif spec.get('cfg') == 'one_anchor':
        cfg = merge(cfg, ONE_ANCHOR[head])
    elif spec.get('cfg') == 'border_0':
        cfg = merge(cfg, dict(train_cfg=dict(allowed_border=0)))
    upstream = build(cfg).to(device)
    plugin = build(to_plugin(cfg)).to(device)
    shapes = spec.get('shapes', [(64, 96), (40, 50)][: len(spec['num_gts'])])
    pad_divisor = 32
    if shapes is None:  # every level 1x1: the image is one smallest stride wide
        s = min(st[0] for st in upstream.prior_generator.strides)
        shapes, pad_divisor = [(s, s)] * len(spec['num_gts']), 1
    cls, reg, gts, metas, ignore = make_batch(
        upstream,
        0,
        spec['num_gts'],
        shapes,
        pad_divisor=pad_divisor,
        num_ignore=spec.get('num_ignore', ()),
        device=device,
    )
    if spec.get('zero_anchors'):
        cls, reg = [x[..., :0, :0] for x in cls], [x[..., :0, :0] for x in reg]
    featmap_sizes = [tuple(x.shape[-2:]) for x in cls]
    _replace_gts(upstream, spec.get('gts'), gts, metas, featmap_sizes, device)
    if spec.get('cfg') == 'one_anchor':
        assert (
            sum(h * w for h, w in featmap_sizes) * upstream.prior_generator.num_base_priors[0] == 1
        )
    batch = (cls, reg, gts, metas, ignore)
    ref, got = upstream_then_twin(
        lambda: loss_and_grads(upstream, *batch), lambda: loss_and_grads(plugin, *batch)
    )
    if scene in UPSTREAM_RAISES:
        assert ref == Raised(UPSTREAM_RAISES[scene]), ref
        return
    assert not isinstance(ref, Raised), ref
    (ref_losses, ref_grads), (got_losses, got_grads) = ref, got
    assert_losses_match(ref_losses, got_losses)
    # a zero-area gt gives an infinite target (log 0): SmoothL1's untaken branch then
    # back-propagates 0 * inf = NaN upstream; the twin must have it in the same places
    for i, (a, b) in enumerate(zip(ref_grads, got_grads)):
        assert torch.equal(a.isnan(), b.isnan()), f'grad of map {i}: NaN elsewhere'
    assert_grads_match(
        [g.nan_to_num(0.0) for g in ref_grads], [g.nan_to_num(0.0) for g in got_grads]
    )
    if sum(spec['num_gts']) == 0:  # no gt: every box loss (and its gradient) is exactly 0
        box_key = [k for k in got_losses if 'bbox' in k][0]
        assert all(float(v) == 0.0 for v in got_losses[box_key])
        assert all(float(g.abs().sum()) == 0.0 for g in got_grads[len(cls) :])
