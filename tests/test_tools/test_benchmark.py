"""tools/benchmark_loss.py: the case geometry, the loss check, and a quick end-to-end run.

The end-to-end run benchmarks one tiny case (``--quick``, eager kernels, one repeat) in the
tool's own subprocesses and checks the JSON it writes: both sides present and really
different heads, every phase timed, peak memory measured, and the two sides' losses in
agreement (this fails if the plugin drifts from upstream).
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / 'tools' / 'benchmark_loss.py'


@pytest.fixture(scope='module')
def bench():
    """The tool as a module (``tools/`` is not a package)."""
    spec = importlib.util.spec_from_file_location('_benchmark_loss_tool', TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_full_size_featmaps(bench):
    """800x1333 input padded to 800x1344: RetinaNet's P3-P7, the RPN's P2-P6, SSD300's six."""
    retina = bench.head_config(bench.CASES['retina-b8-g10'])
    strides = [(s, s) for s in retina['anchor_generator']['strides']]
    _, img_shape, pad_shape = bench.case_geometry(bench.CASES['retina-b8-g10'], quick=False)
    assert (img_shape, pad_shape) == ((800, 1333), (800, 1344))
    assert bench.featmap_sizes(strides, pad_shape) == [
        (100, 168),
        (50, 84),
        (25, 42),
        (13, 21),
        (7, 11),
    ]
    rpn = bench.head_config(bench.CASES['rpn-b8-g10'])
    strides = [(s, s) for s in rpn['anchor_generator']['strides']]
    assert bench.featmap_sizes(strides, pad_shape)[0] == (200, 336)
    batch, _, pad_shape = bench.case_geometry(bench.CASES['ssd-b32-g10'], quick=False)
    strides = [(s, s) for s in (8, 16, 32, 64, 100, 300)]
    assert batch == 32
    assert bench.featmap_sizes(strides, pad_shape) == [
        (38, 38),
        (19, 19),
        (10, 10),
        (5, 5),
        (3, 3),
        (1, 1),
    ]


def test_configs_are_mmdets_and_twins(bench):
    """The full-size heads come from mmdet's configs; the plugin twin swaps every part."""
    cfg = bench.head_config(bench.CASES['retina-b2-g10'])
    assert (cfg['type'], cfg['num_classes'], cfg['in_channels']) == ('RetinaHead', 80, 256)
    assert cfg['train_cfg']['assigner']['type'] == 'MaxIoUAssigner'
    twin = bench.plugin_config(cfg)
    assert twin['type'] == 'AnchorLossRetinaHead'
    assert twin['loss_cls']['type'] == 'FusedFocalLoss'
    assert twin['train_cfg']['assigner']['type'] == 'BatchMaxIoUAssigner'
    assert twin['bbox_coder']['type'] == 'BatchDeltaXYWHBBoxCoder'
    assert cfg['type'] == 'RetinaHead'  # the upstream config is left as it was
    rpn = bench.head_config(bench.CASES['rpn-b8-g10'])
    assert rpn['train_cfg']['sampler']['type'] == 'RandomSampler'
    assert bench.plugin_config(rpn)['loss_cls']['type'] == 'FusedCrossEntropyLoss'


def test_compare_losses(bench):
    ref = dict(loss_cls=[1.0, 2.0], loss_bbox=[0.5, 0.0])
    same = bench.compare_losses(ref, dict(loss_cls=[1.0, 2.0], loss_bbox=[0.5, 0.0]))
    assert same.agree and same.max_rel_diff == 0.0
    close = bench.compare_losses(ref, dict(loss_cls=[1.0, 2.0 * (1 + 5e-5)], loss_bbox=[0.5, 0]))
    assert close.agree and close.max_rel_diff == pytest.approx(5e-5)
    off = bench.compare_losses(ref, dict(loss_cls=[1.0, 2.0], loss_bbox=[0.5005, 0.0]))
    assert not off.agree
    assert off.worst == 'loss_bbox[0]'
    assert off.max_rel_diff == pytest.approx(1e-3)
    assert not bench.compare_losses(ref, dict(loss_cls=[1.0, 2.0])).agree
    grads = bench.compare_losses(ref, ref, [2.0, 4.0], [2.0, 4.4])
    assert grads.grad_norm_max_rel_diff == pytest.approx(0.1)


def test_snapshot_package(bench, tmp_path):
    """Workers import a copy of the package taken at the start, first on PYTHONPATH."""
    env = bench.snapshot_package(tmp_path)
    assert (tmp_path / 'mmdet_anchorloss' / '__init__.py').is_file()
    assert env['PYTHONPATH'].split(os.pathsep)[0] == str(tmp_path)


def test_quick_run_writes_both_sides(tmp_path):
    out = tmp_path / 'bench.json'
    cmd = [sys.executable, str(TOOL), '--quick', '--cases', 'retina-b2-g10', '--repeats', '1']
    env = dict(os.environ, MMDET_ANCHORLOSS_COMPILE='0', OMP_NUM_THREADS='1')
    result = subprocess.run(
        [*cmd, '--out', str(out)], cwd=ROOT, capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert 'retina-b2-g10' in result.stdout and 'speed-up' in result.stdout
    report = json.loads(out.read_text())
    assert {'cpu_model', 'cpu_cores', 'torch', 'device_name'} <= set(report['machine'])
    (case,) = report['cases']
    assert case['case'] == 'retina-b2-g10' and case['batch_size'] == 2
    assert case['upstream']['head'] == 'RetinaHead'
    assert case['plugin']['head'] == 'AnchorLossRetinaHead'
    assert case['plugin']['loss_cls'] == 'FusedFocalLoss'
    assert 'anchorloss_bench_' in case['plugin']['source']['package']  # the snapshot
    for side in ('upstream', 'plugin'):
        record = case[side]
        assert set(record['median']) == {'assign', 'fwd', 'bwd', 'fwd_bwd'}
        assert all(t > 0 for t in record['median'].values())
        assert record['memory']['peak_mb'] is not None
        assert set(record['losses']) == {'loss_cls', 'loss_bbox'}
        assert len(record['losses']['loss_cls']) == 5  # one per level
    assert set(case['speedup']) == {'assign', 'fwd', 'bwd', 'fwd_bwd'}
    assert case['floor_s'] > 0 and case['passes']['plugin'] > 0
    assert case['loss_check']['agree']
    assert case['loss_check']['max_rel_diff'] < 1e-4
    assert case['loss_check']['grad_norm_max_rel_diff'] < 1e-4
    assert out.with_suffix('.md').is_file()
