"""Batched coder, and the mmdet 2.x call names."""

import torch
from helpers import build, make_batch, retina_cfg, to_plugin
from mmdet.models.task_modules.coders import DeltaXYWHBBoxCoder

from mmdet_anchorloss.coders import BatchDeltaXYWHBBoxCoder


def test_batched_coder_equals_upstream():
    kw = dict(target_means=(0.1, 0.0, -0.1, 0.2), target_stds=(0.1, 0.1, 0.2, 0.2))
    gen = torch.Generator().manual_seed(0)
    anchors = torch.rand(50, 4, generator=gen) * 100
    anchors[:, 2:] += anchors[:, :2] + 1
    gts = torch.rand(3, 50, 4, generator=gen) * 100
    gts[..., 2:] += gts[..., :2] + 1
    up, ours = DeltaXYWHBBoxCoder(**kw), BatchDeltaXYWHBBoxCoder(**kw)
    deltas = ours.encode_batch(anchors, gts)
    assert deltas.shape == (3, 50, 4)
    for b in range(3):
        assert torch.equal(deltas[b], up.encode(anchors, gts[b]))
    decoded = ours.decode_batch(anchors, deltas)
    assert decoded.shape == (3, 50, 4)
    for b in range(3):
        assert torch.equal(decoded[b], up.decode(anchors, deltas[b]))


def test_legacy_loss_and_loss_single():
    cfg = retina_cfg()
    upstream, plugin = build(cfg), build(to_plugin(cfg))
    cls, reg, gts, metas, _ = make_batch(plugin, 1, (3, 2), [(100, 120), (64, 90)])
    new = plugin.loss_by_feat(cls, reg, gts, metas)
    old = plugin.legacy_loss(
        cls, reg, [g.bboxes for g in gts], [g.labels for g in gts], metas, gt_bboxes_ignore=None
    )
    for key in new:
        assert torch.equal(torch.stack(new[key]), torch.stack(old[key]))
    # loss_single: one level with the 2.x argument names, against upstream's level-0 loss
    sizes = [c.shape[-2:] for c in cls]
    anchors, valid = upstream.get_anchors(sizes, metas, device='cpu')
    labels, lw, bt, bw, avg = upstream.get_targets(anchors, valid, gts, metas)
    level_anchors = torch.stack([a[0] for a in anchors])
    ref = upstream.loss_by_feat_single(
        cls[0], reg[0], level_anchors, labels[0], lw[0], bt[0], bw[0], avg_factor=avg
    )
    got = plugin.loss_single(
        cls[0], reg[0], level_anchors, labels[0], lw[0], bt[0], bw[0], num_total_samples=avg
    )
    torch.testing.assert_close(torch.stack(got), torch.stack(ref), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(
        torch.stack(got),
        torch.stack([new['loss_cls'][0], new['loss_bbox'][0]]),
        rtol=1e-5,
        atol=1e-7,
    )


def test_decode_batch_is_upstreams_decode_without_a_host_copy():
    """``decode_batch`` (no max_shape, as the loss decodes) equals upstream's ``decode`` bit
    for bit: with the centre clamp (YOLOF's), in float16 (AMP), and with large deltas that
    the ratio clip cuts. It copies nothing from the host (``delta2bbox`` copies the means and
    stds at every call: a host sync on CUDA)."""
    from mmdet_anchorloss.profiling import count_ops

    gen = torch.Generator().manual_seed(1)
    anchors = torch.rand(64, 4, generator=gen) * 100
    anchors[:, 2:] += anchors[:, :2] + 1
    deltas = torch.randn(2, 64, 4, generator=gen) * 4
    kw = dict(target_means=(0.1, 0.0, -0.1, 0.2), target_stds=(0.1, 0.1, 0.2, 0.2))
    for extra, dtype in [
        ({}, torch.float32),
        (dict(add_ctr_clamp=True, ctr_clamp=8), torch.float32),
        ({}, torch.float16),
    ]:
        up, ours = DeltaXYWHBBoxCoder(**kw, **extra), BatchDeltaXYWHBBoxCoder(**kw, **extra)
        d = deltas.to(dtype)
        ours.decode_batch(anchors, d)  # the constants go to the device once
        with count_ops() as counter:
            got = ours.decode_batch(anchors, d)
        assert counter.result().syncs == 0, dict(counter.result().sync_sites)
        for b in range(2):
            ref = up.decode(anchors, d[b])
            assert got.dtype == ref.dtype and torch.equal(got[b], ref), (extra, dtype)
