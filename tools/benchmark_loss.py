"""Benchmark the anchor-head loss: mmdet's heads against their mmdet_anchorloss twins.

For each case (``mmdet_anchorloss.benchmark.cases``), the upstream head and its plugin
twin are built from the same shipped mmdet config and fed the same random inputs at the
real feature-map sizes. Each side runs in its own process, one at a time, importing the
live package (each record carries a hash of the sources it ran; a warning says if they
changed during the run). Per side, the median of ``--repeats`` after ``--warmup`` calls:

- time of ``assign`` (target assignment alone), ``fwd`` (``loss_by_feat``, assignment
  included), ``bwd`` and ``fwd+bwd``; the first call of the process on its own (it holds
  the plugin's ``torch.compile``);
- peak memory above the inputs (CUDA ``max_memory_allocated``; CPU peak resident set);
- "passes": fwd+bwd over one elementwise pass (``sigmoid``) over all cls logits;
- aten ops, launches (non-view ops) and ops that force a host sync on CUDA, for one
  fwd+bwd (``mmdet_anchorloss.profiling.count_ops``; also on CPU);
- on CUDA, from ``torch.profiler`` for one fwd+bwd: kernels, ``cudaStreamSynchronize``
  calls, and the GPU time of the classification loss's kernels (matched by name:
  ``measure.CLS_KERNEL_PATTERN``).

The two sides' losses must agree per key and per level (rtol 1e-4; 1e-2 for fp16 cases),
except in a case whose plugin side draws its own samples (``rpn-b8-g10-device-sampler``).
A side that cannot run a case records its error; the run goes on and exits non-zero at
the end. On a shared CPU give ``--threads 1``. Writes ``--out`` (JSON, with the machine)
and the tables in markdown beside it (``.md``); each worker's output goes to ``logs/``.

Example::

    python tools/benchmark_loss.py --device cpu --out work_dirs/bench/benchmark.json
    python tools/benchmark_loss.py --threads 1 --cases retina-b8-g10 --repeats 5 --profile
    python tools/benchmark_loss.py --quick --cases retina-b2-g10 --repeats 1
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

from tqdm import tqdm

from mmdet_anchorloss.benchmark import report as rep
from mmdet_anchorloss.benchmark import worker
from mmdet_anchorloss.benchmark.cases import CASES, CPU_DEFAULT_CASES, SIDES, default_cases
from mmdet_anchorloss.benchmark.measure import PROFILE_ROWS, WorkerOptions


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description='Time and measure the anchor-head loss, upstream mmdet vs mmdet_anchorloss.'
    )
    parser.add_argument(
        '--cases',
        nargs='+',
        choices=sorted(CASES),
        metavar='CASE',
        help=f'cases to run: {", ".join(CASES)} (default: all on cuda; on cpu '
        f'{", ".join(CPU_DEFAULT_CASES)})',
    )
    parser.add_argument('--device', default='cpu', choices=['cpu', 'cuda'])
    parser.add_argument('--repeats', type=int, default=3, help='timed repeats (median)')
    parser.add_argument(
        '--warmup',
        type=int,
        default=1,
        help='untimed calls before the repeats (at least 1; the first holds torch.compile)',
    )
    parser.add_argument('--out', default='work_dirs/bench/benchmark.json', help='JSON output')
    parser.add_argument('--quick', action='store_true', help='smaller inputs (tests, smoke)')
    parser.add_argument('--seed', type=int, default=0, help='seed of the random inputs')
    parser.add_argument(
        '--profile',
        action='store_true',
        help=f'profile one more fwd+bwd per side with torch.profiler; print the top '
        f'{PROFILE_ROWS} ops by self time',
    )
    parser.add_argument(
        '--threads', type=int, help="torch threads per worker (default: torch's default)"
    )
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup < 1:
        parser.error('--repeats and --warmup must be at least 1')
    args.cases = args.cases or default_cases(args.device)
    return args


def run_cases(args: argparse.Namespace, log_dir: Path) -> list:
    """Both sides of every case, one worker at a time, with a progress bar."""
    env, summaries = worker.environment(args.threads), []
    bar = tqdm(total=2 * len(args.cases), unit='side', desc='benchmark', dynamic_ncols=True)
    for name in args.cases:
        load, records = os.getloadavg(), {}
        for side in SIDES:
            bar.set_postfix_str(f'{name} {side}')
            opts = WorkerOptions(
                case=name,
                side=side,
                device=args.device,
                repeats=args.repeats,
                warmup=args.warmup,
                seed=args.seed,
                quick=args.quick,
                threads=args.threads,
                profile=args.profile,
            )
            records[side] = worker.run_side(opts, log_dir / f'{name}-{side}.log', env)
            if 'error' in records[side]:
                tqdm.write(f'[benchmark] {name} {side}: {records[side]["error"]}')
            bar.update()
        summary = rep.summarise_case(CASES[name], args.quick, records, load)
        if 'speedup' in summary:
            up, pl = (records[s]['median']['fwd_bwd'] for s in SIDES)
            tqdm.write(
                f'[benchmark] {name}: fwd+bwd {up:.3f} s -> {pl:.3f} s '
                f'({summary["speedup"]["fwd_bwd"]:.1f}x), loss max rel diff '
                f'{summary["loss_check"]["max_rel_diff"]:.1e}'
            )
        summaries.append(summary)
    bar.close()
    return summaries


def main(argv=None) -> None:
    args = parse_args(argv)
    out = Path(args.out)
    log_dir = out.parent / 'logs'
    log_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    warning = rep.oversubscription_warning(args.device, args.threads)
    if warning:
        print(f'[benchmark] WARNING: {warning}', flush=True)
    summaries = run_cases(args, log_dir)
    versions = rep.source_versions(summaries)
    report = dict(
        machine=rep.machine_info(args.device),
        settings=dict(
            repeats=args.repeats,
            warmup=args.warmup,
            quick=args.quick,
            seed=args.seed,
            threads=args.threads,
            git_head=rep.git_head(),
            loss_rtol=rep.LOSS_RTOL,
            timing='median of repeats after warm-up; fwd includes assignment',
        ),
        loadavg_at_end=os.getloadavg(),
        total_wall_s=time.perf_counter() - start,
        plugin_sources_changed_during_run=len(versions) > 1,
        cases=summaries,
    )
    out.write_text(json.dumps(report, indent=1))
    text = rep.render_markdown(report)
    out.with_suffix('.md').write_text(f'# Anchor-head loss benchmark\n\n{text}\n')
    print(f'\n{text}\n\nwrote {out} and {out.with_suffix(".md")}')
    if report['plugin_sources_changed_during_run']:
        print(f'[benchmark] WARNING: the plugin sources changed during the run: {versions}')
    failed = [f'{s["case"]} {side}' for s in summaries for side in SIDES if 'error' in s[side]]
    if failed:
        sys.exit(f'[benchmark] could not run: {", ".join(failed)} (logs in {log_dir})')
    if any(s['loss_check']['agree'] is False for s in summaries):
        sys.exit('[benchmark] the losses of the two sides disagree (see the table)')


if __name__ == '__main__':
    main()
