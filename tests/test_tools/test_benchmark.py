"""The loss benchmark: its cases, its loss check and tables, and a quick end-to-end run.

The end-to-end run benchmarks one tiny case (``--quick``, eager kernels, one repeat) through
``tools/benchmark_loss.py`` and its worker processes, and checks the JSON it writes: both
sides present and really different heads, every phase timed, peak memory measured, ops /
launches / host syncs counted (fewer for the plugin), and the two sides' losses in agreement
(this fails if the plugin drifts from upstream).
"""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from mmdet_anchorloss.benchmark import cases, measure, report, worker

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / 'tools' / 'benchmark_loss.py'
QUICK_ENV = dict(MMDET_ANCHORLOSS_COMPILE='0', OMP_NUM_THREADS='1')


def test_full_size_featmaps():
    """800x1333 input padded to 800x1344: RetinaNet's P3-P7, the RPN's P2-P6, SSD300's six."""
    retina = cases.head_config(cases.CASES['retina-b8-g10'])
    strides = [(s, s) for s in retina['anchor_generator']['strides']]
    _, img_shape, pad_shape = cases.case_geometry(cases.CASES['retina-b8-g10'], quick=False)
    assert (img_shape, pad_shape) == ((800, 1333), (800, 1344))
    assert cases.featmap_sizes(strides, pad_shape) == [
        (100, 168),
        (50, 84),
        (25, 42),
        (13, 21),
        (7, 11),
    ]
    rpn = cases.head_config(cases.CASES['rpn-b8-g10'])
    strides = [(s, s) for s in rpn['anchor_generator']['strides']]
    assert cases.featmap_sizes(strides, pad_shape)[0] == (200, 336)
    batch, _, pad_shape = cases.case_geometry(cases.CASES['ssd-b32-g10'], quick=False)
    strides = [(s, s) for s in (8, 16, 32, 64, 100, 300)]
    assert batch == 32
    assert cases.featmap_sizes(strides, pad_shape) == [
        (38, 38),
        (19, 19),
        (10, 10),
        (5, 5),
        (3, 3),
        (1, 1),
    ]


def test_configs_are_mmdets_and_twins():
    """The full-size heads come from mmdet's configs; the plugin twin swaps every part."""
    cfg = cases.head_config(cases.CASES['retina-b2-g10'])
    assert (cfg['type'], cfg['num_classes'], cfg['in_channels']) == ('RetinaHead', 80, 256)
    assert cfg['train_cfg']['assigner']['type'] == 'MaxIoUAssigner'
    twin = cases.plugin_config(cfg)
    assert twin['type'] == 'AnchorLossRetinaHead'
    assert twin['loss_cls']['type'] == 'FusedFocalLoss'
    assert twin['train_cfg']['assigner']['type'] == 'BatchMaxIoUAssigner'
    assert twin['bbox_coder']['type'] == 'BatchDeltaXYWHBBoxCoder'
    assert cfg['type'] == 'RetinaHead'  # the upstream config is left as it was
    rpn = cases.head_config(cases.CASES['rpn-b8-g10'])
    assert rpn['train_cfg']['sampler']['type'] == 'RandomSampler'
    assert cases.plugin_config(rpn)['loss_cls']['type'] == 'FusedCrossEntropyLoss'


def test_cases_and_defaults():
    """G=1000 and half-precision cases exist; CPU runs skip them unless asked for."""
    dense = cases.CASES['retina-b8-g1000']
    assert (dense.batch_size, dense.num_gts, dense.amp) == (8, 1000, False)
    half = [c for c in cases.CASES.values() if c.amp]
    assert {c.name for c in half} >= {'retina-b8-g10-fp16', 'rpn-b8-g10-fp16', 'ssd-b32-g10-fp16'}
    assert all(c.dtype == 'float16' and c.name.endswith('-fp16') for c in half)
    assert cases.default_cases('cuda') == list(cases.CASES)
    cpu = cases.default_cases('cpu')
    assert 'retina-b8-g10' in cpu and 'retina-b8-g1000' not in cpu
    assert not any(cases.CASES[n].amp for n in cpu)


@pytest.mark.skipif(sys.platform != 'linux', reason='reads /proc/self (Linux)')
def test_cpu_memory_probe_tells_the_warmups_leftovers_from_the_steps_peak():
    """On CPU: what the warm-up leaves resident (gradients, libraries) is in ``peak_mb``
    but not in ``step_peak_mb``; what a step allocates and frees is in both."""
    mb = 2**20 // 4  # float32 elements per MiB
    probe = measure.MemoryProbe('cpu')
    kept = torch.ones(100 * mb)  # left by the warm-up, as the inputs' gradients are
    scratch = torch.ones(300 * mb)  # the warm-up's own scratch, freed
    del scratch
    probe.start_window()
    step = torch.ones(200 * mb)  # a step's transient memory
    del step
    got = probe.result()
    assert probe.window_reset and got['heap_trimmed']
    assert 95 <= got['resident_after_warmup_mb'] < 150, got
    assert 190 <= got['step_peak_mb'] < 250, got
    assert got['peak_mb'] >= got['step_peak_mb'] + 90, got
    assert kept.sum() > 0


def test_device_sampler_case_swaps_the_plugins_sampler_and_compares_no_losses():
    """``rpn-b8-g10-device-sampler``: the plugin side samples with ``DeviceRandomSampler``,
    upstream with its own ``RandomSampler``; its losses (other draws) are reported as not
    compared, and do not fail the run as a disagreement would. CPU runs skip it unless
    asked for."""
    case = cases.CASES['rpn-b8-g10-device-sampler']
    assert case.name not in cases.default_cases('cpu')
    assert type(cases.build_head(case, 'plugin', 'cpu').sampler).__name__ == 'DeviceRandomSampler'
    assert type(cases.build_head(case, 'upstream', 'cpu').sampler).__name__ == 'RandomSampler'
    records = {
        side: dict(
            median={p: 1.0 for p in report.PHASES},
            memory=dict(peak_mb=1.0),
            floor=dict(seconds=0.1),
            losses=dict(loss_rpn_cls=[float(side == 'plugin') + 1.0]),
            grad_norms=[1.0],
        )
        for side in cases.SIDES
    }
    check = report.summarise_case(case, True, records, (0.0, 0.0, 0.0))['loss_check']
    assert check['agree'] is None and check['worst'] == 'not compared: DeviceRandomSampler'
    plain = report.summarise_case(cases.CASES['rpn-b8-g10'], True, records, (0.0, 0.0, 0.0))
    assert plain['loss_check']['agree'] is False  # the same losses, in a twin case: disagree


def test_half_inputs_match_float_inputs():
    """A -fp16 case feeds its float32 twin's random draws, rounded to half; its logits
    N(-PRIOR_LOGIT, 1) rather than N(-2, 2) (a float16 sum of the latter overflows upstream)."""
    head = cases.build_head(cases.CASES['ssd-b32-g10'], 'upstream', 'cpu')
    full = cases.make_inputs(head, cases.CASES['ssd-b32-g10'], True, 0, 'cpu')
    half = cases.make_inputs(head, cases.CASES['ssd-b32-g10-fp16'], True, 0, 'cpu')
    assert half.cls_scores[0].dtype == torch.float16 and half.cls_scores[0].requires_grad
    assert half.cls_scores[0].shape == full.cls_scores[0].shape == (4, 4 * 81, 38, 38)
    draws = (full.cls_scores[2].detach() + 2) / 2
    torch.testing.assert_close(half.cls_scores[2], (draws - cases.PRIOR_LOGIT).half())
    assert abs(half.cls_scores[0].float().mean().item() + cases.PRIOR_LOGIT) < 0.01
    assert torch.equal(half.bbox_preds[1], full.bbox_preds[1].detach().half())
    assert torch.equal(half.gts[1].bboxes, full.gts[1].bboxes)  # boxes stay float32


def test_compare_losses():
    ref = dict(loss_cls=[1.0, 2.0], loss_bbox=[0.5, 0.0])
    same = report.compare_losses(ref, dict(loss_cls=[1.0, 2.0], loss_bbox=[0.5, 0.0]))
    assert same.agree and same.max_rel_diff == 0.0
    close = report.compare_losses(ref, dict(loss_cls=[1.0, 2.0 * (1 + 5e-5)], loss_bbox=[0.5, 0]))
    assert close.agree and close.max_rel_diff == pytest.approx(5e-5)
    off = report.compare_losses(ref, dict(loss_cls=[1.0, 2.0], loss_bbox=[0.5005, 0.0]))
    assert not off.agree
    assert off.worst == 'loss_bbox[0]'
    assert off.max_rel_diff == pytest.approx(1e-3)
    assert not report.compare_losses(ref, dict(loss_cls=[1.0, 2.0])).agree
    grads = report.compare_losses(ref, ref, [2.0, 4.0], [2.0, 4.4])
    assert grads.grad_norm_max_rel_diff == pytest.approx(0.1)
    # a float16 sum that overflowed upstream: named, never agreeing; the rest compared
    inf = float('inf')
    up, plugin = dict(loss_cls=[inf, 2.0]), dict(loss_cls=[7.0, 2.0 * (1 + 1e-3)])
    over = report.compare_losses(up, plugin, [float('nan'), 1.0], [3.0, 1.0])
    assert not over.agree and over.worst == 'not finite: upstream loss_cls[0]'
    assert over.max_rel_diff == pytest.approx(1e-3) and over.grad_norm_max_rel_diff == 0.0
    nan = report.compare_losses(dict(loss_cls=[1.0]), dict(loss_cls=[float('nan')]))
    assert not nan.agree and nan.worst == 'not finite: plugin loss_cls[0]'


def test_cls_kernel_pattern():
    """Which kernel names count as the classification loss's (see measure.py)."""
    loss_kernels = [
        'void sigmoid_focal_loss_forward_cuda_kernel<float>(int, float const*, ...)',
        'void sigmoid_focal_loss_backward_cuda_kernel<c10::Half>(int, ...)',
        'void at::native::(anonymous namespace)::cunn_SoftMaxForward<4, float, float>(...)',
        'void nll_loss_forward_reduce_cuda_kernel_2d<float, float, long>(...)',
        '_sigmoid_level_kernel',
        '_softmax_ce_fwd_kernel',
        'triton_red_fused_add_mul_sigmoid_sum_0',
    ]
    others = [
        'void at::native::vectorized_elementwise_kernel<4, at::native::sigmoid_kernel_cuda>',
        'void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, MaxOps>>',
        'void at::native::index_elementwise_kernel<128, 4>',
    ]
    assert all(measure.CLS_KERNEL_PATTERN.search(name) for name in loss_kernels)
    assert not any(measure.CLS_KERNEL_PATTERN.search(name) for name in others)


def test_kernel_summary():
    """The CUDA profile's figures from profiler rows (made up here: no GPU in the suite)."""
    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU

    def row(key, device_type, count, self_us=0):
        return SimpleNamespace(
            key=key, device_type=device_type, count=count, self_device_time_total=self_us
        )

    rows = [
        row('void sigmoid_focal_loss_forward_cuda_kernel<float>(...)', cuda, 5, 2000),
        SimpleNamespace(  # a user range by the profiler's own flag
            key='my_range',
            device_type=cuda,
            count=1,
            self_device_time_total=9000,
            is_user_annotation=True,
        ),
        row('triton_red_fused_sigmoid_sum_0', cuda, 5, 1000),
        row('void at::native::reduce_kernel<512, 1>(...)', cuda, 40, 500),
        row('Memcpy DtoH (Device -> Pinned)', cuda, 14, 30),
        row('anchorloss/sample', cuda, 1, 33000),  # a stage's range on the GPU timeline
        row('cudaLaunchKernel', cpu, 45),
        row('cuLaunchKernel', cpu, 5),
        row('cudaStreamSynchronize', cpu, 14),
        row('cudaDeviceSynchronize', cpu, 1),
        row('aten::sigmoid', cpu, 5, 3000),
    ]
    summary = measure.kernel_summary(rows)
    assert summary['kernels'] == 50 and summary['launch_calls'] == 50
    assert summary['stream_syncs'] == 14 and summary['device_syncs'] == 1
    assert summary['cls_kernel_ms'] == pytest.approx(3.0)
    assert summary['kernel_ms'] == pytest.approx(3.5)
    assert [k['calls'] for k in summary['cls_kernels']] == [5, 5]  # largest time first
    assert summary['cls_kernels'][0]['name'].startswith('void sigmoid_focal_loss_forward')
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        torch.sigmoid(torch.randn(8)).sum()
    real = measure.kernel_summary(prof.key_averages())  # real rows: the same fields read
    assert (real['kernels'], real['stream_syncs'], real['cls_kernel_ms']) == (0, 0, 0)


def _record(side: str, launches: int, cuda: bool) -> dict:
    """A worker's record with only what the counts table reads."""
    record = dict(side=side, counts=dict(ops=2 * launches, launches=launches, syncs=3))
    if cuda:
        record['cuda'] = dict(kernels=launches, stream_syncs=1, cls_kernel_ms=1.5, kernel_ms=9.0)
    return record


def test_tables_show_counts_and_errors():
    """The counts table gets CUDA columns when a side was profiled on CUDA; a side that could
    not run shows its error in the timing table."""
    cpu = dict(
        case='a', upstream=_record('upstream', 40, False), plugin=_record('plugin', 9, False)
    )
    table = report.counts_table([cpu])
    assert '| a | 80 / 18 | 40 / 9 | 3 / 3 |' in table and 'CUDA' not in table
    gpu = dict(case='b', upstream=_record('upstream', 40, True), plugin=_record('plugin', 9, True))
    failed = dict(case='c', upstream=dict(side='upstream', error='RuntimeError: no | half'))
    failed['plugin'] = _record('plugin', 9, False)
    table = report.counts_table([gpu, failed])
    assert 'cudaStreamSynchronize' in table and 'cls kernel ms' in table
    assert '| b | 80 / 18 | 40 / 9 | 3 / 3 | 40 / 9 | 1 / 1 | 1.50 / 1.50 | 9.00 / 9.00 |' in table
    assert '| c | - / 18 | - / 9 | - / 3 | - / - |' in table
    timing = report.timing_table([failed])
    assert '| c | ERROR | upstream: RuntimeError: no / half |' in timing


def test_profile_text_ranks_host_time_on_a_gpu():
    """A CUDA profile's table ranks device time; the text adds the ops ranked by host time,
    and the stages with their time outside any op (a CPU profile has just its one table)."""
    top = [dict(name='aten::randperm', calls=16, self_cpu_ms=24.5, cpu_total_ms=30.0)]
    stage = dict(name='sample', calls=1, cpu_total_ms=40.7, self_cpu_ms=4.9)
    profile = dict(sort_by='self_cuda_time_total', table='<table>', top=top, stages=[stage])
    gpu = dict(case='rpn', upstream={}, plugin=dict(profile=profile))
    text = report.profile_text([gpu])
    assert '| sample | 40.70 | 4.90 |' in text
    assert 'by self CPU time' in text and '| aten::randperm | 16 | 24.50 |' in text
    cpu = dict(
        case='rpn', upstream={}, plugin=dict(profile={**profile, 'sort_by': 'self_cpu_time_total'})
    )
    assert 'by self CPU time' not in report.profile_text([cpu])


def test_half_case_runs_on_both_sides():
    """SSD300 with fp16 maps under autocast, both sides in this process (eager kernels):
    the losses agree to fp16's tolerance and the plugin dispatches fewer ops and syncs."""
    records = {
        side: measure.run_worker(
            measure.WorkerOptions(case='ssd-b32-g10-fp16', side=side, quick=True, repeats=1)
        )
        for side in cases.SIDES
    }
    case = cases.CASES['ssd-b32-g10-fp16']
    summary = report.summarise_case(case, True, records, (0.0, 0.0, 0.0))
    assert summary['dtype'] == 'float16' and summary['loss_check']['rtol'] == 1e-2
    assert summary['loss_check']['agree'], summary['loss_check']
    up, pl = records['upstream'], records['plugin']
    assert up['dtype'] == pl['dtype'] == 'float16'
    assert len(up['losses']['loss_cls']) == 4  # per image for SSD
    assert 0 < pl['counts']['launches'] < up['counts']['launches']
    assert 0 < pl['counts']['syncs'] < up['counts']['syncs']


@pytest.mark.skipif(torch.cuda.is_available(), reason='needs a machine without CUDA')
def test_side_that_cannot_run_records_its_error(tmp_path):
    """A worker whose side raises writes a record with the error (and exits 1)."""
    opts = measure.WorkerOptions(case='ssd-b32-g10', side='plugin', device='cuda', quick=True)
    result = tmp_path / 'record.json'
    assert worker.main([json.dumps(opts._asdict()), str(result)]) == 1
    record = json.loads(result.read_text())
    assert record['side'] == 'plugin'
    assert 'CUDA' in record['error'] or 'cuda' in record['error'], record['error']


def test_quick_run_writes_both_sides(tmp_path):
    out = tmp_path / 'bench.json'
    cmd = [sys.executable, str(TOOL), '--quick', '--cases', 'retina-b2-g10', '--repeats', '1']
    cmd.append('--profile')
    env = dict(os.environ, **QUICK_ENV)
    result = subprocess.run(
        [*cmd, '--out', str(out)], cwd=ROOT, capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert 'retina-b2-g10' in result.stdout and 'speed-up' in result.stdout
    assert 'host syncs' in result.stdout
    data = json.loads(out.read_text())
    assert {'cpu_model', 'cpu_cores', 'torch', 'device_name'} <= set(data['machine'])
    assert not data['plugin_sources_changed_during_run']
    (case,) = data['cases']
    assert case['case'] == 'retina-b2-g10' and case['batch_size'] == 2
    up, pl = case['upstream'], case['plugin']
    assert up['head'] == 'RetinaHead'
    assert pl['head'] == 'AnchorLossRetinaHead'
    assert pl['loss_cls'] == 'FusedFocalLoss'
    assert pl['source']['package'] == str(ROOT / 'mmdet_anchorloss')  # the live tree
    assert up['source']['sources_sha1'] == pl['source']['sources_sha1']
    for record in (up, pl):
        assert set(record['median']) == {'assign', 'fwd', 'bwd', 'fwd_bwd'}
        assert all(t > 0 for t in record['median'].values())
        assert record['first_call']['fwd_bwd'] > 0
        assert record['memory']['peak_mb'] is not None
        assert 0 < record['memory']['step_peak_mb'] <= record['memory']['peak_mb']
        assert record['randperm_replayed'] is True
        assert set(record['losses']) == {'loss_cls', 'loss_bbox'}
        assert len(record['losses']['loss_cls']) == 5  # one per level
        counts = record['counts']
        assert 0 < counts['syncs'] < counts['launches'] <= counts['ops']
        assert sum(counts['sync_ops'].values()) == counts['syncs']
        assert counts['graphs_compiled'] == 0
        assert 'cuda' not in record  # the profiler's kernel counts are CUDA only
    # Upstream loops over images and levels with a host sync in each; the plugin does not.
    assert pl['counts']['launches'] < up['counts']['launches']
    assert pl['counts']['syncs'] < up['counts']['syncs']
    assert up['counts']['sync_ops'].get('nonzero', 0) > 0
    assert set(case['speedup']) == {'assign', 'fwd', 'bwd', 'fwd_bwd'}
    assert case['floor_s'] > 0 and case['passes']['plugin'] > 0
    assert case['loss_check']['agree']
    assert case['loss_check']['max_rel_diff'] < 1e-4
    assert case['loss_check']['grad_norm_max_rel_diff'] < 1e-4
    assert 'host syncs' in out.with_suffix('.md').read_text()
    # --profile: the top ops per side, and the plugin's host time split by stage
    assert up['profile']['top'] and pl['profile']['top'] and not up['profile']['stages']
    stages = {st['name']: st['cpu_total_ms'] for st in pl['profile']['stages']}
    assert {'assign', 'sample', 'classification_loss', 'regression_loss'} <= set(stages)
    assert all(ms > 0 for ms in stages.values())
    # each stage's time outside any op is a part of its time
    assert all(0 <= st['self_cpu_ms'] <= st['cpu_total_ms'] for st in pl['profile']['stages'])
    assert 'host ms, start to end' in result.stdout and 'outside any op' in result.stdout
