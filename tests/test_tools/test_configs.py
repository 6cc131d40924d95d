"""Every config under configs/ loads and builds offline; plugin configs differ from their
upstream twins only in the swapped types; the COCO configs run a loss step on fake inputs
and give the same losses as their twins with the same weights."""

from pathlib import Path
from typing import Any, Dict, Iterator, Tuple

import pytest
import torch
from mmdet.registry import MODELS
from mmdet.testing import demo_mm_inputs
from mmdet.utils import register_all_modules
from mmengine.config import Config

import mmdet_anchorloss

ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = ROOT / 'configs'
ALL_CONFIGS = sorted(p for p in CONFIG_DIR.rglob('*.py') if '_base_' not in p.parts)
PLUGIN_CONFIGS = [p for p in ALL_CONFIGS if not p.stem.endswith('_upstream')]
PLUGIN_TYPES = set(mmdet_anchorloss.PLUGIN_TWINS.values())
# Upstream twin type of each plugin type.
UPSTREAM_OF = {plugin: upstream for upstream, plugin in mmdet_anchorloss.PLUGIN_TWINS.items()}


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def twin_of(path: Path) -> Path:
    return path.with_name(f'{path.stem}_upstream.py')


def load(path: Path) -> Config:
    cfg = Config.fromfile(str(path))
    cfg.model.backbone.init_cfg = None
    return cfg


def build_model(cfg: Config) -> torch.nn.Module:
    register_all_modules(init_default_scope=True)
    return MODELS.build(cfg.model)


def flatten(obj: Any, prefix: str = '') -> Iterator[Tuple[str, Any]]:
    """(dotted path, leaf value) of nested dicts and lists."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield from flatten(value, f'{prefix}{key}.')
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from flatten(value, f'{prefix}{i}.')
    else:
        yield prefix[:-1], obj


def test_found_the_configs():
    names = {rel(p) for p in ALL_CONFIGS}
    for required in (
        'configs/shapes/retinanet_r18_fpn_shapes.py',
        'configs/shapes/faster-rcnn_r18_fpn_shapes.py',
        'configs/shapes/ssd_shapes.py',
        'configs/coco/retinanet_r50_fpn_1x_coco.py',
        'configs/coco/faster-rcnn_r50_fpn_1x_coco.py',
        'configs/coco/ssd300_coco.py',
    ):
        assert required in names
        assert rel(twin_of(ROOT / required)) in names


@pytest.mark.parametrize('path', ALL_CONFIGS, ids=rel)
def test_config_loads_and_builds(path):
    cfg = load(path)
    assert cfg.custom_imports.imports == ['mmdet_anchorloss']
    assert cfg.custom_imports.allow_failed_imports is False
    model = build_model(cfg)
    head = getattr(model, 'rpn_head', None) or model.bbox_head
    head_type = cfg.model.get('rpn_head', cfg.model.get('bbox_head'))['type']
    assert type(head).__name__ == head_type
    assert sum(p.numel() for p in model.parameters()) > 0


@pytest.mark.parametrize('path', PLUGIN_CONFIGS, ids=rel)
def test_plugin_config_differs_from_twin_only_in_types(path):
    plugin = dict(flatten(Config.fromfile(str(path)).to_dict()))
    upstream = dict(flatten(Config.fromfile(str(twin_of(path))).to_dict()))
    assert plugin.keys() == upstream.keys()
    changed = {key: (plugin[key], upstream[key]) for key in plugin if plugin[key] != upstream[key]}
    assert changed, 'the plugin config uses no plugin type'
    for key, (mine, theirs) in changed.items():
        assert key.endswith('.type'), f'{key}: {mine!r} != {theirs!r}'
        assert mine in PLUGIN_TYPES and UPSTREAM_OF[mine] == theirs, key
    head_key = 'model.rpn_head.type' if 'model.rpn_head.type' in plugin else 'model.bbox_head.type'
    assert head_key in changed
    assert any('assigner' in key for key in changed)
    assert any('bbox_coder' in key for key in changed)


def shapes_of(path: Path) -> Tuple[int, int]:
    """A small fake-image size each COCO model accepts (SSD300's extra levels need 300)."""
    return (300, 300) if 'ssd' in path.stem else (160, 224)


def fake_batch(model: torch.nn.Module, size: Tuple[int, int], batch: int) -> Dict[str, Any]:
    packed = demo_mm_inputs(
        batch_size=batch,
        image_shapes=[(3, *size)] * batch,
        num_items=[3, 1, 5][:batch],
        num_classes=80,
    )
    return model.data_preprocessor(packed, True)


def loss_values(model: torch.nn.Module, data: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    """Each loss summed over its list (levels or images), in a fixed random state."""
    torch.manual_seed(0)
    losses = model(**data, mode='loss')
    return {k: sum(v) if isinstance(v, (list, tuple)) else v for k, v in losses.items()}


COCO_PLUGIN_CONFIGS = [p for p in PLUGIN_CONFIGS if p.parent.name == 'coco']


@pytest.mark.parametrize('path', COCO_PLUGIN_CONFIGS, ids=rel)
def test_coco_config_loss_step_matches_twin(path):
    torch.manual_seed(0)
    plugin = build_model(load(path)).train()
    plugin.init_weights()  # e.g. SSD's L2Norm weight is uninitialised memory until then
    upstream = build_model(load(twin_of(path))).train()
    upstream.load_state_dict(plugin.state_dict())
    batch = 1 if 'ssd' in path.stem else 3
    data = fake_batch(plugin, shapes_of(path), batch)

    losses = loss_values(plugin, data)
    total = sum(v for k, v in losses.items() if 'loss' in k)
    assert torch.isfinite(total) and total > 0
    total.backward()
    head = getattr(plugin, 'rpn_head', None) or plugin.bbox_head
    grads = [p.grad for p in head.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)

    with torch.no_grad():
        expected = loss_values(upstream, data)
    # Anchor-head losses must match upstream; for Faster R-CNN the RoI-head losses follow
    # from the same proposals only if the RPN matched, so compare all keys.
    assert losses.keys() == expected.keys()
    for key in expected:
        message = f'{key}: plugin {float(losses[key])} vs upstream {float(expected[key])}'
        torch.testing.assert_close(
            losses[key].detach(), expected[key], rtol=1e-4, atol=1e-6, msg=message
        )
