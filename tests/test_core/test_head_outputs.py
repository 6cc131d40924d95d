"""Shapes the docstrings promise, and the assignment statistics sent to the MessageHub."""

import pytest
import torch
from helpers import build, make_batch, retina_cfg, rpn_cfg, to_plugin
from mmengine.logging import MessageHub

from mmdet_anchorloss.heads.batched_loss import LossInputs

SHAPES = [(100, 120), (64, 90), (128, 128)]


def test_batch_targets_shapes():
    head = build(to_plugin(retina_cfg(num_classes=5)))
    cls, reg, gts, metas, ignore = make_batch(head, 0, (3, 0, 2), SHAPES)
    sizes = [c.shape[-2:] for c in cls]
    out = head.batch_targets(sizes, gts, metas, ignore, device=torch.device('cpu'))
    assert isinstance(out, LossInputs)
    B, N = 3, sum(out.anchors.level_sizes)
    a, t = out.anchors, out.targets
    assert a.anchors.shape == (N, 4) and a.inside.shape == (B, N) and a.level_ids.shape == (N,)
    assert a.level_sizes == [c.shape[-2] * c.shape[-1] * 9 for c in cls]
    assert out.gts.bboxes.shape == (B, 3, 4) and out.gts.mask.sum() == 5
    for name in ('labels', 'label_weights', 'pos_mask', 'neg_mask'):
        assert getattr(t, name).shape == (B, N), name
    P = int(t.pos_mask.sum())
    assert t.pos_batch_inds.shape == t.pos_anchor_inds.shape == (P,)
    assert t.pos_bbox_targets.shape == t.pos_gt_bboxes.shape == (P, 4)
    assert t.avg_factor.dim() == 0
    assert t.labels.dtype == torch.long and t.labels.max() <= 5
    assert not t.pos_mask[1].any()  # the empty image has no positive


def test_assignment_statistics_reach_the_message_hub():
    head = build(to_plugin(retina_cfg(num_classes=5)))
    cls, reg, gts, metas, ignore = make_batch(head, 0, (3, 0, 2), SHAPES)
    hub = MessageHub.get_instance('anchorloss_stats_test')
    MessageHub._instance_dict.move_to_end('anchorloss_stats_test')  # make it current
    head.loss_by_feat(cls, reg, gts, metas, ignore)
    pos = [hub.get_scalar(f'train/assign/pos_l{i}').current() for i in range(5)]
    sizes = [c.shape[-2:] for c in cls]
    t = head.batch_targets(sizes, gts, metas, ignore, device=torch.device('cpu')).targets
    ids = t.assign.gt_inds > 0
    expected = [float(ids[:, s:e].sum()) / 3 for s, e in _bounds(head, sizes)]
    assert pos == pytest.approx(expected) and sum(pos) > 0
    assert hub.get_scalar('train/assign/gts_without_pos').current() == 0.0

    quiet = build(dict(to_plugin(retina_cfg(num_classes=5)), log_assign_stats=False))
    hub2 = MessageHub.get_instance('anchorloss_stats_quiet')
    MessageHub._instance_dict.move_to_end('anchorloss_stats_quiet')
    quiet.loss_by_feat(cls, reg, gts, metas, ignore)
    assert 'train/assign/pos_l0' not in hub2.log_scalars


def _bounds(head, sizes):
    start = 0
    for (h, w), a in zip(sizes, head.prior_generator.num_base_anchors):
        yield start, start + h * w * a
        start += h * w * a


def test_plugin_ssd_head_predicts():
    """The plugin SSD head predicts what upstream's SSDHead predicts with the same weights.

    mmdet 3.3.0's SSDHead has no ``loss_cls``, which ``_predict_by_feat_single`` reads with
    ``getattr(self.loss_cls, 'custom_cls_channels', False)``; it is given ``None`` here.
    """
    from helpers import ssd_cfg
    from mmengine.config import ConfigDict
    from mmengine.structures import BaseDataElement

    test_cfg = dict(
        nms_pre=100,
        nms=dict(type='nms', iou_threshold=0.45),
        min_bbox_size=0,
        score_thr=0.02,
        max_per_img=20,
    )
    upstream = build(ssd_cfg())
    upstream.loss_cls = None
    head = build(to_plugin(ssd_cfg()))
    head.load_state_dict(upstream.state_dict())
    for h in (upstream, head):
        h.test_cfg = ConfigDict(test_cfg)
        h.eval()
    gen = torch.Generator().manual_seed(0)
    feats = tuple(torch.randn(2, 8, s, s, generator=gen) for s in (38, 19, 10, 5, 3, 1))
    metas = [
        dict(img_shape=(300, 300), scale_factor=(1.0, 1.0), ori_shape=(300, 300)),
        dict(img_shape=(280, 300), scale_factor=(0.5, 0.5), ori_shape=(560, 600)),
    ]
    samples = [BaseDataElement(metainfo=m) for m in metas]
    with torch.no_grad():
        ref = upstream.predict(feats, samples, rescale=True)
        got = head.predict(feats, samples, rescale=True)
    assert len(got) == len(ref) == 2
    for r, g in zip(ref, got):
        assert g.bboxes.shape == (20, 4) and g.scores.shape == (20,)
        torch.testing.assert_close(g.bboxes, r.bboxes)
        torch.testing.assert_close(g.scores, r.scores)
        assert torch.equal(g.labels, r.labels)
    assert not torch.equal(got[0].bboxes, got[1].bboxes)  # rescaled per image


def test_inside_flags_kept_per_batch_of_image_shapes_are_upstreams():
    """The inside flags are kept with the anchor grid per batch of image shapes: batches of
    one feature-map size in turn, with other image shapes and a repeat, each get
    upstream's flags (``valid_flags`` by pad shape, ``anchor_inside_flags`` by image shape,
    the RPN's allowed_border 0)."""
    from mmdet.models.task_modules.prior_generators import anchor_inside_flags

    head = build(to_plugin(rpn_cfg(train_cfg=dict(allowed_border=0))))  # mmdet's RPN's
    layouts = [
        [(100, 120), (64, 90)],
        [(128, 128), (30, 128)],  # same batch shape, other images
        [(100, 120), (64, 90)],  # the first again: kept
        [(100, 100), (64, 90)],
    ]
    seen = []
    for shapes in layouts:
        cls, _, gts, metas, _ = make_batch(head, 0, (2, 1), shapes)
        sizes = [tuple(c.shape[-2:]) for c in cls]
        assert sizes == [(32, 32), (16, 16), (8, 8), (4, 4), (2, 2)]  # one grid for all
        a = head.batch_targets(sizes, gts, metas, None, device=torch.device('cpu')).anchors
        for i, meta in enumerate(metas):
            valid = torch.cat(head.prior_generator.valid_flags(sizes, meta['pad_shape'], 'cpu'))
            want = anchor_inside_flags(a.anchors, valid, meta['img_shape'], 0)
            assert torch.equal(a.inside[i], want), (shapes, i)
        seen.append(a.inside)
    assert seen[2] is seen[0] and seen[1] is not seen[0]
    assert not torch.equal(seen[0], seen[1]) and not torch.equal(seen[0], seen[3])
