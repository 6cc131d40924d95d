"""Targets equal upstream's exactly; batched equals one image at a time."""

import pytest
import torch
from helpers import build, make_batch, retina_cfg, rpn_cfg, ssd_cfg, to_plugin
from mmengine.structures import InstanceData

from mmdet_anchorloss.assigners import BatchMaxIoUAssigner

SHAPES = [(100, 120), (64, 90), (128, 128)]


def upstream_targets(head, cls_scores, gts, metas, ignore):
    sizes = [c.shape[-2:] for c in cls_scores]
    anchors, valid = head.get_anchors(sizes, metas, device='cpu')
    labels, label_w, bbox_t, bbox_w, avg = head.get_targets(anchors, valid, gts, metas, ignore)
    cat = lambda xs: torch.cat(xs, dim=1)  # noqa: E731
    return cat(labels), cat(label_w), cat(bbox_t), cat(bbox_w), avg


CFGS = {
    'retina': (retina_cfg(), {}),
    'retina_ignore': (
        retina_cfg(train_cfg=dict(assigner=dict(ignore_iof_thr=0.5), allowed_border=0)),
        dict(num_ignore=(1, 1, 2)),
    ),
    'retina_no_assign_all': (
        retina_cfg(train_cfg=dict(assigner=dict(gt_max_assign_all=False))),
        dict(duplicate=True),
    ),
    'ssd': (ssd_cfg(), {}),
    'rpn': (rpn_cfg(), {}),
}


@pytest.mark.parametrize('name', list(CFGS))
def test_targets_equal_upstream(name):
    cfg, kwargs = CFGS[name]
    upstream, plugin = build(cfg), build(to_plugin(cfg))
    shapes = [(300, 300), (250, 300), (300, 280)] if name == 'ssd' else SHAPES
    cls, reg, gts, metas, ignore = make_batch(
        upstream, 5, (4, 0, 7), shapes, pad_divisor=1 if name == 'ssd' else 32, **kwargs
    )
    torch.manual_seed(11)
    labels, label_w, bbox_t, bbox_w, avg = upstream_targets(upstream, cls, gts, metas, ignore)
    torch.manual_seed(11)
    sizes = [c.shape[-2:] for c in cls]
    got = plugin.batch_targets(sizes, gts, metas, ignore, device=torch.device('cpu')).targets
    got_t, got_w = got.dense_bbox_targets()
    assert got.labels.shape == labels.shape and got_t.shape == bbox_t.shape
    assert torch.equal(got.labels, labels)
    assert torch.equal(got.label_weights, label_w)
    assert torch.equal(got_w, bbox_w)
    assert torch.equal(got_t, bbox_t)
    assert float(got.avg_factor) == avg
    assert int(got.pos_mask.sum()) > 0


def test_batched_equals_one_image_at_a_time():
    cfg = to_plugin(retina_cfg(train_cfg=dict(assigner=dict(ignore_iof_thr=0.5))))
    head = build(cfg)
    cls, reg, gts, metas, ignore = make_batch(head, 2, (5, 0, 3), SHAPES, num_ignore=(1, 0, 2))
    sizes = [c.shape[-2:] for c in cls]
    batched = head.batch_targets(sizes, gts, metas, ignore, device=torch.device('cpu')).targets
    total = 0.0
    for i in range(3):
        one = head.batch_targets(
            sizes, gts[i : i + 1], metas[i : i + 1], ignore[i : i + 1], device=torch.device('cpu')
        ).targets
        assert torch.equal(one.labels[0], batched.labels[i])
        assert torch.equal(one.label_weights[0], batched.label_weights[i])
        assert torch.equal(one.assign.gt_inds[0], batched.assign.gt_inds[i])
        total += float(one.avg_factor)
    assert total == float(batched.avg_factor)


def test_single_image_assign_matches_upstream_assigner():
    gen = torch.Generator().manual_seed(0)
    priors = torch.rand(400, 4, generator=gen) * 50
    priors[:, 2:] += priors[:, :2] + 2
    gt = priors[torch.tensor([3, 3, 50, 120])] + torch.tensor([1.0, 0.0, 2.0, 1.0])
    ignore = priors[torch.tensor([7])]
    kw = dict(pos_iou_thr=0.5, neg_iou_thr=(0.1, 0.4), min_pos_iou=0.2, ignore_iof_thr=0.5)
    from mmdet.models.task_modules.assigners import MaxIoUAssigner

    for assign_all in (True, False):
        ref = MaxIoUAssigner(gt_max_assign_all=assign_all, **kw).assign(
            InstanceData(priors=priors),
            InstanceData(bboxes=gt, labels=torch.tensor([0, 1, 2, 3])),
            InstanceData(bboxes=ignore),
        )
        got = BatchMaxIoUAssigner(gt_max_assign_all=assign_all, **kw).assign(
            InstanceData(priors=priors),
            InstanceData(bboxes=gt, labels=torch.tensor([0, 1, 2, 3])),
            InstanceData(bboxes=ignore),
        )
        assert torch.equal(ref.gt_inds, got.gt_inds)
        assert torch.equal(ref.labels, got.labels)
        assert torch.equal(ref.max_overlaps, got.max_overlaps)
        assert (got.gt_inds == 2).any()  # the duplicate gt overwrote its twin's anchors
