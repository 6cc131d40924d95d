# Faster R-CNN on the shapes dataset with mmdet's own RPN parts (RPNHead, MaxIoUAssigner,
# DeltaXYWHBBoxCoder, CrossEntropyLoss): the upstream twin of faster-rcnn_r18_fpn_shapes.py,
# which inherits this file and changes only the RPN head's types. mmdet's Faster R-CNN with a
# ResNet-18 at a quarter of the usual width, from scratch, a lighter RoI head and fewer
# proposals for 256x256 images with at most 6 objects.
_base_ = [
    'mmdet::_base_/models/faster-rcnn_r50_fpn.py',
    './_base_/shapes_detection.py',
    './_base_/schedule_shapes.py',
]
custom_imports = dict(imports=['mmdet_anchorloss'], allow_failed_imports=False)

# BatchNorm in the neck too: from scratch, it trains several times faster.
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
    rpn_head=dict(
        in_channels=64,
        feat_channels=64,
        anchor_generator=dict(scales=[4]),
    ),
    roi_head=dict(
        bbox_roi_extractor=dict(out_channels=64),
        bbox_head=dict(in_channels=64, fc_out_channels=256, num_classes=3),
    ),
    train_cfg=dict(
        rpn_proposal=dict(nms_pre=1000, max_per_img=300),
        rcnn=dict(sampler=dict(num=128)),
    ),
    test_cfg=dict(rpn=dict(nms_pre=1000, max_per_img=300)),
)
