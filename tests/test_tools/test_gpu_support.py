"""GPU support that must be right before a GPU is at hand: the environment record, the mmcv
ops check (mmcv built without CUDA ops, mmcv-lite, ops for another GPU arch: a monkeypatched
mmcv stands in), ``make gpu-check`` (no GPU: says so, exits 2, writes nothing; with a faked
GPU and faked steps: the report), and the nccl default of distributed runs on CUDA."""

import json
import sys
import types

import mmcv.ops
import pytest
import torch
from mmengine.config import Config

from mmdet_anchorloss.engine import env_info, gpu_check, launch


@pytest.fixture(autouse=True)
def fresh_ops_check():
    env_info._checked.cache_clear()
    yield
    env_info._checked.cache_clear()


def test_environment_info_keys_and_line():
    info = env_info.environment_info()
    for key in (
        'device',
        'torch',
        'torch_cuda',
        'gpu_name',
        'gpu_capability',
        'mmcv',
        'mmcv_ops',
        'mmcv_ops_cuda',
        'mmcv_ops_devices',
        'mmdet',
        'mmengine',
        'python',
    ):
        assert key in info
    assert info['device'] == ('cuda' if torch.cuda.is_available() else 'cpu')
    assert info['torch'] == torch.__version__
    assert info['mmcv_ops'] is True and 'cpu' in info['mmcv_ops_devices']
    json.dumps(info)  # JSON-able, for reports
    line = env_info.format_environment(info)
    assert f'torch {torch.__version__}' in line and 'mmcv 2.1.0' in line


def test_format_environment_on_a_gpu():
    info = dict(
        device='cuda',
        gpu_name='NVIDIA H100 80GB HBM3',
        gpu_capability='9.0',
        gpu_count=1,
        torch='2.11.0+cu130',
        torch_cuda='13.0',
        mmcv='2.1.0',
        mmcv_ops_devices=['cpu', 'cuda'],
        mmdet='3.3.0',
        python='3.12.3',
    )
    line = env_info.format_environment(info)
    assert line.startswith('device cuda (NVIDIA H100 80GB HBM3, sm_90)')
    assert 'CUDA 13.0' in line and 'compiled ops for: cpu, cuda' in line


def test_cpu_ops_pass_on_cpu():
    env_info.check_mmcv_ops('cpu')
    env_info._probe(mmcv.ops.nms, torch.device('cpu'))  # the probe itself, on the CPU


def test_mmcv_without_cuda_ops_is_named_with_the_fix(monkeypatch):
    monkeypatch.setattr(mmcv.ops, 'get_compiling_cuda_version', lambda: 'not available')
    with pytest.raises(env_info.MmcvOpsError) as info:
        env_info.check_mmcv_ops('cuda:0')
    message = str(info.value)
    assert 'built without CUDA ops' in message and 'cuda:0' in message
    assert 'FORCE_CUDA=1' in message and 'tools/install.sh' in message
    env_info.check_mmcv_ops('cpu')  # the CPU ops are fine
    assert env_info.mmcv_ops_cuda_version() is None


def test_mmcv_lite_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, 'mmcv.ops', types.ModuleType('mmcv.ops'))  # no names
    with pytest.raises(env_info.MmcvOpsError, match='no compiled ops.*mmcv-lite'):
        env_info.check_mmcv_ops('cpu')


def test_cuda_ops_that_fail_on_this_gpu(monkeypatch):
    """Ops compiled for other archs: the probe's error becomes one that names the fix."""

    def probe(nms, dev):
        raise RuntimeError('CUDA error: no kernel image is available for execution on the device')

    monkeypatch.setattr(mmcv.ops, 'get_compiling_cuda_version', lambda: '13.0')
    monkeypatch.setattr(env_info, '_probe', probe)
    with pytest.raises(env_info.MmcvOpsError, match='fail on cuda.*no kernel image.*ARCH_LIST'):
        env_info.check_mmcv_ops('cuda')
    env_info.check_mmcv_ops('cuda', probe=False)  # compiled with CUDA: passes without probe


def test_gpu_check_without_gpu_says_so(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    out = tmp_path / 'gpu_check'
    assert gpu_check.main(['--out', str(out)]) == 2
    err = capsys.readouterr().err
    assert 'No CUDA GPU here' in err and 'nothing was run' in err
    assert not out.exists()


def test_gpu_check_report(monkeypatch, tmp_path):
    """Faked GPU and steps: the report has the steps, counts, and both sides' numbers."""
    fake_env = dict(
        env_info.environment_info(),
        device='cuda',
        cuda_available=True,
        gpu_name='Fake GPU',
        gpu_capability='9.0',
        gpu_count=1,
        cudnn=90100,
        torch_cuda='13.0',
        mmcv_ops_cuda='13.0',
    )
    monkeypatch.setattr(gpu_check, 'environment_info', lambda: fake_env)
    monkeypatch.setattr(gpu_check, 'check_mmcv_ops', lambda device: None)
    commands = []

    def run(cmd, log_file):
        commands.append(cmd)
        log_file.write_text('log')
        if '-m' in cmd and 'pytest' in cmd:
            xml = next(arg.split('=', 1)[1] for arg in cmd if arg.startswith('--junitxml='))
            open(xml, 'w').write(
                '<testsuites><testsuite tests="32" failures="0" errors="0" '
                'skipped="0"/></testsuites>'
            )
        elif 'tools/benchmark_loss.py' in cmd:
            out = cmd[cmd.index('--out') + 1]
            open(out, 'w').write('{}')
            open(out[:-5] + '.md', 'w').write('| case | speed-up |\n|---|---|\n| r | 1.0x |')
        else:
            work_dir = tmp_path / 'out' / 'compare'
            work_dir.mkdir(parents=True)
            side = dict(
                iters=300, bbox_mAP=0.5, first_iter_loss=2.5, sec_per_iter=0.05, peak_mem_mb=900.0
            )
            (work_dir / 'report.json').write_text(json.dumps(dict(plugin=side, upstream=side)))
        return dict(rc=0, seconds=1.0, log=str(log_file))

    rc = gpu_check.run_gpu_check(tmp_path / 'out', iters=300, run=run)
    assert rc == 0
    assert any('--device' in c and 'cuda' in c for c in commands)
    compare_cmd = commands[-1]
    assert compare_cmd[compare_cmd.index('--max-iters') + 1] == '300'
    report = json.loads((tmp_path / 'out' / 'report.json').read_text())
    assert report['ok'] and report['environment']['gpu_name'] == 'Fake GPU'
    assert report['steps']['pytest_gpu']['passed'] == 32
    assert report['steps']['compare']['sides']['upstream']['bbox_mAP'] == 0.5
    md = (tmp_path / 'out' / 'report.md').read_text()
    assert 'Fake GPU' in md and 'PASS' in md and '32 passed' in md
    assert '| plugin | 0.500 | 2.500000 | 0.0500 | 900 |' in md and '1.0x' in md


def test_gpu_check_fails_when_no_gpu_test_ran(monkeypatch, tmp_path):
    monkeypatch.setattr(
        gpu_check,
        'environment_info',
        lambda: dict(
            env_info.environment_info(),
            cuda_available=True,
            device='cuda',
            gpu_name='G',
            gpu_capability='9.0',
            gpu_count=1,
        ),
    )
    monkeypatch.setattr(gpu_check, 'check_mmcv_ops', lambda device: None)

    def run(cmd, log_file):
        log_file.write_text('')
        return dict(rc=5, seconds=0.0, log=str(log_file))  # pytest: no tests collected

    assert gpu_check.run_gpu_check(tmp_path, skip=('benchmark', 'compare'), run=run) == 1
    assert 'FAILED (exit 5)' in (tmp_path / 'report.md').read_text()


def test_gpu_check_stops_on_mmcv_without_cuda_ops(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(
        gpu_check,
        'environment_info',
        lambda: dict(env_info.environment_info(), cuda_available=True),
    )
    monkeypatch.setattr(mmcv.ops, 'get_compiling_cuda_version', lambda: 'not available')
    assert gpu_check.run_gpu_check(tmp_path / 'out') == 3
    assert 'built without CUDA ops' in capsys.readouterr().err
    assert not (tmp_path / 'out').exists()


def test_distributed_on_cuda_defaults_to_nccl(monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    cfg = Config(dict(model=dict(type='RetinaNet')))
    assert launch.setup_cpu_distributed(cfg, 'pytorch') is False
    assert cfg.env_cfg.dist_cfg.backend == 'nccl'
    assert 'model_wrapper_cfg' not in cfg  # mmengine's own DDP wrapper with device ids
    named = Config(dict(env_cfg=dict(dist_cfg=dict(backend='gloo'))))
    assert launch.default_cuda_backend(named) == 'gloo'  # the config's choice stays
    untouched = Config(dict(model=dict(type='RetinaNet')))
    assert launch.setup_cpu_distributed(untouched, 'none') is False
    assert 'env_cfg' not in untouched


def test_build_runner_checks_mmcv_ops_on_a_gpu(monkeypatch):
    """On a GPU the runner is built only after mmcv's ops are known to run there."""
    from mmengine.config import Config

    from mmdet_anchorloss.engine import env_info, runner

    calls = []

    def refuse(device):
        calls.append(device)
        raise env_info.MmcvOpsError('mmcv was built without CUDA ops: rebuild it')

    monkeypatch.setattr(runner.torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(runner, 'check_mmcv_ops', refuse)
    with pytest.raises(env_info.MmcvOpsError, match='without CUDA ops'):
        runner.build_runner(Config(dict(model=dict(type='Nothing'))))
    assert calls == ['cuda']
