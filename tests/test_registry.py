"""Importing the package registers every plugin name, from the one list in registry.py;
mmcv's compiled ops load."""

import re
from pathlib import Path

import torch
from mmdet.registry import DATASETS, MODELS, TASK_UTILS
from mmdet.utils import register_all_modules

import mmdet_anchorloss

REGISTRIES = {'MODELS': MODELS, 'TASK_UTILS': TASK_UTILS, 'DATASETS': DATASETS}
README = Path(__file__).resolve().parents[1] / 'README.md'


def _upstream_of(name: str) -> str:
    """The upstream type a registered name stands in for (as a twin or an alternative)."""
    twins = [u for u, p in mmdet_anchorloss.PLUGIN_TWINS.items() if p == name]
    others = [u for u, ps in mmdet_anchorloss.ALTERNATIVES.items() if name in ps]
    assert len(twins + others) == 1, (name, twins, others)
    return (twins + others)[0]


def test_import_registers_every_name():
    register_all_modules()
    names = [(r, n) for r, ns in mmdet_anchorloss.REGISTERED.items() for n in ns]
    alternatives = {n for ns in mmdet_anchorloss.ALTERNATIVES.values() for n in ns}
    assert not alternatives & set(mmdet_anchorloss.PLUGIN_TWINS.values())
    assert {n for _, n in names} == set(mmdet_anchorloss.PLUGIN_TWINS.values()) | alternatives
    for registry, name in names:
        cls = REGISTRIES[registry].get(name)
        assert cls is not None and cls.__module__.startswith('mmdet_anchorloss'), name
        assert getattr(mmdet_anchorloss, name) is cls and name in mmdet_anchorloss.__all__


def test_every_twin_subclasses_its_upstream_type():
    register_all_modules()
    for registry, names in mmdet_anchorloss.REGISTERED.items():
        for name in names:
            upstream = _upstream_of(name)
            up_cls = REGISTRIES[registry].get(upstream)
            assert up_cls is not None, upstream
            assert issubclass(REGISTRIES[registry].get(name), up_cls), (name, upstream)


def test_readme_tables_list_exactly_the_registered_names():
    """The twins' table and the alternatives' table together, each name under its upstream."""
    rows = re.findall(r'^\| (\w+) \| `(\w+)` \| `(\w+)` \|', README.read_text(), re.M)
    table = {(reg, plugin, upstream) for reg, plugin, upstream in rows}
    registered = {
        (reg, plugin, _upstream_of(plugin))
        for reg, plugins in mmdet_anchorloss.REGISTERED.items()
        for plugin in plugins
    }
    assert table == registered


def test_mmcv_compiled_ops_run():
    from mmcv.ops import nms

    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 10.0, 10.0], [20, 20, 30, 30]])
    _, keep = nms(boxes, torch.tensor([0.9, 0.8, 0.7]), iou_threshold=0.5)
    assert keep.tolist() == [0, 2]
