# SSD300 COCO with the mmdet_anchorloss SSD head, assigner and box coder (SSD's loss is the
# head's own hard-negative-mined cross-entropy); everything else is mmdet's shipped config.
# Upstream reference (mmdet model zoo): box AP 25.5. The VGG16 backbone loads
# open-mmlab://vgg16_caffe when training; set model.backbone.init_cfg=None to build offline.
_base_ = './ssd300_coco_upstream.py'

model = dict(
    bbox_head=dict(type='AnchorLossSSDHead', bbox_coder=dict(type='BatchDeltaXYWHBBoxCoder')),
    train_cfg=dict(assigner=dict(type='BatchMaxIoUAssigner')),
)
