"""Train a config and its upstream twin over N seeds, evaluate both, write a comparison report.

The twin of ``configs/x/name.py`` is ``configs/x/name_upstream.py`` (or ``--upstream-config``):
the same network with mmdet's own anchor-head parts. For each seed both sides train from the
same weights and data order, each in its own process; the sides alternate (A B, B A, ...) so
that machine load hits both. The report gives each metric as mean ± std per side, the paired
difference and a verdict ("within run-to-run spread" or "differs beyond the spread"; none with
one seed), where the two runs' losses part, and timings flagged when the machine was loaded.
The code lives in :mod:`mmdet_anchorloss.engine.compare` (runs), ``compare_stats`` (numbers
and the verdict rule) and ``compare_report`` (files).

Written to the work dir (default ``work_dirs/compare/<config name>/``): ``report.md``,
``report.json``, ``loss_curves.png``, and each run's training work dir under
``seed_<seed>/plugin/`` and ``seed_<seed>/upstream/``.

Example::

    python tools/compare_upstream.py configs/shapes/retinanet_r18_fpn_shapes.py
    python tools/compare_upstream.py configs/shapes/retinanet_r18_fpn_shapes.py --seeds 3
    python tools/compare_upstream.py CONFIG --max-iters 100 --cfg-options randomness.seed=1
"""

import argparse
import time

from mmdet_anchorloss.engine import compare
from mmdet_anchorloss.engine.compare_report import write_report


def parse_args(argv=None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(
        description='Train a config and its upstream twin over N seeds; compare losses, mAP, '
        'speed, memory.'
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
        '--seeds',
        type=int,
        default=1,
        help="train this many seeds per side: the config's randomness.seed and the next ones "
        '(default 1; 3 or more give a spread and a verdict)',
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
        help='do not train; rebuild the report from the runs already in the work dir',
    )
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error(f'--seeds must be at least 1, got {args.seeds}')
    return args


def main(argv=None) -> None:
    """Train every seed of both sides (unless --report-only) and write the report."""
    args = parse_args(argv)
    upstream = args.upstream_config or compare.upstream_twin(args.config)
    configs = dict(plugin=args.config, upstream=upstream)
    work_dir = args.work_dir or compare.default_work_dir(args.config)
    start = time.perf_counter()
    seeds = None  # --report-only: every seed in the work dir
    if not args.report_only:
        seeds = compare.config_seeds(args.config, args.cfg_options, args.seeds)
        compare.train_all(
            configs,
            work_dir,
            seeds,
            max_iters=args.max_iters,
            cfg_options=args.cfg_options,
            log=lambda line: print(line, flush=True),
        )
    print(write_report(configs, work_dir, compare.load_runs(work_dir, seeds)))
    print(f'\n[compare] total {time.perf_counter() - start:.0f} s; wrote')
    for name in ('report.md', 'report.json', 'loss_curves.png'):
        print(f'  {work_dir}/{name}')


if __name__ == '__main__':
    main()
