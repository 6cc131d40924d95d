"""Bad input gets a ValueError naming the image, the box and the value; nothing changes."""

import copy
import warnings

import pytest
import torch
from helpers import build, make_batch, retina_cfg, to_plugin
from mmengine.logging import MessageHub
from mmengine.structures import InstanceData

SHAPES = [(100, 120), (64, 90)]


@pytest.fixture
def head():
    return build(to_plugin(retina_cfg(num_classes=5)))


@pytest.fixture
def batch(head):
    return make_batch(head, 0, (3, 2), SHAPES)


def _snapshot(args):
    """Deep copies of every tensor among the inputs (maps, boxes, labels, metas)."""
    cls, reg, gts, metas, ignore = args
    return (
        [t.detach().clone() for t in cls],
        [t.detach().clone() for t in reg],
        [{k: v.clone() for k, v in g.items()} for g in gts],
        copy.deepcopy(metas),
        None if ignore is None else [None if g is None else g.bboxes.clone() for g in ignore],
    )


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        # NaN counts as equal to NaN: some inputs are made invalid with one on purpose
        return isinstance(b, torch.Tensor) and torch.equal(a.nan_to_num(7.5), b.nan_to_num(7.5))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _raises(head, args, *words):
    before = _snapshot(args)
    hub = MessageHub.get_instance(f'validation_{id(args)}')
    MessageHub._instance_dict.move_to_end(hub.instance_name)  # make it current
    with pytest.raises(ValueError) as err, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        head.loss_by_feat(*args)
    msg = str(err.value)
    for word in words:
        assert word in msg, f'{word!r} not in {msg!r}'
    # nothing changed: the inputs are as they were, nothing was logged or warned
    assert _same(before, _snapshot(args)), 'loss_by_feat changed its inputs before raising'
    assert not any(k.startswith('train/') for k in hub.log_scalars), list(hub.log_scalars)
    assert not caught, [str(w.message) for w in caught]
    return msg


def test_the_nothing_changes_check_can_fail(head, batch):
    """A call that succeeds logs its statistics, so the check above would see a leak."""
    hub = MessageHub.get_instance('validation_success')
    MessageHub._instance_dict.move_to_end('validation_success')
    before = _snapshot(batch)
    head.loss_by_feat(*batch)
    assert any(k.startswith('train/assign/') for k in hub.log_scalars)
    changed = list(batch[2])
    changed[0] = changed[0].clone()
    changed[0].bboxes = changed[0].bboxes + 1
    assert _same(before, _snapshot(batch))
    assert not _same(before, _snapshot((*batch[:2], changed, *batch[3:])))


@pytest.mark.parametrize(
    'coords, words',
    [
        ((float('nan'), 1.0, 10.0, 10.0), ['NaN or infinite', 'nan']),
        ((1.0, 1.0, float('inf'), 10.0), ['NaN or infinite', 'inf']),
        ((20.0, 1.0, 10.0, 10.0), ['x2 < x1']),
        ((1.0, 30.0, 10.0, 10.0), ['y2 < y1']),
    ],
)
def test_malformed_box(head, batch, coords, words):
    cls, reg, gts, metas, ignore = batch
    gts[1].bboxes[1] = torch.tensor(coords)
    msg = _raises(head, (cls, reg, gts, metas, ignore), 'image 1', 'img_id=1', 'gt box 1', *words)
    assert 'invalid ground truth' in msg


@pytest.mark.parametrize('label', [-1, 5, 80])
def test_label_out_of_range(head, batch, label):
    cls, reg, gts, metas, ignore = batch
    gts[0].labels[2] = label
    _raises(head, (cls, reg, gts, metas, ignore), 'image 0', 'gt box 2', f'label {label}', '[0, 5)')


def test_level_count_mismatch(head, batch):
    cls, reg, gts, metas, ignore = batch
    _raises(head, (cls[:4], reg[:4], gts, metas, ignore), '5 levels', 'got 4 cls_scores')


def test_channel_mismatch(head, batch):
    cls, reg, gts, metas, ignore = batch
    cls = list(cls)
    cls[2] = torch.zeros(2, 9 * 4, *cls[2].shape[-2:])
    _raises(head, (cls, reg, gts, metas, ignore), 'level 2', 'cls_score has shape', '9*5')


def test_spatial_mismatch(head, batch):
    cls, reg, gts, metas, ignore = batch
    reg = list(reg)
    reg[1] = torch.zeros(2, 36, reg[1].shape[-2] + 1, reg[1].shape[-1])
    _raises(head, (cls, reg, gts, metas, ignore), 'level 1', 'bbox_pred')


def test_batch_length_mismatch(head, batch):
    cls, reg, gts, metas, ignore = batch
    _raises(
        head,
        (cls, reg, gts[:1], metas, ignore),
        'batch_gt_instances has 1',
        'batch_img_metas has 2',
    )


def test_bad_ignore_box(head, batch):
    cls, reg, gts, metas, _ = batch
    ignore = [InstanceData(bboxes=torch.tensor([[5.0, 5.0, 1.0, 9.0]])), None]
    _raises(head, (cls, reg, gts, metas, ignore), 'image 0', 'ignore box 0', 'x2 < x1')


def test_check_finite_names_the_level(batch):
    cfg = to_plugin(retina_cfg(num_classes=5))
    cfg['check_finite'] = True
    head = build(cfg)
    cls, reg, gts, metas, ignore = batch
    cls = [c.detach().clone() for c in cls]
    cls[3][0, 0, 0, 0] = float('nan')
    _raises(head, (cls, reg, gts, metas, ignore), 'cls_score of level 3', 'non-finite')
    # off by default: no error, the NaN reaches the loss as upstream's would
    loose = build(to_plugin(retina_cfg(num_classes=5)))
    losses = loose.loss_by_feat(cls, reg, gts, metas, ignore)
    assert torch.isnan(losses['loss_cls'][3])


def test_empty_gts_are_valid(head):
    cls, reg, gts, metas, ignore = make_batch(head, 0, (0, 0), SHAPES)
    losses = head.loss_by_feat(cls, reg, gts, metas, ignore)
    assert all(float(v) == 0 for v in losses['loss_bbox'])
    assert all(float(v) > 0 for v in losses['loss_cls'])


def test_no_anchor_inside(head, batch):
    cfg = to_plugin(retina_cfg(num_classes=5, train_cfg=dict(allowed_border=0)))
    head = build(cfg)
    cls, reg, gts, metas, ignore = batch
    metas = [dict(m) for m in metas]
    metas[1]['img_shape'] = (2, 2)
    _raises(
        head, (cls, reg, gts, metas, ignore), 'image 1', 'no valid anchor inside', 'allowed_border'
    )
