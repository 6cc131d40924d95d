"""``DeviceRandomSampler``: upstream ``RandomSampler``'s counts and avg_factor, a uniformly
random choice drawn on the device, no host sync; not a twin (other draws than upstream's)."""

import numpy as np
import pytest
import torch
from helpers import (
    assert_grads_match,
    assert_losses_match,
    build,
    loss_and_grads,
    make_batch,
    rpn_cfg,
    to_plugin,
)
from mmdet.models.task_modules.assigners import AssignResult
from mmdet.models.task_modules.samplers import RandomSampler
from mmdet.registry import TASK_UTILS
from mmdet.utils import register_all_modules
from mmengine.structures import InstanceData

from mmdet_anchorloss.core.sampling import sample_on_device
from mmdet_anchorloss.kernels.sync_policy import cuda_sync_policy
from mmdet_anchorloss.profiling import count_ops

CUDA = torch.cuda.is_available()
DEVICES = ['cpu'] + ([pytest.param('cuda', marks=pytest.mark.gpu)] if CUDA else [])


def _masks(device, seed=0, B=6, N=500):
    """Candidates with very different counts per image: none, few, many positives."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.rand(B, N, generator=gen)
    pos_rate = torch.tensor([0.0, 0.01, 0.05, 0.3, 0.6, 0.9])[:B, None]
    pos = u < pos_rate
    neg = ~pos & (torch.rand(B, N, generator=gen) < 0.8)
    return pos.to(device), neg.to(device)


def _upstream_counts(pos, neg, num, pos_fraction, neg_pos_ub):
    """Per-image (#pos, #neg) and the avg_factor of mmdet's own ``RandomSampler.sample`` on
    the same candidates (its draws pick other anchors; the counts are what must agree)."""
    sampler = RandomSampler(num, pos_fraction, neg_pos_ub, add_gt_as_proposals=False)
    gts = InstanceData(bboxes=torch.tensor([[0.0, 0.0, 10.0, 10.0]]), labels=torch.tensor([0]))
    counts, total = [], 0
    for p, n in zip(pos.cpu(), neg.cpu()):
        gt_inds = torch.where(p, 1, torch.where(n, 0, -1))
        res = AssignResult(1, gt_inds, torch.zeros(len(p)), torch.where(p, 0, -1))
        sampling = sampler.sample(res, InstanceData(priors=torch.zeros(len(p), 4)), gts)
        counts.append((len(sampling.pos_inds), len(sampling.neg_inds)))
        total += sampling.avg_factor
    return counts, total


@pytest.mark.parametrize('where', DEVICES)
@pytest.mark.parametrize(
    'num,pos_fraction,neg_pos_ub', [(256, 0.5, -1), (64, 0.25, 3), (40, 0.5, 0), (1000, 0.5, -1)]
)
def test_counts_subsets_and_avg_factor_are_upstreams(where, num, pos_fraction, neg_pos_ub):
    pos, neg = _masks(where)
    got_pos, got_neg, avg = sample_on_device(pos, neg, num, pos_fraction, neg_pos_ub)
    counts, total = _upstream_counts(pos, neg, num, pos_fraction, neg_pos_ub)
    assert [tuple(c) for c in torch.stack([got_pos.sum(1), got_neg.sum(1)], 1).tolist()] == counts
    assert bool((got_pos <= pos).all()) and bool((got_neg <= neg).all())  # candidates only
    assert avg.dtype == torch.float32 and float(avg) == total


def test_positives_at_the_wanted_count():
    """Images with want - 1, want and want + 1 positives (want = 8 of num = 16), and the
    negatives' bound at neg_pos_ub = 1 on each side of it: the counts are upstream's, so a
    clamp that is off by one at either boundary fails."""
    N = 40
    pos = torch.zeros(3, N, dtype=torch.bool)
    for b, n in enumerate((7, 8, 9)):
        pos[b, :n] = True
    neg = ~pos
    for ub in (-1, 1):
        got_pos, got_neg, avg = sample_on_device(pos, neg, 16, 0.5, ub)
        counts, total = _upstream_counts(pos, neg, 16, 0.5, ub)
        assert list(zip(got_pos.sum(1).tolist(), got_neg.sum(1).tolist())) == counts
        assert float(avg) == total
    assert counts == [(7, 7), (8, 8), (8, 8)]  # ub=1: as many negatives as positives


def test_choice_is_uniform_among_candidates():
    """Each candidate is kept with probability want / candidates: over 4000 draws of 10 of
    40 positives, every candidate's count is within 5 standard deviations of 1000."""
    torch.manual_seed(0)
    pos = torch.zeros(1, 60, dtype=torch.bool)
    pos[0, 10:50] = True
    neg = ~pos
    hits_pos, hits_neg = torch.zeros(60), torch.zeros(60)
    for _ in range(4000):
        p, n, _ = sample_on_device(pos, neg, 20, 0.5)  # 10 of 40 pos, 10 of 20 neg
        hits_pos += p[0].float()
        hits_neg += n[0].float()
    assert float(hits_pos[~pos[0]].sum()) == 0 and float(hits_neg[pos[0]].sum()) == 0
    for hits, expect, p in ((hits_pos[pos[0]], 1000.0, 0.25), (hits_neg[~pos[0]], 2000.0, 0.5)):
        sd = (4000 * p * (1 - p)) ** 0.5
        assert float((hits - expect).abs().max()) < 5 * sd, hits


def test_no_host_sync_and_reproducible_under_a_seed():
    pos, neg = _masks('cpu')
    torch.manual_seed(3)
    with count_ops() as counter:
        first = sample_on_device(pos, neg, 256, 0.5)
    assert counter.result().syncs == 0, counter.result()
    torch.manual_seed(3)
    again = sample_on_device(pos, neg, 256, 0.5)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    other = sample_on_device(pos, neg, 256, 0.5)
    assert not torch.equal(first[1], other[1])  # another draw, other negatives


def _device_sampler_cfg(num):
    return rpn_cfg(train_cfg=dict(sampler=dict(type='DeviceRandomSampler', num=num)))


def test_rpn_with_every_candidate_kept_is_upstreams():
    """With ``num`` above the candidates there is nothing to draw: the plugin's RPN with the
    device sampler gives upstream's RPN (RandomSampler) numbers."""
    upstream = build(rpn_cfg(train_cfg=dict(sampler=dict(num=10**7, pos_fraction=0.5))))
    plugin = build(to_plugin(_device_sampler_cfg(10**7)))
    batch = make_batch(upstream, 0, (3, 0, 5), [(64, 96), (60, 80), (64, 64)])
    ref, ref_g = loss_and_grads(upstream, *batch)
    got, got_g = loss_and_grads(plugin, *batch)
    assert_losses_match(ref, got)
    assert_grads_match(ref_g, got_g)


def test_rpn_samples_with_it_and_differs_from_upstream_only_in_the_draws():
    """At num=256 both heads sample: fewer positives than 128, so both keep them all and the
    regression loss is upstream's; the negatives are drawn, so the classification loss is
    another (finite) value, normalised by upstream's count."""
    upstream = build(rpn_cfg())
    plugin = build(to_plugin(_device_sampler_cfg(256)))
    assert type(plugin.sampler).__name__ == 'DeviceRandomSampler'
    batch = make_batch(upstream, 1, (4, 2), [(128, 160), (128, 160)])
    ref, _ = loss_and_grads(upstream, *batch)
    got, _ = loss_and_grads(plugin, *batch)
    assert_losses_match({'b': ref['loss_rpn_bbox']}, {'b': got['loss_rpn_bbox']})
    cls_ref, cls_got = torch.stack(ref['loss_rpn_cls']), torch.stack(got['loss_rpn_cls'])
    assert bool(torch.isfinite(cls_got).all()) and not torch.equal(cls_ref, cls_got)
    # same count of samples: each level's loss is a mean over 2 x 256 of similar terms
    torch.testing.assert_close(cls_got.sum(), cls_ref.sum(), rtol=0.2, atol=0)


def test_per_image_random_choice_for_other_heads():
    """Heads that sample per image call ``random_choice``: a subset of the gallery of the
    asked size, a tensor for a tensor and an ndarray for a list, as upstream."""
    register_all_modules()
    sampler = TASK_UTILS.build(dict(type='DeviceRandomSampler', num=8, pos_fraction=0.5))
    gallery = torch.arange(100, 200)
    chosen = sampler.random_choice(gallery, 30)
    assert isinstance(chosen, torch.Tensor) and len(chosen.unique()) == 30
    assert bool(((chosen >= 100) & (chosen < 200)).all())
    from_list = sampler.random_choice(list(range(5)), 5)
    assert isinstance(from_list, np.ndarray) and sorted(from_list.tolist()) == [0, 1, 2, 3, 4]


def test_rpn_head_samples_the_batch_without_reading_counts_back():
    """The head takes the sampler's batched form: the step makes the budget's 2 syncs (the
    RandomSampler's RPN step makes 3; per-image sampling, one or more per image)."""
    head = build(to_plugin(_device_sampler_cfg(16)))
    cls, reg, gts, metas, ignore = make_batch(head, 0, (3, 1, 0), [(100, 120), (64, 90), (64, 90)])
    for _ in range(2):  # the counted step is the second: the first compiles
        cls = [c.detach().requires_grad_() for c in cls]
        with cuda_sync_policy(), count_ops() as counter:
            losses = head.loss_by_feat(cls, reg, gts, metas, ignore)
            sum(sum(v) for v in losses.values()).backward()
    got = counter.result()
    assert got.syncs == 2, dict(got.sync_sites)
    assert not any('sampling.py' in site for site in got.sync_sites), dict(got.sync_sites)


def test_the_heads_batched_form_and_its_way_out():
    """``sample_masks`` is what ``sample_batch`` calls: upstream's counts for the batch; with
    ``add_gt_as_proposals`` it declines (None), and the head samples per image."""
    register_all_modules()
    cfg = dict(type='DeviceRandomSampler', num=64, pos_fraction=0.25, neg_pos_ub=3)
    pos, neg = _masks('cpu')
    sampler = TASK_UTILS.build(dict(cfg, add_gt_as_proposals=False))
    got_pos, got_neg, avg = sampler.sample_masks(pos, neg)
    counts, total = _upstream_counts(pos, neg, 64, 0.25, 3)
    assert list(zip(got_pos.sum(1).tolist(), got_neg.sum(1).tolist())) == counts
    assert float(avg) == total
    assert TASK_UTILS.build(dict(cfg, add_gt_as_proposals=True)).sample_masks(pos, neg) is None


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason='needs CUDA')
def test_cuda_draw_makes_no_synchronizing_call():
    """On CUDA the batched draw runs under ``set_sync_debug_mode('error')``: nothing in it
    waits for the device."""
    pos, neg = _masks('cuda')
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode('error')
    try:
        p, n, avg = sample_on_device(pos, neg, 256, 0.5)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    _, total = _upstream_counts(pos, neg, 256, 0.5, -1)
    assert float(avg) == total
