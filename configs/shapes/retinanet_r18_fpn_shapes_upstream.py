# RetinaNet on the shapes dataset with mmdet's own parts (RetinaHead, MaxIoUAssigner,
# DeltaXYWHBBoxCoder, FocalLoss): the upstream twin of retinanet_r18_fpn_shapes.py, which
# inherits this file and changes only those types. mmdet's RetinaNet model with a ResNet-18
# at a quarter of the usual width, trained from scratch (nothing is downloaded), a lighter
# head and anchors halved for 8-96 px objects. 1500 iterations of batch 8 (12 epochs) reach
# bbox mAP@0.5 ~0.85 on shapes val, in about 4 minutes on 2 idle CPU cores.
_base_ = [
    'mmdet::_base_/models/retinanet_r50_fpn.py',
    './_base_/shapes_detection.py',
    './_base_/schedule_shapes.py',
]
custom_imports = dict(imports=['mmdet_anchorloss'], allow_failed_imports=False)

# BatchNorm in the neck and head too: from scratch, it trains several times faster.
norm_cfg = dict(type='BN', requires_grad=True)
model = dict(
    backbone=dict(
        depth=18,
        base_channels=16,
        frozen_stages=-1,
        norm_eval=False,
        init_cfg=None,
    ),
    neck=dict(in_channels=[16, 32, 64, 128], out_channels=64, norm_cfg=norm_cfg),
    bbox_head=dict(
        num_classes=3,
        in_channels=64,
        stacked_convs=2,
        feat_channels=64,
        norm_cfg=norm_cfg,
        anchor_generator=dict(octave_base_scale=2),
    ),
)
