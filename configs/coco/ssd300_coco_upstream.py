# mmdet's SSD300 COCO, unchanged: the upstream twin of ssd300_coco.py.
# Reference (mmdet model zoo): box AP 25.5.
_base_ = 'mmdet::ssd/ssd300_coco.py'
custom_imports = dict(imports=['mmdet_anchorloss'], allow_failed_imports=False)
