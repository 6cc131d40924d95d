"""Test (and evaluate) a detector: mmdet's ``tools/test.py`` command line, on CPU or GPU.

Imports ``mmdet_anchorloss`` so that its types are registered even for configs without
``custom_imports``; ``--launcher pytorch`` without CUDA runs on gloo (see
:mod:`mmdet_anchorloss.engine.launch`).

Example::

    python tools/test.py configs/shapes/retinanet_r18_fpn_shapes.py \\
        work_dirs/retinanet_r18_fpn_shapes/iter_600.pth
"""

import argparse
import os

from mmdet.engine.hooks.utils import trigger_visualization_hook
from mmdet.evaluation import DumpDetResults
from mmengine.config import Config, DictAction

import mmdet_anchorloss  # noqa: F401  (registers the plugin types)
from mmdet_anchorloss.engine.launch import setup_cpu_distributed
from mmdet_anchorloss.engine.runner import build_runner, default_work_dir, prepare_process


def parse_args(argv=None) -> argparse.Namespace:
    """Parse mmdet's test command line."""
    parser = argparse.ArgumentParser(description='MMDet test (and eval) a model')
    parser.add_argument('config', help='test config file path')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument(
        '--work-dir', help='the directory to save the file containing evaluation metrics'
    )
    parser.add_argument(
        '--out', type=str, help='dump predictions to a pickle file for offline evaluation'
    )
    parser.add_argument('--show', action='store_true', help='show prediction results')
    parser.add_argument(
        '--show-dir',
        help='directory where painted images will be saved. If specified, it will be '
        'automatically saved to the work_dir/timestamp/show_dir',
    )
    parser.add_argument('--wait-time', type=float, default=2, help='the interval of show (s)')
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        action=DictAction,
        help='override some settings in the used config, the key-value pair in xxx=yyy format '
        'will be merged into config file. If the value to be overwritten is a list, it should '
        'be like key="[a,b]" or key=a,b It also allows nested list/tuple values, e.g. '
        'key="[(a,b),(c,d)]" Note that the quotation marks are necessary and that no white '
        'space is allowed.',
    )
    parser.add_argument(
        '--launcher',
        choices=['none', 'pytorch', 'slurm', 'mpi'],
        default='none',
        help='job launcher',
    )
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = parser.parse_args(argv)
    if args.out is not None and not args.out.endswith(('.pkl', '.pickle')):
        parser.error(f'--out must be a .pkl or .pickle file, got {args.out}')
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    return args


def build_test_cfg(args: argparse.Namespace) -> Config:
    """Load the config and apply the command line to it, as mmdet's ``tools/test.py`` does."""
    cfg = Config.fromfile(args.config)
    cfg.launcher = args.launcher
    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)
    # work_dir is determined in this priority: CLI > segment in file > filename
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir', None) is None:
        cfg.work_dir = default_work_dir(args.config)
    cfg.load_from = args.checkpoint
    if args.show or args.show_dir:
        cfg = trigger_visualization_hook(cfg, args)
    setup_cpu_distributed(cfg, args.launcher)
    return cfg


def main(argv=None) -> dict:
    """Test the checkpoint; returns the metrics dict (``coco/bbox_mAP``, ...)."""
    args = parse_args(argv)
    prepare_process()
    cfg = build_test_cfg(args)
    runner = build_runner(cfg)
    if args.out is not None:
        # a dummy metric that dumps the predictions, as mmdet does
        runner.test_evaluator.metrics.append(DumpDetResults(out_file_path=args.out))
    return runner.test()


if __name__ == '__main__':
    main()
