# Faster R-CNN R-50 FPN 1x COCO with the mmdet_anchorloss RPN head (assigner, box coder and
# cross-entropy loss of the RPN); the RoI head and everything else is mmdet's shipped config.
# Upstream references (mmdet model zoo): RPN AR1000 58.2 (rpn_r50_fpn_1x_coco), box AP 37.4.
# Set model.backbone.init_cfg=None to build it offline.
_base_ = './faster-rcnn_r50_fpn_1x_coco_upstream.py'

model = dict(
    rpn_head=dict(
        type='AnchorLossRPNHead',
        bbox_coder=dict(type='BatchDeltaXYWHBBoxCoder'),
        loss_cls=dict(type='FusedCrossEntropyLoss'),
    ),
    train_cfg=dict(rpn=dict(assigner=dict(type='BatchMaxIoUAssigner'))),
)
