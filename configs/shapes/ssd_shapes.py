# SSD on the shapes dataset with the mmdet_anchorloss parts. Identical to ssd_shapes_upstream.py
# except for the types of the head, its assigner and box coder (SSD's loss is the head's own
# cross-entropy with hard negative mining, so there is no loss type to swap).
_base_ = './ssd_shapes_upstream.py'

model = dict(
    bbox_head=dict(type='AnchorLossSSDHead', bbox_coder=dict(type='BatchDeltaXYWHBBoxCoder')),
    train_cfg=dict(assigner=dict(type='BatchMaxIoUAssigner')),
)
