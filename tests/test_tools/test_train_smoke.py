"""tools/train.py, tools/test.py and tools/compare_upstream.py end to end on a tiny dataset.

Each shapes config (plugin and upstream twin) trains a few iterations through
``tools/train.py`` in a subprocess, as a user would run it, on 64x64 images; the loss must go
down and a checkpoint must be written; ``tools/test.py`` then evaluates that checkpoint and
must report COCO bbox metrics. ``compare_upstream.py`` runs once, briefly, and its report
must show both sides starting from the same loss.
"""

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import List, Sequence

import pytest

ROOT = Path(__file__).resolve().parents[2]
SHAPES_CONFIGS = sorted(
    p for p in (ROOT / 'configs' / 'shapes').glob('*.py') if p.name != '__init__.py'
)
IMG_SIZE = 64
ITERS = 8


def run(cmd: Sequence[str], timeout: float = 300) -> subprocess.CompletedProcess:
    """Run a tool from the repository root; fail the test with the output tail on error."""
    env = dict(os.environ, OMP_NUM_THREADS='1', MMDET_ANCHORLOSS_COMPILE='0')
    result = subprocess.run(
        [sys.executable, *cmd], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env
    )
    if result.returncode != 0:
        pytest.fail(
            f'{" ".join(cmd)} failed (exit {result.returncode})\n'
            f'--- stdout ---\n{result.stdout[-3000:]}\n--- stderr ---\n{result.stderr[-6000:]}'
        )
    return result


@pytest.fixture(scope='module')
def shapes_root(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp('shapes_smoke')
    run(
        [
            'tools/make_shapes_dataset.py',
            *('--out', str(out), '--num-train', '8', '--num-val', '4'),
            *('--img-size', str(IMG_SIZE)),
        ]
    )
    return out


def data_options(root: Path) -> List[str]:
    """``--cfg-options`` pointing train and test at the tiny dataset, at its own size."""
    scale = f'({IMG_SIZE},{IMG_SIZE})'
    return [
        f'train_dataloader.dataset.data_root={root}/',
        f'test_dataloader.dataset.data_root={root}/',
        f'test_evaluator.ann_file={root}/annotations/val.json',
        # Resize is pipeline[2] (train) and pipeline[1] (test) in _base_/shapes_detection.py.
        f'train_dataloader.dataset.pipeline.2.scale={scale}',
        f'test_dataloader.dataset.pipeline.1.scale={scale}',
        'train_dataloader.batch_size=4',
        'train_dataloader.num_workers=0',
        'train_dataloader.persistent_workers=False',
        'test_dataloader.num_workers=0',
        'test_dataloader.persistent_workers=False',
    ]


def train_options(root: Path) -> List[str]:
    """A short run: no validation loop, a log record every iteration, no LR warmup."""
    return data_options(root) + [
        f'train_cfg.max_iters={ITERS}',
        'val_cfg=None',
        'val_dataloader=None',
        'val_evaluator=None',
        'default_hooks.logger.interval=1',
        'log_processor.window_size=1',
        f'default_hooks.checkpoint.interval={ITERS}',
        'param_scheduler.0.start_factor=1.0',
    ]


def loss_records(work_dir: Path) -> List[dict]:
    """The records with a loss in the newest run's ``vis_data/scalars.json``, by iteration."""
    files = sorted(work_dir.glob('*/vis_data/scalars.json'))
    assert files, f'no scalars.json under {work_dir}'
    records = [json.loads(line) for line in files[-1].read_text().splitlines() if line.strip()]
    return sorted((r for r in records if 'loss' in r), key=lambda r: r['iter'])


def read_losses(work_dir: Path) -> List[float]:
    """Per-iteration total loss of the newest run."""
    return [rec['loss'] for rec in loss_records(work_dir)]


@pytest.mark.parametrize('config', SHAPES_CONFIGS, ids=lambda p: p.stem)
def test_train_then_test(config, shapes_root, tmp_path):
    work_dir = tmp_path / 'work'
    run(
        [
            'tools/train.py',
            str(config),
            '--work-dir',
            str(work_dir),
            '--cfg-options',
            *train_options(shapes_root),
        ]
    )
    losses = read_losses(work_dir)
    assert len(losses) == ITERS
    assert all(loss > 0 for loss in losses)
    assert min(losses[-2:]) < losses[0], f'loss did not go down: {losses}'
    checkpoint = work_dir / f'iter_{ITERS}.pth'
    assert checkpoint.is_file()
    assert (work_dir / 'last_checkpoint').read_text().strip().endswith(checkpoint.name)

    # After 8 iterations no score passes the usual 0.05: keep every box so COCO has work.
    score_thr = (
        'model.test_cfg.rcnn.score_thr=0'
        if 'rcnn' in config.stem
        else ('model.test_cfg.score_thr=0')
    )
    result = run(
        [
            'tools/test.py',
            str(config),
            str(checkpoint),
            '--work-dir',
            str(tmp_path / 'test'),
            '--cfg-options',
            *data_options(shapes_root),
            score_thr,
        ]
    )
    assert 'coco/bbox_mAP_50:' in result.stdout + result.stderr
    metrics = sorted((tmp_path / 'test').glob('*/*.json'))
    assert metrics, 'tools/test.py wrote no metrics json'
    values = json.loads(metrics[-1].read_text())
    # COCO reports -1 when it could not evaluate; AP over IoU 0.5:0.95 and AP at 0.75
    # cannot exceed AP at 0.5 (a stricter match). After 8 iterations every AP may be 0.
    ap, ap50, ap75 = (values[f'coco/bbox_mAP{k}'] for k in ('', '_50', '_75'))
    assert 0.0 <= ap75 <= ap50 <= 1.0 and 0.0 <= ap <= ap50, values


def test_amp_on_cpu_is_a_clear_error():
    if __import__('torch').cuda.is_available():
        pytest.skip('CUDA present: --amp is valid here')
    config = ROOT / 'configs' / 'shapes' / 'retinanet_r18_fpn_shapes.py'
    result = subprocess.run(
        [sys.executable, 'tools/train.py', str(config), '--amp'],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert '--amp' in result.stderr and 'CUDA' in result.stderr
    assert 'Traceback' not in result.stderr


def first_losses(work_dir: Path) -> dict:
    """The loss terms logged at the first iteration of the newest run."""
    first = loss_records(work_dir)[0]
    return {k: v for k, v in first.items() if k.startswith('loss')}


@pytest.mark.gpu
@pytest.mark.parametrize('stem', ['retinanet_r18_fpn_shapes', 'ssd_shapes'])
def test_amp_training_starts_from_upstreams_losses(stem, shapes_root, tmp_path):
    """``tools/train.py --amp`` (``AmpOptimWrapper``: the network in float16 under
    autocast) on the plugin config and on its upstream twin: same seed, weights and first
    batch, so the first iteration's losses must agree within float16's tolerance."""
    losses = {}
    for side, name in (('plugin', stem), ('upstream', f'{stem}_upstream')):
        work_dir = tmp_path / side
        run(
            [
                'tools/train.py',
                str(ROOT / 'configs' / 'shapes' / f'{name}.py'),
                '--amp',
                '--work-dir',
                str(work_dir),
                '--cfg-options',
                *train_options(shapes_root),
                'train_cfg.max_iters=2',
            ]
        )
        text = next(work_dir.glob('*/*.log')).read_text()
        assert 'AmpOptimWrapper' in text, f'{side}: --amp did not switch the optimizer wrapper'
        losses[side] = first_losses(work_dir)
    assert set(losses['plugin']) == set(losses['upstream']) and 'loss' in losses['plugin']
    for key, value in losses['upstream'].items():
        assert losses['plugin'][key] == pytest.approx(value, rel=1e-2, abs=1e-3), key


def test_compare_upstream_report(shapes_root, tmp_path):
    config = ROOT / 'configs' / 'shapes' / 'retinanet_r18_fpn_shapes.py'
    work_dir = tmp_path / 'compare'
    options = data_options(shapes_root) + [
        f'val_dataloader.dataset.data_root={shapes_root}/',
        f'val_evaluator.ann_file={shapes_root}/annotations/val.json',
        f'val_dataloader.dataset.pipeline.1.scale=({IMG_SIZE},{IMG_SIZE})',
        'val_dataloader.num_workers=0',
        'val_dataloader.persistent_workers=False',
        'model.test_cfg.score_thr=0',
    ]
    result = run(
        [
            'tools/compare_upstream.py',
            str(config),
            '--work-dir',
            str(work_dir),
            '--max-iters',
            '3',
            '--cfg-options',
            *options,
        ],
        timeout=400,
    )
    assert 'report.md' in result.stdout
    report = json.loads((work_dir / 'report.json').read_text())
    for side, head in (('plugin', 'AnchorLossRetinaHead'), ('upstream', 'RetinaHead')):
        numbers = report[side]
        assert numbers['head'] == head
        assert numbers['iters'] == 3
        for key in ('first_iter_loss', 'sec_per_iter', 'loss_share', 'peak_mem_mb'):
            assert numbers[key] > 0, (side, key)
        assert 0 < numbers['loss_share'] < 1
        assert 0 <= numbers['bbox_mAP_50'] <= 1
        assert set(numbers['first_iter_losses']) >= {'loss', 'loss_cls', 'loss_bbox'}
    # Same seed, same weights, same first batch: the first losses agree.
    assert report['first_iter_loss_rel_diff'] < 1e-4
    assert report['plugin']['first_iter_loss'] == pytest.approx(
        report['upstream']['first_iter_loss'], rel=1e-4
    )
    markdown = (work_dir / 'report.md').read_text()
    assert 'first-iteration loss' in markdown and 'bbox_mAP_50' in markdown
    png = (work_dir / 'loss_curves.png').read_bytes()
    assert png[:8] == b'\x89PNG\r\n\x1a\n' and len(png) > 5000
