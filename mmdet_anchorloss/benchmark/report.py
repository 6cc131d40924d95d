"""Compare the two sides of each case, and write the report (JSON and markdown tables)."""

import math
import os
import platform
import subprocess
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Sequence

import mmcv
import mmdet
import torch

from ..engine.compare_report import fmt
from ..engine.compare_report import markdown_table as markdown
from ..engine.compare_stats import relative_difference
from .cases import SIDES, Case, case_geometry
from .measure import PHASES

LOSS_RTOL = 1e-4
ERROR_CHARS = 100  # of a side's error message in the tables


class LossCheck(NamedTuple):
    """Agreement of the two sides' losses (and of their gradient norms)."""

    agree: bool
    max_rel_diff: float
    worst: str  # 'key[entry]' of the largest relative difference
    grad_norm_max_rel_diff: Optional[float]


def compare_losses(
    upstream: Dict[str, List[float]],
    plugin: Dict[str, List[float]],
    upstream_grads: Sequence[float] = (),
    plugin_grads: Sequence[float] = (),
    rtol: float = LOSS_RTOL,
) -> LossCheck:
    """Compare per key and per entry; keys or lengths that differ never agree, nor do
    losses that are not finite on either side (named in ``worst``: a float16 sum that
    overflowed, say)."""
    if set(upstream) != set(plugin) or any(len(upstream[k]) != len(plugin[k]) for k in upstream):
        shapes = {k: len(v) for k, v in upstream.items()}, {k: len(v) for k, v in plugin.items()}
        return LossCheck(False, float('inf'), f'keys/lengths differ: {shapes}', None)
    pairs = {
        f'{key}[{i}]': (a, b)
        for key in upstream
        for i, (a, b) in enumerate(zip(upstream[key], plugin[key]))
    }
    not_finite = [
        f'{side} {name}'
        for name, pair in pairs.items()
        for side, value in zip(SIDES, pair)
        if not math.isfinite(value)
    ]
    diffs = {
        name: relative_difference(b, a)
        for name, (a, b) in pairs.items()
        if math.isfinite(a) and math.isfinite(b)
    }
    worst = max(diffs, key=diffs.get) if diffs else '-'
    max_diff = diffs[worst] if diffs else 0.0
    grads = None
    if upstream_grads and len(upstream_grads) == len(plugin_grads):
        finite = [
            relative_difference(b, a)
            for a, b in zip(upstream_grads, plugin_grads)
            if math.isfinite(a) and math.isfinite(b)
        ]
        grads = max(finite, default=None)
    if not_finite:
        shown = ', '.join(not_finite[:4]) + (', ...' if len(not_finite) > 4 else '')
        return LossCheck(False, max_diff, f'not finite: {shown}', grads)
    return LossCheck(max_diff <= rtol, max_diff, worst, grads)


def loss_rtol(case: Case) -> float:
    """How close the two sides' losses must be: ``LOSS_RTOL``, or fp16's resolution for a
    half case (the sides round at different points)."""
    return 1e-2 if case.amp else LOSS_RTOL


def summarise_case(case: Case, quick: bool, records: Dict[str, dict], load: tuple) -> dict:
    """Speed-ups, memory ratio, passes and the loss check of one case."""
    batch, img_shape, pad_shape = case_geometry(case, quick)
    summary = dict(
        case=case.name,
        config=case.config,
        dtype=case.dtype,
        batch_size=batch,
        num_gts=case.num_gts,
        img_shape=img_shape,
        pad_shape=pad_shape,
        loadavg_at_start=load,
        **records,
    )
    up, pl = records['upstream'], records['plugin']
    if 'error' in up or 'error' in pl:
        return summary
    summary['speedup'] = {p: up['median'][p] / pl['median'][p] for p in PHASES}
    up_mb, pl_mb = up['memory']['peak_mb'], pl['memory']['peak_mb']
    summary['memory_ratio_upstream_over_plugin'] = up_mb / pl_mb if pl_mb > 0 else None
    floor = pl['floor']['seconds']
    summary['floor_s'] = floor
    summary['passes'] = {s: records[s]['median']['fwd_bwd'] / floor for s in SIDES}
    rtol = loss_rtol(case)
    check = compare_losses(up['losses'], pl['losses'], up['grad_norms'], pl['grad_norms'], rtol)
    summary['loss_check'] = dict(check._asdict(), rtol=rtol)
    if case.plugin_sampler:  # other random draws: the losses differ by design
        summary['loss_check'].update(agree=None, worst=f'not compared: {case.plugin_sampler}')
    return summary


def error_text(summary: dict) -> str:
    """Why a case has no comparison: each failed side's error, fit for a table cell."""
    errors = [f'{side}: {summary[side]["error"]}' for side in SIDES if 'error' in summary[side]]
    return '; '.join(e[:ERROR_CHARS] for e in errors).replace('|', '/')


def timing_table(summaries: Sequence[dict]) -> str:
    """Per case and phase: upstream s, plugin s, speed-up, each side's first call."""
    header = ['case', 'phase', 'upstream s', 'plugin s', 'speed-up']
    header += ['up 1st call s', 'plugin 1st call s (incl. compile)']
    rows = []
    for s in summaries:
        if 'speedup' not in s:
            rows.append([s['case'], 'ERROR', error_text(s)] + ['-'] * 4)
            continue
        up, pl = s['upstream'], s['plugin']
        for phase in PHASES:
            rows.append(
                [
                    s['case'],
                    phase.replace('_', '+'),
                    fmt(up['median'][phase], '.3f'),
                    fmt(pl['median'][phase], '.3f'),
                    fmt(s['speedup'][phase], '.1f') + 'x',
                    fmt(up['first_call'][phase], '.2f'),
                    fmt(pl['first_call'][phase], '.2f'),
                ]
            )
    return markdown(header, rows)


def summary_table(summaries: Sequence[dict]) -> str:
    """Per case: memory, passes over the logits, loss agreement, machine load."""
    header = ['case', 'anchors/img', 'up peak MB', 'plugin peak MB', 'mem up/plugin']
    header += ['CPU step peak MB (up / plugin)']
    header += ['floor s', 'up passes', 'plugin passes', 'loss max rel diff', 'agree', 'load 1m']
    rows = []
    for s in summaries:
        load = fmt(s['loadavg_at_start'][0], '.1f')
        if 'speedup' not in s:
            rows.append([s['case']] + ['-'] * 10 + [load])
            continue
        up, pl, check = s['upstream'], s['plugin'], s['loss_check']
        ratio = s['memory_ratio_upstream_over_plugin']
        rows.append(
            [
                s['case'],
                str(pl['num_anchors_per_image']),
                fmt(up['memory']['peak_mb'], '.0f'),
                fmt(pl['memory']['peak_mb'], '.0f'),
                fmt(ratio, '.1f') + 'x' if ratio is not None else '-',
                _pair(s, 'memory', 'step_peak_mb', spec='.0f'),
                fmt(s['floor_s'], '.4f'),
                fmt(s['passes']['upstream'], '.1f'),
                fmt(s['passes']['plugin'], '.1f'),
                fmt(check['max_rel_diff'], '.1e'),
                _agreement(check),
                load,
            ]
        )
    return markdown(header, rows)


def _agreement(check: dict) -> str:
    """'yes', 'NO (where)', or why the losses were not compared."""
    if check['agree'] is None:
        return check['worst']
    return 'yes' if check['agree'] else f'NO ({check["worst"]})'


def _pair(summary: dict, *keys: str, spec: str = 'd') -> str:
    """'upstream / plugin' of one nested field; '-' for a side without it."""
    cells = []
    for side in SIDES:
        value = summary[side]
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        cells.append(fmt(value, spec))
    return ' / '.join(cells)


def counts_table(summaries: Sequence[dict]) -> str:
    """Per case, upstream / plugin: dispatched ops, launches and host syncs of one fwd+bwd
    (``count_ops``), and on CUDA the profiler's kernels, stream syncs and the classification
    loss's kernel time."""
    cuda = any('cuda' in s[side] for s in summaries for side in SIDES)
    header = ['case', 'aten ops', 'launches', 'host syncs']
    if cuda:
        header += ['CUDA kernels', 'cudaStreamSynchronize', 'cls kernel ms', 'GPU kernel ms']
    rows = []
    for s in summaries:
        row = [s['case']] + [_pair(s, 'counts', k) for k in ('ops', 'launches', 'syncs')]
        if cuda:
            row += [_pair(s, 'cuda', 'kernels'), _pair(s, 'cuda', 'stream_syncs')]
            row += [_pair(s, 'cuda', k, spec='.2f') for k in ('cls_kernel_ms', 'kernel_ms')]
        rows.append(row)
    return markdown(header, rows)


def profile_text(summaries: Sequence[dict]) -> str:
    """The profiler tables of every side that has one."""
    parts = []
    for s in summaries:
        for side in SIDES:
            prof = s.get(side, {}).get('profile')
            if prof:
                parts.append(f'### {s["case"]} {side} (sorted by {prof["sort_by"]})\n')
                if prof.get('stages'):
                    rows = [
                        [st['name'], f"{st['cpu_total_ms']:.2f}", fmt(st.get('self_cpu_ms'), '.2f')]
                        for st in prof['stages']
                    ]
                    header = ['stage', 'host ms, start to end', 'of it outside any op']
                    parts.append(markdown(header, rows) + '\n')
                parts.append('```\n' + prof['table'].rstrip() + '\n```')
                if prof['sort_by'] != 'self_cpu_time_total' and prof.get('top'):
                    # on a GPU the table ranks device time; the host's side, ranked too
                    rows = [
                        [t['name'][:60], t['calls'], f"{t['self_cpu_ms']:.2f}"] for t in prof['top']
                    ]
                    parts.append(f'\nTop ops of {s["case"]} {side} by self CPU time:\n')
                    parts.append(markdown(['op', 'calls', 'self CPU ms'], rows))
    return '\n'.join(parts)


def git_head() -> Optional[str]:
    """The repository's commit (read only; None outside a git checkout)."""
    try:
        out = subprocess.run(
            ['git', 'rev-parse', '--short', 'HEAD'],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip()


def machine_info(device: str) -> dict:
    """CPU model, cores, library versions and the device's name."""
    cpu_model = platform.processor() or platform.machine()
    try:
        with open('/proc/cpuinfo') as f:
            models = [line.split(':', 1)[1].strip() for line in f if line.startswith('model name')]
        cpu_model = models[0] if models else cpu_model
    except OSError:
        pass
    info = dict(
        cpu_model=cpu_model,
        cpu_cores=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
        torch=torch.__version__,
        cuda=torch.version.cuda,
        mmcv=mmcv.__version__,
        mmdet=mmdet.__version__,
        python=platform.python_version(),
        platform=platform.platform(),
        device=device,
        device_name=cpu_model,
        compile_env=os.environ.get('MMDET_ANCHORLOSS_COMPILE', 'auto'),
    )
    if device == 'cuda':
        info['device_name'] = torch.cuda.get_device_name()
    return info


def oversubscription_warning(device: str, threads: Optional[int]) -> Optional[str]:
    """A warning when other work leaves fewer idle cores than a worker has threads.

    Threads of an OpenMP parallel region then wait on each other at every op; runs of many
    small ops (upstream's per-image loops) slow down many times over, which distorts the
    comparison. ``--threads 1`` keeps such runs comparable on a shared machine.
    """
    if device != 'cpu':
        return None
    threads = threads or torch.get_num_threads()
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if threads > 1 and load + threads > cores + 0.5:
        return (
            f'load average {load:.1f} on {cores} cores with {threads} threads per worker: '
            'timings will suffer from oversubscription (consider --threads 1; the load is '
            'recorded per case)'
        )
    return None


def source_versions(summaries: Sequence[dict]) -> List[str]:
    """The plugin sources' hashes the workers ran (more than one: they changed mid-run)."""
    return sorted(
        {
            s[side]['source']['sources_sha1']
            for s in summaries
            for side in SIDES
            if 'source' in s[side]
        }
    )


def render_markdown(report: dict) -> str:
    """The report's tables under a line that names the machine and the sources."""
    machine, settings, summaries = report['machine'], report['settings'], report['cases']
    cuda = f', CUDA {machine["cuda"]}' if machine['device'] == 'cuda' else ''
    head = (
        f'{machine["device_name"]}, {machine["cpu_cores"]} cores, torch {machine["torch"]}{cuda}, '
        f'load at end {report["loadavg_at_end"][0]:.1f}; plugin sources '
        f'{", ".join(source_versions(summaries))} (git {settings["git_head"]}, threads '
        f'{settings["threads"] or "default"})'
    )
    tables = (timing_table(summaries), summary_table(summaries), counts_table(summaries))
    return '\n\n'.join([head, *tables, profile_text(summaries)]).rstrip()
