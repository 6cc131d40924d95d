# RetinaNet on the shapes dataset with the mmdet_anchorloss parts: the demo config of
# `make demo`. Identical to retinanet_r18_fpn_shapes_upstream.py except for the types of the
# anchor head, its assigner, box coder and classification loss, so the two train the same
# network from the same seed on the same data order.
_base_ = './retinanet_r18_fpn_shapes_upstream.py'

model = dict(
    bbox_head=dict(
        type='AnchorLossRetinaHead',
        bbox_coder=dict(type='BatchDeltaXYWHBBoxCoder'),
        loss_cls=dict(type='FusedFocalLoss'),
    ),
    train_cfg=dict(assigner=dict(type='BatchMaxIoUAssigner')),
)
