"""Importing the package registers every plugin name; mmcv's compiled ops load."""

import torch
from mmdet.registry import MODELS, TASK_UTILS

import mmdet_anchorloss


def test_import_registers_every_name():
    registries = {'MODELS': MODELS, 'TASK_UTILS': TASK_UTILS}
    names = [(r, n) for r, ns in mmdet_anchorloss.REGISTERED.items() for n in ns]
    assert len(names) == 8
    for registry, name in names:
        cls = registries[registry].get(name)
        assert cls is not None and cls.__module__.startswith('mmdet_anchorloss'), name


def test_mmcv_compiled_ops_run():
    from mmcv.ops import nms

    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 10.0, 10.0], [20, 20, 30, 30]])
    _, keep = nms(boxes, torch.tensor([0.9, 0.8, 0.7]), iou_threshold=0.5)
    assert keep.tolist() == [0, 2]
