"""tools/compare_upstream.py without training: twin lookup, schedule rescaling, summaries and
the report files, from hand-written profiles."""

import importlib.util
import json
from pathlib import Path

import pytest
from mmengine.config import Config

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope='module')
def compare():
    spec = importlib.util.spec_from_file_location(
        'compare_upstream_under_test', ROOT / 'tools' / 'compare_upstream.py'
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_upstream_twin_by_suffix(compare):
    config = str(ROOT / 'configs' / 'shapes' / 'retinanet_r18_fpn_shapes.py')
    assert compare.upstream_twin(config) == config.replace('.py', '_upstream.py')
    with pytest.raises(FileNotFoundError, match='--upstream-config'):
        compare.upstream_twin(str(ROOT / 'configs' / 'shapes' / 'no_such_config.py'))
    assert compare.default_work_dir(config) == 'work_dirs/compare/retinanet_r18_fpn_shapes'


def schedule_cfg() -> Config:
    return Config(
        dict(
            train_cfg=dict(type='IterBasedTrainLoop', max_iters=1500, val_interval=1500),
            default_hooks=dict(checkpoint=dict(type='CheckpointHook', interval=1500)),
            param_scheduler=[
                dict(type='LinearLR', by_epoch=False, begin=0, end=100),
                dict(type='CosineAnnealingLR', by_epoch=False, begin=100, end=1500, T_max=1400),
            ],
        )
    )


@pytest.mark.parametrize(
    'max_iters, expected',
    [
        (3000, [(0, 100, None), (100, 3000, 2900)]),  # longer: cosine stretched
        (400, [(0, 100, None), (100, 400, 300)]),  # shorter: cosine shortened
        (60, [(0, 60, None)]),  # shorter than the warmup: cosine dropped
    ],
)
def test_set_max_iters(compare, max_iters, expected):
    cfg = schedule_cfg()
    compare.set_max_iters(cfg, max_iters)
    assert cfg.train_cfg.max_iters == cfg.train_cfg.val_interval == max_iters
    assert cfg.default_hooks.checkpoint.interval == max_iters
    got = [(s.begin, s.end, s.get('T_max')) for s in cfg.param_scheduler]
    assert got == expected


def test_set_max_iters_refuses_epoch_loops(compare):
    cfg = Config(dict(train_cfg=dict(type='EpochBasedTrainLoop', max_epochs=12)))
    with pytest.raises(ValueError, match='max_epochs'):
        compare.set_max_iters(cfg, 10)


def fake_profile(head: str, scale: float, n: int = 20) -> dict:
    losses = [
        dict(loss=scale * (2 - i / n), loss_cls=scale * (1.2 - i / n / 2), loss_bbox=0.8 - i / n)
        for i in range(n)
    ]
    return dict(
        head=head,
        losses=losses,
        iter_time=[1.0] * 5 + [0.2] * (n - 5),  # slow first iterations are left out
        wall_time=[1.0] * 5 + [0.25] * (n - 5),
        loss_time=[0.5] * 5 + [0.05] * (n - 5),
        metrics={'coco/bbox_mAP': 0.5 * scale, 'coco/bbox_mAP_50': 0.8 * scale},
        peak_mem_mb=100.0 * scale,
        mem_kind='CPU peak RSS (main process)',
        train_time_s=5.0,
    )


def test_summarise(compare):
    summary = compare.summarise(fake_profile('RetinaHead', 1.0))
    assert summary['iters'] == 20
    assert summary['first_iter_loss'] == 2.0
    assert summary['timing_skipped_iters'] == 5
    assert summary['sec_per_iter'] == pytest.approx(0.2)
    assert summary['sec_per_iter_with_data'] == pytest.approx(0.25)
    assert summary['loss_share'] == pytest.approx(0.25)
    # mean of the last 10 iterations: i = 10..19
    assert summary['final_losses']['loss'] == pytest.approx(2 - 14.5 / 20)
    assert summary['bbox_mAP_50'] == 0.8


def test_relative_difference(compare):
    assert compare.relative_difference(1.01, 1.0) == pytest.approx(0.01)
    assert compare.relative_difference(0.0, 0.0) == 0.0
    assert compare.relative_difference(None, 1.0) is None


def test_write_report(compare, tmp_path):
    profiles = dict(plugin=fake_profile('AnchorLossRetinaHead', 1.0), upstream=None)
    profiles['upstream'] = fake_profile('RetinaHead', 1.001)
    for side, profile in profiles.items():
        (tmp_path / side).mkdir()
        (tmp_path / side / compare.RESULT_FILE).write_text(json.dumps(profile))
    configs = dict(plugin='a.py', upstream='a_upstream.py')
    table = compare.write_report(None, configs, str(tmp_path))

    report = json.loads((tmp_path / 'report.json').read_text())
    assert report['plugin']['head'] == 'AnchorLossRetinaHead'
    assert report['upstream']['head'] == 'RetinaHead'
    assert report['first_iter_loss_rel_diff'] == pytest.approx(0.002 / 2.002, rel=1e-6)
    for key in ('first_iter_loss', 'bbox_mAP', 'bbox_mAP_50', 'sec_per_iter', 'peak_mem_mb'):
        assert key in report['plugin'] and key in report['upstream']
    markdown = (tmp_path / 'report.md').read_text()
    assert table in markdown
    assert '| bbox_mAP_50 | 0.800 | 0.801 | -0.0008 |' in markdown
    assert '| share of the iteration in loss_by_feat | 25.0 % | 25.0 % |  |' in markdown
    png = (tmp_path / 'loss_curves.png').read_bytes()
    assert png[:8] == b'\x89PNG\r\n\x1a\n'
