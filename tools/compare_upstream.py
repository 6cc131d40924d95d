"""Train a config and its upstream twin, evaluate both, and write a comparison report.

The twin of ``configs/x/name.py`` is ``configs/x/name_upstream.py`` (or ``--upstream-config``):
the same network with mmdet's own anchor-head parts. Each side trains in its own subprocess
(this script with ``--worker``), from the same config seed, so both see the same initial
weights and the same data order, and each has its own peak memory. A hook in the worker
records every iteration's losses and time, and times the anchor head's ``loss_by_feat``
(forward only; its backward is part of the iteration time).

Written to the work dir (default ``work_dirs/compare/<config name>/``): ``report.md``,
``report.json`` (keys ``plugin`` and ``upstream``), ``loss_curves.png``, and each side's
training work dir (logs, checkpoint) under ``plugin/`` and ``upstream/``.

Example::

    python tools/compare_upstream.py configs/shapes/retinanet_r18_fpn_shapes.py
    python tools/compare_upstream.py CONFIG --max-iters 100 --cfg-options randomness.seed=1
"""

import argparse
import importlib.util
import json
import os
import os.path as osp
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

SIDES = ('plugin', 'upstream')
TOOLS_DIR = Path(__file__).resolve().parent
RESULT_FILE = 'profile.json'
# Iterations left out of the timing averages (allocator and thread-pool warmup).
MAX_TIMING_WARMUP = 5
FINAL_LOSS_WINDOW = 10


def parse_args(argv=None) -> argparse.Namespace:
    """Parse the command line (the orchestrator's, or a worker's with ``--worker``)."""
    parser = argparse.ArgumentParser(
        description='Train a config and its upstream twin; compare losses, mAP, speed, memory.'
    )
    parser.add_argument('config', help='config using the mmdet_anchorloss parts')
    parser.add_argument(
        '--upstream-config',
        help='the upstream twin (default: the config file name with an "_upstream" suffix)',
    )
    parser.add_argument(
        '--work-dir', help='output directory (default: work_dirs/compare/<config name>)'
    )
    parser.add_argument(
        '--max-iters',
        type=int,
        help='train this many iterations (rescales val interval, checkpoint interval and the '
        'LR schedule); iteration-based configs only',
    )
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        default=[],
        help='key=value overrides applied to both configs, as in tools/train.py',
    )
    parser.add_argument(
        '--report-only',
        action='store_true',
        help='do not train; rebuild the report from the profiles already in the work dir',
    )
    parser.add_argument('--worker', choices=SIDES, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def upstream_twin(config: str) -> str:
    """``path/name.py`` -> ``path/name_upstream.py``; raises if that file does not exist."""
    root, ext = osp.splitext(config)
    twin = f'{root}_upstream{ext}'
    if not osp.isfile(twin):
        raise FileNotFoundError(
            f'No upstream twin for {config}: expected {twin}; pass --upstream-config.'
        )
    return twin


def default_work_dir(config: str) -> str:
    """``work_dirs/compare/<config file name without extension>``."""
    return osp.join('work_dirs', 'compare', osp.splitext(osp.basename(config))[0])


# --------------------------------------------------------------------------------------------
# Worker: one training run with the profiling hook.
# --------------------------------------------------------------------------------------------


def load_train_tool():
    """Import ``tools/train.py`` (not a package) to reuse its config handling."""
    spec = importlib.util.spec_from_file_location('_anchorloss_train_tool', TOOLS_DIR / 'train.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def set_max_iters(cfg, max_iters: int) -> None:
    """Shorten or lengthen an iteration-based schedule to ``max_iters`` in place.

    Sets ``train_cfg.max_iters``, ``train_cfg.val_interval`` (one evaluation, at the end) and
    the checkpoint interval. Iteration-based LR schedulers that ended at the old end now end
    at the new one, later ones are clipped to it, and one that would start at or after it is
    dropped; cosine ``T_max`` follows the new length.

    Raises:
        ValueError: for an epoch-based training loop.
    """
    train_cfg = cfg.train_cfg
    if 'max_iters' not in train_cfg:
        raise ValueError(
            '--max-iters needs an iteration-based train_cfg (IterBasedTrainLoop); '
            'use --cfg-options train_cfg.max_epochs=N instead.'
        )
    old_max_iters = train_cfg.max_iters
    train_cfg.max_iters = max_iters
    train_cfg.val_interval = max_iters
    checkpoint = cfg.get('default_hooks', {}).get('checkpoint')
    if checkpoint is not None:
        checkpoint.interval = max_iters
    schedulers = cfg.get('param_scheduler') or []
    if isinstance(schedulers, dict):
        schedulers = [schedulers]
    kept = []
    for sched in schedulers:
        if sched.get('by_epoch', True):
            kept.append(sched)
            continue
        begin, end = sched.get('begin', 0), sched.get('end', old_max_iters)
        if begin >= max_iters:
            continue
        if end >= old_max_iters or end > max_iters:
            sched.end = max_iters
            if 'T_max' in sched:
                sched.T_max = max_iters - begin
        kept.append(sched)
    cfg.param_scheduler = kept


def register_profile_hook():
    """Register and return the ``AnchorLossProfileHook`` class (worker side only)."""
    import torch
    from mmdet.registry import HOOKS
    from mmengine.hooks import Hook
    from mmengine.model import is_model_wrapper

    def sync() -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    @HOOKS.register_module(force=True)
    class AnchorLossProfileHook(Hook):
        """Record each iteration's losses and times, the anchor head's loss time, peak memory
        and the last evaluation's metrics; write them as JSON to ``out_file`` after the run.

        Args:
            out_file (str): where to write the profile.
        """

        # after_train_iter before any other hook (checkpoint saving, logging) runs.
        priority = 'HIGHEST'

        def __init__(self, out_file: str):
            self.out_file = out_file
            self.record = dict(losses=[], iter_time=[], wall_time=[], loss_time=[], metrics={})
            self._loss_time = 0.0
            self._head = None

        def before_train(self, runner) -> None:
            model = runner.model.module if is_model_wrapper(runner.model) else runner.model
            head = getattr(model, 'rpn_head', None) or model.bbox_head
            self._head = head
            original = head.loss_by_feat

            def timed_loss_by_feat(*args, **kwargs):
                sync()
                start = time.perf_counter()
                out = original(*args, **kwargs)
                sync()
                self._loss_time += time.perf_counter() - start
                return out

            head.loss_by_feat = timed_loss_by_feat
            self.record['head'] = type(head).__name__
            self.record['head_attr'] = (
                'rpn_head' if head is getattr(model, 'rpn_head', None) else 'bbox_head'
            )
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            self._train_start = self._last_end = time.perf_counter()

        def before_train_iter(self, runner, batch_idx, data_batch=None) -> None:
            sync()
            self._loss_time = 0.0
            self._iter_start = time.perf_counter()

        def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
            sync()
            end = time.perf_counter()
            self.record['iter_time'].append(end - self._iter_start)
            self.record['wall_time'].append(end - self._last_end)
            self.record['loss_time'].append(self._loss_time)
            self.record['losses'].append({k: float(v) for k, v in (outputs or {}).items()})
            self._last_end = end

        def after_train(self, runner) -> None:
            self.record['train_time_s'] = time.perf_counter() - self._train_start
            if torch.cuda.is_available():
                self.record['peak_mem_mb'] = torch.cuda.max_memory_allocated() / 2**20
                self.record['mem_kind'] = 'CUDA max allocated'
            else:
                rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                self.record['peak_mem_mb'] = rss_kb / 1024
                self.record['mem_kind'] = 'CPU peak RSS (main process)'
            if self._head is not None:
                del self._head.loss_by_feat  # back to the class method

        def after_val_epoch(self, runner, metrics=None) -> None:
            self.record['metrics'] = {k: float(v) for k, v in (metrics or {}).items()}

        def after_test_epoch(self, runner, metrics=None) -> None:
            self.after_val_epoch(runner, metrics)

        def after_run(self, runner) -> None:
            if runner.rank == 0:
                Path(self.out_file).write_text(json.dumps(self.record, indent=1))

    return AnchorLossProfileHook


def run_worker(args: argparse.Namespace) -> None:
    """Train ``args.config`` into ``args.work_dir`` with the profiling hook, then evaluate."""
    train_tool = load_train_tool()
    train_tool.prepare_process()
    train_argv = [args.config, '--work-dir', args.work_dir]
    if args.cfg_options:
        train_argv += ['--cfg-options', *args.cfg_options]
    cfg = train_tool.build_train_cfg(train_tool.parse_args(train_argv))
    if args.max_iters is not None:
        set_max_iters(cfg, args.max_iters)
    hook_cls = register_profile_hook()
    out_file = osp.join(args.work_dir, RESULT_FILE)
    hooks = list(cfg.get('custom_hooks', []))
    cfg.custom_hooks = hooks + [dict(type='AnchorLossProfileHook', out_file=out_file)]
    runner = train_tool.build_runner(cfg)
    runner.train()
    profile_hook = next(hook for hook in runner.hooks if isinstance(hook, hook_cls))
    if not profile_hook.record['metrics'] and cfg.get('test_dataloader') is not None:
        runner.test()  # no evaluation ran during training


# --------------------------------------------------------------------------------------------
# Orchestrator: run both sides, summarise, write the report.
# --------------------------------------------------------------------------------------------


def train_side(args: argparse.Namespace, side: str, config: str, work_dir: str) -> None:
    """Run one side's training in a subprocess (this script with ``--worker``)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), config, '--worker', side]
    cmd += ['--work-dir', work_dir]
    if args.max_iters is not None:
        cmd += ['--max-iters', str(args.max_iters)]
    if args.cfg_options:
        cmd += ['--cfg-options', *args.cfg_options]
    print(f'[compare] training {side}: {config} -> {work_dir}', flush=True)
    start = time.perf_counter()
    # unbuffered: the worker's log lines show up as they happen, also when piped to a file
    subprocess.run(cmd, check=True, env=dict(os.environ, PYTHONUNBUFFERED='1'))
    print(f'[compare] {side} done in {time.perf_counter() - start:.0f} s', flush=True)


def anchor_loss_keys(losses: Sequence[Dict[str, float]]) -> List[str]:
    """The anchor head's classification and regression loss names in a loss record."""
    keys = losses[0].keys() if losses else ()
    if 'loss_rpn_cls' in keys:
        return ['loss_rpn_cls', 'loss_rpn_bbox']
    return [k for k in ('loss_cls', 'loss_bbox') if k in keys]


def mean(values: Sequence[float]) -> Optional[float]:
    """Arithmetic mean, None for an empty sequence."""
    return sum(values) / len(values) if values else None


def summarise(record: dict) -> dict:
    """Turn a worker's per-iteration profile into the report's numbers."""
    losses = record['losses']
    n = len(losses)
    skip = min(MAX_TIMING_WARMUP, n // 4)
    iter_time = record['iter_time'][skip:]
    loss_time = record['loss_time'][skip:]
    tail = losses[-FINAL_LOSS_WINDOW:]
    metrics = record.get('metrics', {})
    summary = dict(
        head=record.get('head'),
        iters=n,
        first_iter_loss=losses[0].get('loss') if losses else None,
        first_iter_losses=losses[0] if losses else {},
        final_losses={k: mean([step[k] for step in tail]) for k in (tail[0] if tail else {})},
        bbox_mAP=metrics.get('coco/bbox_mAP'),
        bbox_mAP_50=metrics.get('coco/bbox_mAP_50'),
        bbox_mAP_75=metrics.get('coco/bbox_mAP_75'),
        metrics=metrics,
        sec_per_iter=mean(iter_time),
        sec_per_iter_with_data=mean(record['wall_time'][skip:]),
        loss_sec_per_iter=mean(loss_time),
        loss_share=sum(loss_time) / sum(iter_time) if iter_time and sum(iter_time) else None,
        peak_mem_mb=record.get('peak_mem_mb'),
        mem_kind=record.get('mem_kind'),
        train_time_s=record.get('train_time_s'),
        timing_skipped_iters=skip,
    )
    summary['final_loss'] = summary['final_losses'].get('loss')
    return summary


def relative_difference(a: Optional[float], b: Optional[float]) -> Optional[float]:
    """``|a - b| / |b|`` (None when either is missing, 0 when both are 0)."""
    if a is None or b is None:
        return None
    if b == 0:
        return 0.0 if a == 0 else float('inf')
    return abs(a - b) / abs(b)


def fmt(value, spec: str = '.4f') -> str:
    """Format a number for the table; '-' for None."""
    if value is None:
        return '-'
    if isinstance(value, str):
        return value
    return format(value, spec)


def table_rows(plugin: dict, upstream: dict) -> List[List[str]]:
    """Rows of the report table: name, plugin, upstream, comparison."""

    def ratio(a, b):
        return fmt(a / b, '.2f') + 'x' if a is not None and b else '-'

    def diff(a, b):
        return fmt(a - b, '+.4f') if a is not None and b is not None else '-'

    rows = [['head', plugin['head'], upstream['head'], '']]
    first_diff = relative_difference(plugin['first_iter_loss'], upstream['first_iter_loss'])
    rows.append(
        [
            'first-iteration loss',
            fmt(plugin['first_iter_loss'], '.6f'),
            fmt(upstream['first_iter_loss'], '.6f'),
            f'rel. diff {fmt(first_diff, ".2e")}',
        ]
    )
    for key in sorted(set(plugin['final_losses']) | set(upstream['final_losses'])):
        if 'loss' not in key:
            continue
        a, b = plugin['final_losses'].get(key), upstream['final_losses'].get(key)
        rows.append([f'final {key} (last {FINAL_LOSS_WINDOW} it)', fmt(a), fmt(b), diff(a, b)])
    metric_keys = ['bbox_mAP', 'bbox_mAP_50', 'bbox_mAP_75']
    has_other_metrics = plugin['metrics'] or upstream['metrics']
    if plugin['bbox_mAP'] is None and upstream['bbox_mAP'] is None and has_other_metrics:
        # e.g. an RPN-only config: show its metrics (AR) instead
        metric_keys = []
        for key in sorted(set(plugin['metrics']) | set(upstream['metrics'])):
            rows.append([key, fmt(plugin['metrics'].get(key)), fmt(upstream['metrics'].get(key))])
            rows[-1].append(diff(plugin['metrics'].get(key), upstream['metrics'].get(key)))
    for key in metric_keys:
        rows.append([key, fmt(plugin[key], '.3f'), fmt(upstream[key], '.3f')])
        rows[-1].append(diff(plugin[key], upstream[key]))
    for key, name, spec in (
        ('sec_per_iter', 'seconds / iteration (fwd+bwd+step)', '.3f'),
        ('sec_per_iter_with_data', 'seconds / iteration (with data wait)', '.3f'),
        ('loss_sec_per_iter', 'loss_by_feat forward, s / iteration', '.4f'),
        ('peak_mem_mb', f'peak memory, MiB ({plugin["mem_kind"]})', '.0f'),
        ('train_time_s', 'training wall time, s', '.0f'),
    ):
        rows.append([name, fmt(plugin[key], spec), fmt(upstream[key], spec)])
        rows[-1].append(ratio(plugin[key], upstream[key]))
    share = [
        fmt(s * 100 if s is not None else None, '.1f') + ' %'
        for s in (plugin['loss_share'], upstream['loss_share'])
    ]
    rows.append(['share of the iteration in loss_by_feat', *share, ''])
    return rows


def markdown_table(rows: List[List[str]]) -> str:
    """A GitHub markdown table with a header row."""
    lines = ['| | plugin | upstream | plugin vs upstream |', '|---|---:|---:|---:|']
    lines += ['| ' + ' | '.join(str(cell) for cell in row) + ' |' for row in rows]
    return '\n'.join(lines)


def smoothing_window(n: int) -> int:
    """Moving-average window for a curve of ``n`` points: about 1/50 of it."""
    return max(1, n // 50)


def moving_average(values: Sequence[float]) -> List[float]:
    """Trailing moving average over :func:`smoothing_window` points."""
    window = smoothing_window(len(values))
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_curves(records: Dict[str, dict], out_file: str) -> None:
    """Overlay both sides' anchor-head loss curves (one panel per loss) into a PNG."""
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    keys = anchor_loss_keys(records['plugin']['losses']) + ['loss']
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.6))
    for ax, key in zip(axes, keys):
        for side, style, colour in zip(SIDES, ('-', '--'), ('C0', 'C1')):
            values = [step.get(key) for step in records[side]['losses']]
            steps = range(1, len(values) + 1)
            ax.plot(steps, values, '-', lw=0.5, alpha=0.25, color=colour)
            ax.plot(steps, moving_average(values), style, lw=1.2, color=colour, label=side)
        ax.set_title(f'{key} (moving average over {smoothing_window(len(steps))} it)')
        ax.set_xlabel('iteration')
        ax.set_yscale('log')
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out_file, dpi=100)
    plt.close(fig)


def write_report(args, configs: Dict[str, str], work_dir: str) -> str:
    """Read both profiles, write report.md / report.json / loss_curves.png; return the table."""
    records = {}
    for side in SIDES:
        path = osp.join(work_dir, side, RESULT_FILE)
        with open(path) as f:
            records[side] = json.load(f)
    summary = {side: summarise(records[side]) for side in SIDES}
    for side in SIDES:
        summary[side]['config'] = configs[side]
    summary['first_iter_loss_rel_diff'] = relative_difference(
        summary['plugin']['first_iter_loss'], summary['upstream']['first_iter_loss']
    )
    Path(work_dir, 'report.json').write_text(json.dumps(summary, indent=2))
    table = markdown_table(table_rows(summary['plugin'], summary['upstream']))
    iters = summary['plugin']['iters']
    text = [
        f'# {osp.basename(configs["plugin"])} vs its upstream twin',
        '',
        f'- plugin: `{configs["plugin"]}`',
        f'- upstream: `{configs["upstream"]}`',
        f'- {iters} iterations each, same seed and data order; '
        f'timings leave out the first {summary["plugin"]["timing_skipped_iters"]} iterations.',
        '',
        table,
        '',
        '![loss curves](loss_curves.png)',
        '',
    ]
    Path(work_dir, 'report.md').write_text('\n'.join(text))
    plot_curves(records, osp.join(work_dir, 'loss_curves.png'))
    return table


def main(argv=None) -> None:
    """Train both sides (unless --report-only) and write the report."""
    args = parse_args(argv)
    if args.worker:
        run_worker(args)
        return
    configs = dict(plugin=args.config, upstream=args.upstream_config or upstream_twin(args.config))
    work_dir = args.work_dir or default_work_dir(args.config)
    start = time.perf_counter()
    if not args.report_only:
        for side in SIDES:
            train_side(args, side, configs[side], osp.join(work_dir, side))
    table = write_report(args, configs, work_dir)
    print(table)
    print(f'\n[compare] total {time.perf_counter() - start:.0f} s; wrote')
    for name in ('report.md', 'report.json', 'loss_curves.png'):
        print(f'  {osp.join(work_dir, name)}')


if __name__ == '__main__':
    main()
