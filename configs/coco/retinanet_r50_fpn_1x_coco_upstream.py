# mmdet's RetinaNet R-50 FPN 1x COCO, unchanged: the upstream twin of
# retinanet_r50_fpn_1x_coco.py (tools/compare_upstream.py finds it by the "_upstream" suffix).
# Reference (mmdet model zoo): box AP 36.5.
_base_ = 'mmdet::retinanet/retinanet_r50_fpn_1x_coco.py'
custom_imports = dict(imports=['mmdet_anchorloss'], allow_failed_imports=False)
