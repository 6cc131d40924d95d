# mmdet's Faster R-CNN R-50 FPN 1x COCO, unchanged: the upstream twin of
# faster-rcnn_r50_fpn_1x_coco.py. Reference (mmdet model zoo): box AP 37.4; its RPN alone
# (rpn_r50_fpn_1x_coco) reaches AR1000 58.2.
_base_ = 'mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py'
custom_imports = dict(imports=['mmdet_anchorloss'], allow_failed_imports=False)
