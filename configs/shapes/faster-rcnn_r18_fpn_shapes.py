# Faster R-CNN on the shapes dataset with the mmdet_anchorloss RPN head. Identical to
# faster-rcnn_r18_fpn_shapes_upstream.py except for the types of the RPN head, its assigner,
# box coder and classification loss (the RoI head is not an anchor head and stays mmdet's).
_base_ = './faster-rcnn_r18_fpn_shapes_upstream.py'

model = dict(
    rpn_head=dict(
        type='AnchorLossRPNHead',
        bbox_coder=dict(type='BatchDeltaXYWHBBoxCoder'),
        loss_cls=dict(type='FusedCrossEntropyLoss'),
    ),
    train_cfg=dict(rpn=dict(assigner=dict(type='BatchMaxIoUAssigner'))),
)
