"""Fused sigmoid losses: upstream interface, compiled and eager kernels, gradients."""

import pytest
import torch
from helpers import (
    assert_grads_match,
    assert_losses_match,
    build,
    loss_and_grads,
    make_batch,
    retina_cfg,
    rpn_cfg,
    to_plugin,
)
from mmdet.models.losses import CrossEntropyLoss, FocalLoss

from mmdet_anchorloss.kernels import sigmoid as sigmoid_kernels
from mmdet_anchorloss.losses import FusedCrossEntropyLoss, FusedFocalLoss


def _rows(seed=0, R=300, C=7):
    gen = torch.Generator().manual_seed(seed)
    pred = torch.randn(R, C, generator=gen) * 3
    labels = torch.randint(0, C + 1, (R,), generator=gen)
    weight = (torch.rand(R, generator=gen) > 0.2).float() * 1.5
    return pred, labels, weight


def _value_and_grad(loss, pred, *args, **kwargs):
    x = pred.clone().requires_grad_()
    out = loss(x, *args, **kwargs)
    out.sum().backward()
    return out.detach(), x.grad


@pytest.mark.parametrize('kwargs', [dict(), dict(gamma=1.5, alpha=0.4, loss_weight=2.0)])
@pytest.mark.parametrize('avg_factor', [None, 37.0])
def test_focal_upstream_interface(kwargs, avg_factor):
    pred, labels, weight = _rows()
    ref = _value_and_grad(FocalLoss(**kwargs), pred, labels, weight, avg_factor=avg_factor)
    got = _value_and_grad(FusedFocalLoss(**kwargs), pred, labels, weight, avg_factor=avg_factor)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-7)
    assert_grads_match([ref[1]], [got[1]])


def test_focal_falls_back_where_not_fused():
    pred, labels, weight = _rows()
    onehot = torch.nn.functional.one_hot(labels, 8)[:, :7].float()
    for args, kw in [
        ((onehot, weight[:, None].expand(-1, 7)), {}),
        ((labels, weight), dict(reduction_override='none')),
    ]:
        ref = FocalLoss()(pred, *args, **kw)
        got = FusedFocalLoss()(pred, *args, **kw)
        assert got.shape == ref.shape
        torch.testing.assert_close(got, ref)


@pytest.mark.parametrize('use_sigmoid', [True, False])
def test_cross_entropy_upstream_interface(use_sigmoid):
    pred, labels, weight = _rows(C=1 if use_sigmoid else 5)
    labels = labels.clamp(max=pred.size(1) - (0 if use_sigmoid else 1))
    ref = _value_and_grad(
        CrossEntropyLoss(use_sigmoid=use_sigmoid), pred, labels, weight, avg_factor=50.0
    )
    got = _value_and_grad(
        FusedCrossEntropyLoss(use_sigmoid=use_sigmoid), pred, labels, weight, avg_factor=50.0
    )
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-7)
    assert_grads_match([ref[1]], [got[1]])


def test_eager_chunks_equal_whole(monkeypatch):
    head = build(to_plugin(retina_cfg()))
    batch = make_batch(head, 4, (4, 1), [(100, 120), (64, 90)])
    whole, whole_g = loss_and_grads(head, *batch)
    monkeypatch.setattr(sigmoid_kernels, '_EAGER_CHUNK', 97)  # many ragged chunks
    chunked, chunked_g = loss_and_grads(head, *batch)
    assert_losses_match(whole, chunked, rtol=1e-6)
    assert_grads_match(whole_g, chunked_g, tol=1e-6)


@pytest.mark.parametrize('make_cfg', [retina_cfg, rpn_cfg], ids=['focal', 'sigmoid_ce'])
def test_compiled_kernels_match_upstream(monkeypatch, make_cfg):
    """The torch.compile path (the default outside tests) against upstream."""
    for kernel in (sigmoid_kernels.loss_and_grad_kernel,):
        monkeypatch.setattr(kernel, 'mode', '1')  # compile, or raise
    cfg = make_cfg()
    upstream, plugin = build(cfg), build(to_plugin(cfg))
    batch = make_batch(upstream, 9, (5, 2), [(100, 120), (64, 90)])
    ref, ref_g = loss_and_grads(upstream, *batch)
    got, got_g = loss_and_grads(plugin, *batch)
    for kernel in (sigmoid_kernels.loss_and_grad_kernel,):
        assert kernel._compiled is not None and not kernel.failed
    assert_losses_match(ref, got)
    assert_grads_match(ref_g, got_g)


def test_no_grad_forward_and_grad_is_handed_over():
    """Without grad the loss-only kernel runs; with grad the leaf receives our buffer."""
    head = build(to_plugin(retina_cfg()))
    cls, reg, gts, metas, ignore = make_batch(head, 1, (3,), [(100, 120)])
    with torch.no_grad():
        plain = head.loss_by_feat(cls, reg, gts, metas, ignore)
    graded, grads = loss_and_grads(head, cls, reg, gts, metas, ignore)
    assert_losses_match(plain, graded, rtol=1e-6)
    assert all(g.abs().sum() > 0 for g in grads[:5])


def test_compiled_softmax_matches_upstream_ssd(monkeypatch):
    from helpers import ssd_cfg

    from mmdet_anchorloss.kernels import softmax as softmax_levels

    for kernel in (softmax_levels.lse_and_prob_kernel, softmax_levels.lse_only_kernel):
        monkeypatch.setattr(kernel, 'mode', '1')
    cfg = ssd_cfg()
    upstream, plugin = build(cfg), build(to_plugin(cfg))
    batch = make_batch(upstream, 2, (3, 1), [(300, 300), (280, 300)], pad_divisor=1)
    ref, ref_g = loss_and_grads(upstream, *batch)
    got, got_g = loss_and_grads(plugin, *batch)
    assert softmax_levels.lse_and_prob_kernel._compiled is not None
    assert_losses_match(ref, got)
    assert_grads_match(ref_g, got_g)


def test_hard_negatives_are_picked_by_rank_by():
    """SSD's mining keeps the ``num_neg`` negatives that ``rank_by`` ranks highest and sums
    their own losses; without it, the losses rank themselves."""
    from mmdet_anchorloss.heads.anchor_loss_ssd_head import hard_negative_sum

    loss = torch.tensor([[1.0, 1.0001, 0.5, 9.0]], requires_grad=True)
    neg = torch.tensor([[True, True, True, False]])  # the 9.0 is a positive
    rank = torch.tensor([[1.0001, 1.0, 0.5, 9.0]])
    one = torch.tensor([1])
    assert hard_negative_sum(loss, neg, one).item() == pytest.approx(1.0001)
    total = hard_negative_sum(loss, neg, one, rank_by=rank)
    assert total.item() == 1.0
    total.backward()
    assert loss.grad.tolist() == [[1.0, 0.0, 0.0, 0.0]]
    both = hard_negative_sum(loss, neg, torch.tensor([2]), rank_by=rank)
    assert both.item() == pytest.approx(2.0001)


def _tied_negatives(device: str, seed: int = 0):
    """(4, 3000) ranks on a grid of 1/8 (ties everywhere, as among half values, only more),
    their negatives and how many to keep."""
    gen = torch.Generator().manual_seed(seed)
    rank = (torch.randn(4, 3000, generator=gen) * 8).round() / 8
    neg = torch.rand(4, 3000, generator=gen) < 0.9
    num_neg = torch.tensor([40, 1, 200, 7])
    return rank.to(device), neg.to(device), num_neg.to(device)


def test_hard_negative_ties_go_to_the_lower_anchor_index():
    """Ranked on half values (upstream's cross-entropy under CUDA autocast), negatives tie:
    of those equal to the last value kept, the lower anchor indices are kept (CUDA's topk
    fills its last places with equal values in index order)."""
    from mmdet_anchorloss.heads.anchor_loss_ssd_head import hard_negative_sum

    loss = torch.tensor([[5.0, 2.0, 2.0, 2.0, 2.0]], requires_grad=True)
    neg = torch.tensor([[True, False, True, True, True]])
    rank = torch.tensor([[3.0, 1.0, 1.0, 1.0, 1.0]])  # anchors 2, 3, 4 tie
    total = hard_negative_sum(loss, neg, torch.tensor([3]), rank_by=rank)
    total.backward()
    assert loss.grad.tolist() == [[1.0, 0.0, 1.0, 1.0, 0.0]]  # anchor 1 is no negative
    rank, neg, num_neg = _tied_negatives('cpu')
    leaf = rank.clone().requires_grad_()
    hard_negative_sum(leaf, neg, num_neg, rank_by=rank).sum().backward()
    for b in range(4):
        kept = leaf.grad[b].nonzero().flatten()
        cut = rank[b, kept].min()
        assert len(kept) == num_neg[b] and bool((rank[b, kept] >= cut).all())
        ties = ((rank[b] == cut) & neg[b]).nonzero().flatten()
        tied_kept = kept[rank[b, kept] == cut]
        assert len(ties) > len(tied_kept) or b == 1, (b, ties, tied_kept)  # a real tie at the cut
        assert torch.equal(tied_kept, ties[: len(tied_kept)])  # the lowest indices


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_hard_negatives_keep_the_anchors_cuda_topk_keeps():
    """Upstream keeps ``loss[neg_inds].topk(num_neg)`` per image; on CUDA, with ties at the
    cut, the plugin's batched mining keeps the same anchors."""
    from mmdet_anchorloss.heads.anchor_loss_ssd_head import hard_negative_sum

    for seed in range(3):
        rank, neg, num_neg = _tied_negatives('cuda', seed)
        leaf = rank.clone().requires_grad_()
        hard_negative_sum(leaf, neg, num_neg, rank_by=rank).sum().backward()
        for b in range(4):
            neg_inds = neg[b].nonzero().flatten()
            _, top = rank[b][neg_inds].topk(int(num_neg[b]))
            expect = neg_inds[top].sort().values
            assert torch.equal(leaf.grad[b].nonzero().flatten(), expect), (seed, b)


def test_ssd_mining_follows_upstreams_ranking_when_the_losses_are_off_by_rounding(monkeypatch):
    """Where the plugin's cross-entropy is not bitwise upstream's (the Triton kernels on a
    GPU), two nearly equal negatives can swap at the cut and the gradient goes to another
    anchor. The head ranks by upstream's own values there: with a cross-entropy off by
    noise of 3e-3, the gradients are still upstream's (and are not without the ranking)."""
    from helpers import ssd_cfg

    from mmdet_anchorloss.heads import anchor_loss_ssd_head as ssd_head

    rows = ssd_head.softmax_cross_entropy_rows
    gen = torch.Generator().manual_seed(0)

    def rounded_off(*args):
        ce = rows(*args)
        return ce + 3e-3 * torch.randn(ce.shape, generator=gen).to(ce)

    monkeypatch.setattr(ssd_head, 'softmax_cross_entropy_rows', rounded_off)
    cfg = ssd_cfg()
    upstream, plugin = build(cfg), build(to_plugin(cfg))
    batch = make_batch(upstream, 2, (3, 1), [(300, 300), (280, 300)], pad_divisor=1)
    ref, ref_g = loss_and_grads(upstream, *batch)
    monkeypatch.setattr(ssd_head, 'use_triton', lambda x: True)  # the GPU's choice
    got, got_g = loss_and_grads(plugin, *batch)
    assert_losses_match(ref, got, rtol=1e-3)
    assert_grads_match(ref_g, got_g)
    monkeypatch.setattr(ssd_head, 'use_triton', lambda x: False)
    _, unranked_g = loss_and_grads(plugin, *batch)
    with pytest.raises(AssertionError):
        assert_grads_match(ref_g, unranked_g)
