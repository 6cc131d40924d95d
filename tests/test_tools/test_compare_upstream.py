"""The library of tools/compare_upstream.py (mmdet_anchorloss.engine.compare*): twin lookup,
seeds and run order, schedule rescaling, summaries, spread and verdict, where two runs part,
the report files from hand-written profiles; and one short real training of both sides of the
shapes RetinaNet whose first iterations must agree."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mmengine.config import Config

from mmdet_anchorloss.engine import compare, compare_stats
from mmdet_anchorloss.engine.compare_report import write_report
from mmdet_anchorloss.engine.compare_worker import set_max_iters

ROOT = Path(__file__).resolve().parents[2]
RETINA = ROOT / 'configs' / 'shapes' / 'retinanet_r18_fpn_shapes.py'


def test_upstream_twin_by_suffix():
    config = str(RETINA)
    assert compare.upstream_twin(config) == config.replace('.py', '_upstream.py')
    with pytest.raises(FileNotFoundError, match='--upstream-config'):
        compare.upstream_twin(str(ROOT / 'configs' / 'shapes' / 'no_such_config.py'))
    assert compare.default_work_dir(config) == 'work_dirs/compare/retinanet_r18_fpn_shapes'
    assert compare.run_dir('w', 3, 'plugin') == 'w/seed_3/plugin'


def test_seeds_start_at_the_configs_own():
    assert compare.config_seeds(str(RETINA), [], 3) == [0, 1, 2]
    assert compare.config_seeds(str(RETINA), ['randomness.seed=7'], 2) == [7, 8]


def test_run_order_alternates():
    assert compare.run_order([0, 1, 2]) == [
        (0, 'plugin'),
        (0, 'upstream'),
        (1, 'upstream'),
        (1, 'plugin'),
        (2, 'plugin'),
        (2, 'upstream'),
    ]


def test_run_sampling_load():
    sleep = [sys.executable, '-c', 'import time; time.sleep(0.35)']
    samples = compare.run_sampling_load(sleep, env=None, interval=0.1)
    assert 2 <= len(samples) <= 4 and all(s >= 0 for s in samples)
    with pytest.raises(subprocess.CalledProcessError):
        compare.run_sampling_load([sys.executable, '-c', 'raise SystemExit(3)'], env=None)


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
def test_set_max_iters(max_iters, expected):
    cfg = schedule_cfg()
    set_max_iters(cfg, max_iters)
    assert cfg.train_cfg.max_iters == cfg.train_cfg.val_interval == max_iters
    assert cfg.default_hooks.checkpoint.interval == max_iters
    got = [(s.begin, s.end, s.get('T_max')) for s in cfg.param_scheduler]
    assert got == expected


def test_set_max_iters_refuses_epoch_loops():
    cfg = Config(dict(train_cfg=dict(type='EpochBasedTrainLoop', max_epochs=12)))
    with pytest.raises(ValueError, match='max_epochs'):
        set_max_iters(cfg, 10)


def fake_profile(head: str, scale: float, n: int = 20, map_shift: float = 0.0) -> dict:
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
        metrics={'coco/bbox_mAP': 0.5 * scale + map_shift, 'coco/bbox_mAP_50': 0.8 * scale},
        peak_mem_mb=100.0 * scale,
        mem_kind='CPU peak RSS (main process)',
        train_time_s=5.0,
    )


def test_summarise():
    summary = compare_stats.summarise(fake_profile('RetinaHead', 1.0))
    assert summary['iters'] == 20
    assert summary['first_iter_loss'] == 2.0
    assert summary['timing_skipped_iters'] == 5
    assert summary['sec_per_iter'] == pytest.approx(0.2)
    assert summary['sec_per_iter_with_data'] == pytest.approx(0.25)
    assert summary['loss_share'] == pytest.approx(0.25)
    # mean of the last 10 iterations: i = 10..19
    assert summary['final_losses']['loss'] == pytest.approx(2 - 14.5 / 20)
    assert summary['bbox_mAP_50'] == 0.8


def test_relative_difference():
    assert compare_stats.relative_difference(1.01, 1.0) == pytest.approx(0.01)
    assert compare_stats.relative_difference(0.0, 0.0) == 0.0
    assert compare_stats.relative_difference(None, 1.0) is None


def test_parting():
    upstream = [dict(loss=2.0)] * 6
    plugin = [dict(loss=v) for v in (2.0, 2.0 + 4e-6, 2.0, 2.0 + 1e-4, 2.0 + 3e-3, 2.0)]
    part = compare_stats.parting(plugin, upstream)
    assert part['compared_iters'] == 6
    at_1e5, at_1e3 = part['points']
    assert (at_1e5['tolerance'], at_1e5['first_iter']) == (1e-5, 4)  # 1-based
    assert at_1e5['max_rel_diff_before'] == pytest.approx(2e-6)
    assert (at_1e3['tolerance'], at_1e3['first_iter']) == (1e-3, 5)
    assert at_1e3['max_rel_diff_before'] == pytest.approx(5e-5)
    never = compare_stats.parting(upstream, upstream)['points'][1]
    assert never['first_iter'] is None and never['max_rel_diff_before'] == 0.0


def test_spread_and_verdict():
    within = compare_stats.spread([0.60, 0.62, 0.58], [0.63, 0.60, 0.61])
    assert within['plugin']['mean'] == pytest.approx(0.60)
    assert within['plugin']['std'] == pytest.approx(0.02)
    assert within['diff']['values'] == pytest.approx([-0.03, 0.02, -0.03])
    # pooled s = sqrt((0.02^2 + 0.015275^2) / 2); bound = 2 s sqrt(2/3)
    assert within['threshold'] == pytest.approx(2 * 0.0177951 * (2 / 3) ** 0.5, rel=1e-5)
    assert within['verdict'] == compare_stats.WITHIN
    beyond = compare_stats.spread([0.70, 0.72, 0.68], [0.60, 0.62, 0.58])
    assert beyond['diff']['mean'] == pytest.approx(0.10)
    assert beyond['verdict'] == compare_stats.BEYOND
    one = compare_stats.spread([0.6], [0.63])
    assert one['plugin']['std'] is None and one['threshold'] is None
    assert one['verdict'] == compare_stats.NO_VERDICT


def fake_runs(num_seeds: int, load: float, map_shift: float = 0.0) -> list:
    runs = []
    for i in range(num_seeds):
        plugin = fake_profile('AnchorLossRetinaHead', 1.0 + 0.01 * i, map_shift=map_shift)
        upstream = fake_profile('RetinaHead', 1.0 + 0.01 * i)
        upstream['losses'][3] = dict(
            upstream['losses'][3], loss=upstream['losses'][3]['loss'] * 1.01
        )
        sides = compare_stats.SIDES if i % 2 == 0 else compare_stats.SIDES[::-1]
        launch = {
            side: dict(order=2 * i + k, load_samples=[load, load + 0.5], cores=2)
            for k, side in enumerate(sides)
        }
        runs.append(dict(seed=i, plugin=plugin, upstream=upstream, launch=launch))
    return runs


def test_write_report_three_seeds(tmp_path):
    configs = dict(plugin='a.py', upstream='a_upstream.py')
    summary = write_report(configs, str(tmp_path), fake_runs(3, load=1.0))
    report = json.loads((tmp_path / 'report.json').read_text())
    assert report['seeds'] == [0, 1, 2]
    assert report['verdict'] == compare_stats.WITHIN  # same mAPs on both sides
    assert report['metrics']['bbox_mAP']['diff']['mean'] == pytest.approx(0.0)
    assert report['plugin']['head'] == 'AnchorLossRetinaHead'
    assert report['plugin']['bbox_mAP'] == pytest.approx(0.505)  # mean over seeds
    assert report['timing_reliable'] and report['cores'] == 2
    assert report['timing']['loss_sec_ratio']['mean'] == pytest.approx(1.0)
    part = report['per_seed'][1]['parting']['points']
    assert [p['first_iter'] for p in part] == [4, 4]  # the 1 % jump at iteration 4
    assert report['per_seed'][1]['order'] == ['upstream', 'plugin']
    markdown = (tmp_path / 'report.md').read_text()
    assert summary in markdown
    assert f'**Verdict: {compare_stats.WITHIN}**' in markdown
    assert '| bbox_mAP | 0.505 ± 0.005 | 0.505 ± 0.005 | +0.000 ± 0.000 |' in markdown
    assert 'it 4 (max before: 0.0e+00)' in markdown
    assert 'Timing reliable' in markdown and 'upstream then plugin' in markdown
    env = report['environment']  # the machine the runs ran on (issue 11)
    assert env['torch'] == torch.__version__ and env['device'] in ('cpu', 'cuda')
    assert f'torch {torch.__version__}' in markdown and 'device ' in markdown
    png = (tmp_path / 'loss_curves.png').read_bytes()
    assert png[:8] == b'\x89PNG\r\n\x1a\n'


def test_write_report_flags_a_difference_and_a_loaded_machine(tmp_path):
    configs = dict(plugin='a.py', upstream='a_upstream.py')
    write_report(configs, str(tmp_path), fake_runs(3, load=2.5, map_shift=-0.05))
    report = json.loads((tmp_path / 'report.json').read_text())
    assert report['metrics']['bbox_mAP']['verdict'] == compare_stats.BEYOND
    assert report['verdict'] == compare_stats.BEYOND
    assert not report['timing_reliable'] and report['max_load'] == 3.0
    assert '**Timing unreliable**' in (tmp_path / 'report.md').read_text()


def test_write_report_one_seed_gives_no_verdict(tmp_path):
    configs = dict(plugin='a.py', upstream='a_upstream.py')
    write_report(configs, str(tmp_path), fake_runs(1, load=0.5))
    report = json.loads((tmp_path / 'report.json').read_text())
    assert report['verdict'] == compare_stats.NO_VERDICT
    assert report['first_iter_loss_rel_diff'] == 0.0
    assert compare_stats.NO_VERDICT in (tmp_path / 'report.md').read_text()


# ------------------------------------------------------------------------------------------
# One short real training of both sides (64x64 images, 5 iterations, no evaluation).
# ------------------------------------------------------------------------------------------

PARITY_ITERS = 5


@pytest.fixture(scope='module')
def tiny_shapes(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp('shapes_tiny')
    cmd = [sys.executable, str(ROOT / 'tools' / 'make_shapes_dataset.py'), '--out', str(out)]
    cmd += ['--num-train', '8', '--num-val', '2', '--img-size', '64']
    subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True, timeout=120)
    return out


def test_first_iterations_agree_on_shapes(tiny_shapes, tmp_path, monkeypatch):
    """The runner sees upstream's numbers: same seed, weights and batches give the same total
    loss, to 1e-5 relative, for the first 5 iterations of the shapes RetinaNet."""
    monkeypatch.setenv('OMP_NUM_THREADS', '1')
    options = [
        f'train_dataloader.dataset.data_root={tiny_shapes}/',
        'train_dataloader.dataset.pipeline.2.scale=(64,64)',
        'train_dataloader.batch_size=4',
        'train_dataloader.num_workers=0',
        'train_dataloader.persistent_workers=False',
        *('val_cfg=None', 'val_dataloader=None', 'val_evaluator=None'),
        *('test_cfg=None', 'test_dataloader=None', 'test_evaluator=None'),
    ]
    configs = dict(plugin=str(RETINA), upstream=compare.upstream_twin(str(RETINA)))
    work_dir = str(tmp_path)
    compare.train_all(
        configs, work_dir, [0], max_iters=PARITY_ITERS, cfg_options=options, log=print
    )
    (run,) = compare.load_runs(work_dir)
    assert (
        run['plugin']['head'] == 'AnchorLossRetinaHead' and run['upstream']['head'] == 'RetinaHead'
    )
    assert len(run['plugin']['losses']) == len(run['upstream']['losses']) == PARITY_ITERS
    part = compare_stats.parting(run['plugin']['losses'], run['upstream']['losses'])
    first_1e5 = part['points'][0]
    assert first_1e5['first_iter'] is None, part
    assert first_1e5['max_rel_diff_before'] <= 1e-5
    for side in compare_stats.SIDES:
        assert run['launch'][side]['cores'] >= 1
    write_report(configs, work_dir, [run])  # real profiles make a report
    assert (tmp_path / 'report.md').is_file()
