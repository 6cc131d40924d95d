# RetinaNet R-50 FPN 1x COCO with the mmdet_anchorloss head, assigner, box coder and focal
# loss; everything else is mmdet's shipped config. Upstream reference (mmdet model zoo):
# box AP 36.5. Loads an ImageNet-pretrained backbone from torchvision:// when training; set
# model.backbone.init_cfg=None to build it offline.
_base_ = './retinanet_r50_fpn_1x_coco_upstream.py'

model = dict(
    bbox_head=dict(
        type='AnchorLossRetinaHead',
        bbox_coder=dict(type='BatchDeltaXYWHBBoxCoder'),
        loss_cls=dict(type='FusedFocalLoss'),
    ),
    train_cfg=dict(assigner=dict(type='BatchMaxIoUAssigner')),
)
