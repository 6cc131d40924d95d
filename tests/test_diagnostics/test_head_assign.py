"""The diagnostics assign exactly as upstream AnchorHead.get_targets does."""

import pytest
import torch

pytest.importorskip('mmdet')

from mmdet.models.data_preprocessors import DetDataPreprocessor  # noqa: E402
from mmdet.registry import MODELS  # noqa: E402
from mmdet.testing import demo_mm_inputs  # noqa: E402
from mmdet.utils import register_all_modules  # noqa: E402

from mmdet_anchorloss.diagnostics import per_image_stats  # noqa: E402
from mmdet_anchorloss.diagnostics.head_assign import (  # noqa: E402
    assign_like_head,
    build_head_parts,
)

register_all_modules()

ANCHOR_GENERATOR = dict(
    type='AnchorGenerator',
    octave_base_scale=4,
    scales_per_octave=3,
    ratios=[0.5, 1.0, 2.0],
    strides=[8, 16, 32, 64, 128],
)


def retina_model_cfg(allowed_border: int, min_pos_iou: float = 0.0) -> dict:
    train_cfg = dict(
        assigner=dict(
            type='MaxIoUAssigner', pos_iou_thr=0.5, neg_iou_thr=0.4, min_pos_iou=min_pos_iou
        ),
        sampler=dict(type='PseudoSampler'),
        allowed_border=allowed_border,
        pos_weight=-1,
        debug=False,
    )
    head = dict(
        type='RetinaHead',
        num_classes=3,
        in_channels=8,
        feat_channels=8,
        stacked_convs=1,
        anchor_generator=ANCHOR_GENERATOR,
        bbox_coder=dict(
            type='DeltaXYWHBBoxCoder', target_means=[0.0] * 4, target_stds=[1.0, 1.0, 1.0, 1.0]
        ),
        loss_cls=dict(type='FocalLoss', use_sigmoid=True, loss_weight=1.0),
        loss_bbox=dict(type='L1Loss', loss_weight=1.0),
    )
    return dict(type='RetinaNet', bbox_head=head, train_cfg=train_cfg)


@pytest.mark.parametrize('allowed_border,min_pos_iou', [(-1, 0.0), (0, 0.3)])
def test_assignment_matches_anchor_head_get_targets(allowed_border, min_pos_iou):
    torch.manual_seed(0)
    model_cfg = retina_model_cfg(allowed_border, min_pos_iou)
    head = MODELS.build(dict(**model_cfg['bbox_head'], train_cfg=model_cfg['train_cfg']))
    parts = build_head_parts(model_cfg)
    assert parts.head_key == 'bbox_head' and parts.allowed_border == allowed_border

    # Two images of different sizes in one batch: per-image pad_shape, shared batch shape.
    packed = demo_mm_inputs(
        batch_size=3,
        image_shapes=[(3, 100, 130), (3, 128, 90), (3, 70, 70)],
        num_items=[6, 0, 4],
        num_classes=3,
    )
    batch = DetDataPreprocessor(pad_size_divisor=32)(packed, training=False)
    samples = batch['data_samples']
    shape = samples[0].metainfo['batch_input_shape']
    assert shape == (128, 160)

    assigned = [assign_like_head(parts, s) for s in samples]
    sizes = assigned[0].featmap_sizes
    metas = [s.metainfo for s in samples]
    anchors, valid = head.get_anchors(sizes, metas, device='cpu')
    labels, label_weights, *_ = head.get_targets(
        anchors, valid, [s.gt_instances for s in samples], metas, [None] * len(samples)
    )
    for i, a in enumerate(assigned):
        st = per_image_stats(
            a.anchors_per_level, a.inside_flags, a.assign_result.gt_inds, a.gt_bboxes
        )
        up_pos = [int((lab[i] < 3).sum()) for lab in labels]
        up_neg = [int(((lab[i] == 3) & (w[i] > 0)).sum()) for lab, w in zip(labels, label_weights)]
        assert st.pos_per_level.tolist() == up_pos
        assert st.neg_per_level.tolist() == up_neg
        assert st.num_anchors_per_level.tolist() == [x.shape[0] for x in anchors[i]]
        if i == 1:  # no gt: every seen anchor negative
            assert sum(up_pos) == 0 and st.pos_per_gt.numel() == 0
        else:
            assert sum(up_pos) > 0


def test_build_head_parts_two_stage_rpn():
    model_cfg = dict(
        type='FasterRCNN',
        rpn_head=dict(
            type='RPNHead',
            in_channels=8,
            feat_channels=8,
            anchor_generator=dict(
                type='AnchorGenerator', scales=[8], ratios=[0.5, 1.0, 2.0], strides=[4, 8, 16]
            ),
        ),
        train_cfg=dict(
            rpn=dict(
                assigner=dict(
                    type='MaxIoUAssigner', pos_iou_thr=0.7, neg_iou_thr=0.3, min_pos_iou=0.3
                ),
                allowed_border=0,
            ),
            rcnn=dict(assigner=dict(type='MaxIoUAssigner', pos_iou_thr=0.5, neg_iou_thr=0.5)),
        ),
    )
    parts = build_head_parts(model_cfg)
    assert parts.head_key == 'rpn_head' and parts.head_type == 'RPNHead'
    assert parts.allowed_border == 0
    assert parts.assigner.pos_iou_thr == 0.7
    assert parts.level_names == ['L0 (stride 4)', 'L1 (stride 8)', 'L2 (stride 16)']


def test_build_head_parts_errors_name_the_missing_piece():
    with pytest.raises(ValueError, match='neither bbox_head nor rpn_head'):
        build_head_parts(dict(type='X'))
    with pytest.raises(ValueError, match='no assigner'):
        build_head_parts(dict(bbox_head=dict(type='RetinaHead', anchor_generator=ANCHOR_GENERATOR)))
