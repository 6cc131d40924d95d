"""Parity with upstream mmdet heads: losses per level, gradients and targets.

Each case builds an upstream head and its plugin twin from one config and feeds both the
same random batch. Twins: plugin head with plugin parts, plugin head with upstream parts,
upstream head with plugin parts.
"""

import pytest
import torch
from helpers import (
    anchor_head_cfg,
    assert_grads_match,
    assert_losses_match,
    build,
    loss_and_grads,
    make_batch,
    retina_cfg,
    rpn_cfg,
    ssd_cfg,
    to_plugin,
    upstream_assign_stats,
)

SHAPES = [(100, 120), (64, 90), (128, 128)]

CASES = {
    'retina_focal_l1': (retina_cfg(), {}),
    'retina_smoothl1_coder_stds': (
        retina_cfg(
            bbox_coder=dict(target_means=[0.1, -0.1, 0.05, 0.0], target_stds=[0.1, 0.1, 0.2, 0.2]),
            loss_bbox=dict(type='SmoothL1Loss', beta=1.0 / 9.0, loss_weight=2.0),
        ),
        {},
    ),
    'retina_allowed_border_0': (retina_cfg(train_cfg=dict(allowed_border=0)), {}),
    'retina_pos_weight_2': (retina_cfg(train_cfg=dict(pos_weight=2.0)), {}),
    'retina_giou_decoded': (
        retina_cfg(
            reg_decoded_bbox=True, loss_bbox=dict(_replace_=1, type='GIoULoss', loss_weight=2.0)
        ),
        {},
    ),
    'retina_ignore_wrt_candidates': (
        retina_cfg(train_cfg=dict(assigner=dict(ignore_iof_thr=0.5))),
        dict(num_ignore=(2, 0, 1)),
    ),
    'retina_ignore_wrt_gts': (
        retina_cfg(train_cfg=dict(assigner=dict(ignore_iof_thr=0.3, ignore_wrt_candidates=False))),
        dict(num_ignore=(1, 2, 3)),
    ),
    'assigner_no_assign_all': (  # pos_iou_thr 0.7: some gts match only as low quality
        retina_cfg(train_cfg=dict(assigner=dict(pos_iou_thr=0.7, gt_max_assign_all=False))),
        dict(duplicate=True),
    ),
    'assigner_no_low_quality': (
        retina_cfg(train_cfg=dict(assigner=dict(match_low_quality=False))),
        {},
    ),
    'assigner_min_pos_iou_tuple_neg': (
        retina_cfg(
            train_cfg=dict(assigner=dict(pos_iou_thr=0.7, min_pos_iou=0.3, neg_iou_thr=(0.1, 0.4)))
        ),
        {},
    ),
    'assigner_duplicates_overwrite': (retina_cfg(), dict(duplicate=True)),
    'sigmoid_ce': (
        anchor_head_cfg(
            loss_cls=dict(_replace_=1, type='CrossEntropyLoss', use_sigmoid=True, loss_weight=1.0)
        ),
        {},
    ),
    'softmax_ce': (
        anchor_head_cfg(
            loss_cls=dict(_replace_=1, type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.5)
        ),
        {},
    ),
    'rpn_random_sampler': (rpn_cfg(), {}),
    'rpn_random_sampler_neg_pos_ub': (
        rpn_cfg(train_cfg=dict(sampler=dict(num=64, neg_pos_ub=2), allowed_border=0)),
        {},
    ),
    'rpn_sampler_subsamples_positives': (
        rpn_cfg(train_cfg=dict(sampler=dict(num=8, neg_pos_ub=1.5))),
        {},
    ),
}


def _total(stats, key):
    return sum(s[key] for s in stats)


def _neg_pos_ub_bounds(stats, cfg):
    """Images where neg_pos_ub, not num - #pos, sets the number of negatives drawn."""
    sampler = cfg['train_cfg']['sampler']
    count = 0
    for s in stats:
        got = min(s['pos'], s['pos_wanted'])
        count += int(sampler['neg_pos_ub'] * max(1, got)) < min(sampler['num'] - got, s['neg'])
    return count


# What each case exists for, on upstream's own assignment of the case's batch (seed 0, 1).
GUARDS = {
    'retina_focal_l1': lambda st, cfg: _total(st, 'pos') > 0,
    'retina_smoothl1_coder_stds': lambda st, cfg: _total(st, 'pos') > 0,
    'retina_allowed_border_0': lambda st, cfg: _total(st, 'outside') > 0 and _total(st, 'pos') > 0,
    'retina_pos_weight_2': lambda st, cfg: _total(st, 'pos') > 0,
    'retina_giou_decoded': lambda st, cfg: _total(st, 'pos') > 0,
    'retina_ignore_wrt_candidates': lambda st, cfg: _total(st, 'ignored_by_box') > 0,
    'retina_ignore_wrt_gts': lambda st, cfg: _total(st, 'ignored_by_box') > 0,
    'assigner_no_assign_all': lambda st, cfg: _total(st, 'low_quality') > 0,
    'assigner_no_low_quality': lambda st, cfg: _total(st, 'low_quality') == 0,
    'assigner_min_pos_iou_tuple_neg': lambda st, cfg: (
        _total(st, 'low_quality') > 0 and _total(st, 'below_lo') > 0
    ),
    'assigner_duplicates_overwrite': lambda st, cfg: _total(st, 'not_argmax') > 0,
    'sigmoid_ce': lambda st, cfg: _total(st, 'pos') > 0,
    'softmax_ce': lambda st, cfg: _total(st, 'pos') > 0,
    # negatives are subsampled (a randperm per image)
    'rpn_random_sampler': lambda st, cfg: all(
        s['neg'] > s['pos_wanted'] * 2 - min(s['pos'], s['pos_wanted']) for s in st
    ),
    'rpn_random_sampler_neg_pos_ub': lambda st, cfg: _neg_pos_ub_bounds(st, cfg) > 0,
    # one image with more positives than wanted (subsampled) beside others at or below it
    'rpn_sampler_subsamples_positives': lambda st, cfg: (
        any(s['pos'] > s['pos_wanted'] for s in st)
        and any(s['pos'] <= s['pos_wanted'] for s in st)
        and _neg_pos_ub_bounds(st, cfg) > 0
    ),
}


def _check(cfg, batch_kwargs, parts, plugin_head=True, seed=0, num_gts=(3, 0, 6), device='cpu'):
    upstream = build(cfg).to(device)
    plugin_cfg = to_plugin(cfg, parts)
    if not plugin_head:
        plugin_cfg['type'] = cfg['type']
    plugin = build(plugin_cfg).to(device)
    batch = make_batch(
        upstream, seed, num_gts, SHAPES[: len(num_gts)], device=device, **batch_kwargs
    )
    ref, ref_grads = loss_and_grads(upstream, *batch, seed=seed)
    got, got_grads = loss_and_grads(plugin, *batch, seed=seed)
    assert_losses_match(ref, got)
    assert_grads_match(ref_grads, got_grads)
    return ref, upstream_assign_stats(upstream, *batch)


@pytest.mark.parametrize('case', list(CASES))
@pytest.mark.parametrize('seed', [0, 1])
def test_plugin_twin_matches_upstream(case, seed, device):
    cfg, kwargs = CASES[case]
    _, stats = _check(cfg, kwargs, ('head', 'loss', 'assigner', 'coder'), seed=seed, device=device)
    assert GUARDS[case](stats, cfg), f'{case}: the batch misses what the case is for: {stats}'


def test_every_case_has_a_guard():
    assert set(GUARDS) == set(CASES)


@pytest.mark.parametrize('case', ['retina_focal_l1', 'softmax_ce', 'rpn_random_sampler'])
def test_plugin_head_with_upstream_parts(case):
    cfg, kwargs = CASES[case]
    _check(cfg, kwargs, ('head',))


@pytest.mark.parametrize('case', ['retina_focal_l1', 'sigmoid_ce', 'rpn_random_sampler'])
def test_upstream_head_with_plugin_parts(case):
    cfg, kwargs = CASES[case]
    _check(cfg, kwargs, ('loss', 'assigner', 'coder'), plugin_head=False)


@pytest.mark.parametrize('seed', [0, 1])
def test_ssd_matches_upstream(seed, device):
    cfg = ssd_cfg()
    upstream = build(cfg).to(device)
    plugin = build(to_plugin(cfg)).to(device)
    batch = make_batch(
        upstream,
        seed,
        (4, 0, 2),
        [(300, 300), (280, 300), (300, 250)],
        pad_divisor=1,
        device=device,
    )
    ref, ref_grads = loss_and_grads(upstream, *batch)
    got, got_grads = loss_and_grads(plugin, *batch)
    assert len(ref['loss_cls']) == 3  # SSD reports one value per image
    assert_losses_match(ref, got)
    assert_grads_match(ref_grads, got_grads)


def test_all_images_empty_gives_zero_box_loss():
    cfg = retina_cfg()
    upstream, plugin = build(cfg), build(to_plugin(cfg))
    batch = make_batch(upstream, 0, (0, 0), SHAPES[:2])
    ref, _ = loss_and_grads(upstream, *batch)
    got, grads = loss_and_grads(plugin, *batch)
    assert_losses_match(ref, got)
    assert all(float(v) == 0.0 for v in got['loss_bbox'])
    assert all(float(g.abs().sum()) == 0.0 for g in grads[5:])  # no box gradient


def test_rpn_keys_and_random_stream():
    """Same seed -> same sampled anchors; another seed -> another draw (the test can fail)."""
    cfg = rpn_cfg(train_cfg=dict(sampler=dict(num=32)))
    upstream, plugin = build(cfg), build(to_plugin(cfg))
    batch = make_batch(upstream, 3, (8, 5), SHAPES[:2])
    ref, _ = loss_and_grads(upstream, *batch, seed=7)
    got, _ = loss_and_grads(plugin, *batch, seed=7)
    other, _ = loss_and_grads(plugin, *batch, seed=8)
    assert set(got) == {'loss_rpn_cls', 'loss_rpn_bbox'}
    assert_losses_match(ref, got)
    assert any(not torch.allclose(a, b) for a, b in zip(got['loss_rpn_cls'], other['loss_rpn_cls']))
