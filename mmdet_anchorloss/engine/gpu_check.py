"""``make gpu-check``: one report on how the project runs on this machine's GPU.

Runs, on CUDA, one after the other:

1. ``pytest -m gpu`` (the gpu-marked tests);
2. ``tools/benchmark_loss.py --device cuda`` (upstream heads against their plugin twins);
3. ``tools/compare_upstream.py`` on the RetinaNet shapes config, both sides, ``--max-iters``
   300: mAP, first-iteration loss and seconds per iteration of each side.

and writes ``report.md`` and ``report.json`` (with :func:`environment_info`: GPU, torch, CUDA,
mmcv) plus each step's log into the output folder. On a machine where torch sees no CUDA GPU
it says so and returns 2 without running anything or writing a report; when mmcv's ops cannot
run on the GPU it says why and how to fix it, and returns 3. Otherwise it returns 0 when
every step passed, 1 when one failed (the report says which).

Command line: ``python tools/gpu_check.py [--out DIR] [--iters N] [--skip STEP ...]``.
"""

import argparse
import json
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from .env_info import MmcvOpsError, check_mmcv_ops, environment_info, format_environment

__all__ = ['main', 'run_gpu_check']

ROOT = Path(__file__).resolve().parents[2]
COMPARE_CONFIG = 'configs/shapes/retinanet_r18_fpn_shapes.py'
COMPARE_ITERS = 300
BENCH_ARGS = ('--cases', 'retina-b8-g10', 'retina-b8-g100', 'rpn-b8-g10', '--repeats', '3')
STEPS = ('pytest_gpu', 'benchmark', 'compare')
NO_GPU = (
    'No CUDA GPU here: torch {torch} (CUDA build: {cuda}) reports '
    'torch.cuda.is_available() == False. make gpu-check needs a GPU; nothing was run and no '
    'report was written. Run it on a GPU machine (see README, "On a GPU machine").'
)


def run_command(cmd: List[str], log_file: Path, timeout: Optional[float] = None) -> dict:
    """Run ``cmd`` in the project root with its output in ``log_file``; rc and seconds."""
    start = time.perf_counter()
    print(f'[gpu-check] {" ".join(cmd)}  (log: {log_file})', flush=True)
    with open(log_file, 'w') as log:
        try:
            rc = subprocess.run(
                cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, timeout=timeout
            ).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    return dict(rc=rc, seconds=round(time.perf_counter() - start, 1), log=str(log_file))


def junit_counts(path: Path) -> Dict[str, int]:
    """passed/failed/errors/skipped from a pytest ``--junitxml`` file (empty if unreadable)."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return {}
    suites = [root] if root.tag == 'testsuite' else list(root.iter('testsuite'))
    total = {
        key: sum(int(s.get(key, 0)) for s in suites)
        for key in ('tests', 'failures', 'errors', 'skipped')
    }
    return dict(
        passed=total['tests'] - total['failures'] - total['errors'] - total['skipped'],
        failed=total['failures'],
        errors=total['errors'],
        skipped=total['skipped'],
    )


def step_pytest(out: Path, run: Callable) -> dict:
    xml = out / 'pytest_gpu.xml'
    cmd = [
        sys.executable,
        '-m',
        'pytest',
        '-q',
        '-m',
        'gpu',
        '-p',
        'no:cacheprovider',
        f'--junitxml={xml}',
    ]
    result = run(cmd, out / 'pytest_gpu.log')
    result.update(junit_counts(xml))
    # exit 0: all passed; a run where every gpu test skipped is no GPU check either
    result['ok'] = result['rc'] == 0 and result.get('passed', 0) > 0
    return result


def step_benchmark(out: Path, run: Callable, bench_args: Sequence[str]) -> dict:
    json_file = out / 'benchmark.json'
    cmd = [
        sys.executable,
        'tools/benchmark_loss.py',
        '--device',
        'cuda',
        '--out',
        str(json_file),
        *bench_args,
    ]
    result = run(cmd, out / 'benchmark.log')
    md = json_file.with_suffix('.md')
    result['table_md'] = md.read_text() if md.is_file() else None
    result['json'] = str(json_file)
    result['ok'] = result['rc'] == 0 and json_file.is_file()
    return result


def step_compare(out: Path, run: Callable, iters: int) -> dict:
    work_dir = out / 'compare'
    cmd = [
        sys.executable,
        'tools/compare_upstream.py',
        COMPARE_CONFIG,
        '--max-iters',
        str(iters),
        '--work-dir',
        str(work_dir),
    ]
    result = run(cmd, out / 'compare.log')
    report = work_dir / 'report.json'
    sides, verdict = {}, None
    if report.is_file():
        summary = json.loads(report.read_text())
        verdict = summary.get('verdict')  # with --seeds >= 3 (tools/compare_upstream.py)
        for side in ('plugin', 'upstream'):
            data = summary.get(side) or {}
            sides[side] = dict(
                iters=data.get('iters'),
                bbox_mAP=data.get('bbox_mAP'),
                first_iter_loss=data.get('first_iter_loss'),
                sec_per_iter=data.get('sec_per_iter'),
                peak_mem_mb=data.get('peak_mem_mb'),
            )
    result.update(
        config=COMPARE_CONFIG, iters=iters, work_dir=str(work_dir), sides=sides, verdict=verdict
    )
    result['ok'] = result['rc'] == 0 and len(sides) == 2
    return result


def _fmt(value, spec: str) -> str:
    return '-' if value is None else format(value, spec)


def render_markdown(report: dict) -> str:
    """report.md from the report dict."""
    env, steps = report['environment'], report['steps']
    lines = [
        '# GPU check',
        '',
        f'- {format_environment(env)}',
        f'- GPU: {env["gpu_name"]}, compute capability {env["gpu_capability"]}, '
        f'{env["gpu_count"]} visible; cuDNN {env["cudnn"]}; mmcv ops CUDA {env["mmcv_ops_cuda"]}',
        f'- started {report["started"]}, {report["seconds"]:.0f} s in all; '
        f'result: **{"PASS" if report["ok"] else "FAIL"}**',
        '',
        '| step | result | time | log |',
        '|---|---|---:|---|',
    ]
    for name in STEPS:
        step = steps.get(name)
        if step is None:
            lines.append(f'| {name} | skipped | | |')
            continue
        result = 'ok' if step['ok'] else f'FAILED (exit {step["rc"]})'
        if name == 'pytest_gpu' and 'passed' in step:
            result += (
                f': {step["passed"]} passed, {step["failed"]} failed, '
                f'{step["errors"]} errors, {step["skipped"]} skipped'
            )
        lines.append(f'| {name} | {result} | {step["seconds"]:.0f} s | `{step["log"]}` |')
    compare = steps.get('compare')
    if compare and compare.get('sides'):
        lines += [
            '',
            f'## {compare["config"]}, {compare["iters"]} iterations, both sides on the GPU',
            '',
            '| side | bbox mAP | first-iteration loss | s / iteration | peak MiB |',
            '|---|---:|---:|---:|---:|',
        ]
        for side, data in compare['sides'].items():
            lines.append(
                f'| {side} | {_fmt(data["bbox_mAP"], ".3f")} | '
                f'{_fmt(data["first_iter_loss"], ".6f")} | {_fmt(data["sec_per_iter"], ".4f")} '
                f'| {_fmt(data["peak_mem_mb"], ".0f")} |'
            )
        if compare.get('verdict'):
            lines.append(f'\nVerdict of the comparison: {compare["verdict"]}')
        lines.append(f'\nFull report: `{compare["work_dir"]}/report.md`')
    bench = steps.get('benchmark')
    if bench and bench.get('table_md'):
        lines += [
            '',
            '## Loss benchmark (tools/benchmark_loss.py --device cuda)',
            '',
            bench['table_md'].strip(),
        ]
    return '\n'.join(lines) + '\n'


def run_gpu_check(
    out: Path,
    iters: int = COMPARE_ITERS,
    bench_args: Sequence[str] = BENCH_ARGS,
    skip: Sequence[str] = (),
    run: Callable = run_command,
) -> int:
    """Run the steps and write the report (see the module docstring); the exit code."""
    env = environment_info()
    if not env['cuda_available']:
        print(
            '[gpu-check] ' + NO_GPU.format(torch=env['torch'], cuda=env['torch_cuda']),
            file=sys.stderr,
        )
        return 2
    try:
        check_mmcv_ops('cuda')
    except MmcvOpsError as exc:
        print(f'[gpu-check] ERROR: {exc}', file=sys.stderr)
        return 3
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    print(f'[gpu-check] {format_environment(env)}', flush=True)
    started, start = time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime()), time.perf_counter()
    steps = {}
    if 'pytest_gpu' not in skip:
        steps['pytest_gpu'] = step_pytest(out, run)
    if 'benchmark' not in skip:
        steps['benchmark'] = step_benchmark(out, run, bench_args)
    if 'compare' not in skip:
        steps['compare'] = step_compare(out, run, iters)
    report = dict(
        environment=env,
        started=started,
        seconds=round(time.perf_counter() - start, 1),
        steps=steps,
        ok=all(step['ok'] for step in steps.values()),
    )
    (out / 'report.json').write_text(json.dumps(report, indent=1) + '\n')
    text = render_markdown(report)
    (out / 'report.md').write_text(text)
    print(text)
    print(f'[gpu-check] wrote {out / "report.md"} and {out / "report.json"}')
    return 0 if report['ok'] else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--out', default='work_dirs/gpu_check', help='report folder')
    parser.add_argument(
        '--iters',
        type=int,
        default=COMPARE_ITERS,
        help='training iterations per side for the comparison (default 300)',
    )
    parser.add_argument(
        '--bench-args',
        nargs=argparse.REMAINDER,
        default=list(BENCH_ARGS),
        help='arguments for tools/benchmark_loss.py (default: %(default)s)',
    )
    parser.add_argument('--skip', nargs='*', default=[], choices=STEPS, help='steps to leave out')
    args = parser.parse_args(argv)
    return run_gpu_check(Path(args.out), args.iters, args.bench_args, args.skip)
