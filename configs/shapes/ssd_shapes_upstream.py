# SSD on the shapes dataset with mmdet's own parts (SSDHead, MaxIoUAssigner,
# DeltaXYWHBBoxCoder): the upstream twin of ssd_shapes.py, which inherits this file and
# changes only those types. mmdet's SSD300 recipe (SSDNeck extra levels, SSDAnchorGenerator,
# hard negative mining) at 256x256 on a ResNet-18 at a quarter of the usual width, from
# scratch, with anchor sizes set for 8-96 px objects.
_base_ = [
    'mmdet::_base_/models/ssd300.py',
    './_base_/shapes_detection.py',
    './_base_/schedule_shapes.py',
]
custom_imports = dict(imports=['mmdet_anchorloss'], allow_failed_imports=False)

# BatchNorm in the neck too: from scratch, it trains several times faster.
norm_cfg = dict(type='BN', requires_grad=True)
model = dict(
    data_preprocessor=dict(
        mean=[123.675, 116.28, 103.53],
        std=[58.395, 57.12, 57.375],
        pad_size_divisor=32,
    ),
    backbone=dict(
        _delete_=True,
        type='ResNet',
        depth=18,
        base_channels=16,
        num_stages=4,
        out_indices=(1, 2, 3),
        frozen_stages=-1,
        norm_cfg=norm_cfg,
        norm_eval=False,
        style='pytorch',
        init_cfg=None,
    ),
    neck=dict(
        in_channels=(32, 64, 128),
        out_channels=(32, 64, 128, 64, 64, 64),
        level_strides=(2, 2, 2),
        level_paddings=(1, 1, 1),
        l2_norm_scale=None,
        norm_cfg=norm_cfg,
    ),
    bbox_head=dict(
        num_classes=3,
        in_channels=(32, 64, 128, 64, 64, 64),
        anchor_generator=dict(
            _delete_=True,
            type='SSDAnchorGenerator',
            scale_major=False,
            strides=[8, 16, 32, 64, 128, 256],
            ratios=[[2], [2, 3], [2, 3], [2, 3], [2], [2]],
            min_sizes=[12, 32, 64, 112, 160, 208],
            max_sizes=[32, 64, 112, 160, 208, 256],
        ),
    ),
)
