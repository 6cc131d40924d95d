"""Train a detector: mmdet's ``tools/train.py`` command line, on CPU or GPU.

Imports ``mmdet_anchorloss`` so that its types are registered even for configs without
``custom_imports``. Distributed runs use ``torchrun`` (``tools/dist_train.sh``); without CUDA
they run on the gloo backend (see :mod:`mmdet_anchorloss.engine.launch`).

Example::

    python tools/train.py configs/shapes/retinanet_r18_fpn_shapes.py
    bash tools/dist_train.sh configs/shapes/retinanet_r18_fpn_shapes.py 2
"""

import argparse
import logging
import os
import os.path as osp

from mmdet.utils import setup_cache_size_limit_of_dynamo
from mmengine.config import Config, DictAction
from mmengine.logging import print_log
from mmengine.registry import RUNNERS
from mmengine.runner import Runner

import mmdet_anchorloss  # noqa: F401  (registers the plugin types)
from mmdet_anchorloss.engine import register_safe_checkpoint_globals
from mmdet_anchorloss.engine.launch import (
    check_amp_available,
    fix_ssd_head_predict,
    setup_cpu_distributed,
)


def parse_args(argv=None) -> argparse.Namespace:
    """Parse mmdet's training command line."""
    parser = argparse.ArgumentParser(description='Train a detector')
    parser.add_argument('config', help='train config file path')
    parser.add_argument('--work-dir', help='the dir to save logs and models')
    parser.add_argument(
        '--amp',
        action='store_true',
        default=False,
        help='enable automatic-mixed-precision training (needs CUDA)',
    )
    parser.add_argument(
        '--auto-scale-lr', action='store_true', help='enable automatically scaling LR.'
    )
    parser.add_argument(
        '--resume',
        nargs='?',
        type=str,
        const='auto',
        help='If specify checkpoint path, resume from it, while if not specify, try to auto '
        'resume from the latest checkpoint in the work directory.',
    )
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
    # torch.distributed.launch passes --local-rank; torchrun sets LOCAL_RANK instead.
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = parser.parse_args(argv)
    if args.amp:
        try:
            check_amp_available()
        except RuntimeError as exc:
            parser.error(str(exc))
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    return args


def default_work_dir(config: str) -> str:
    """``./work_dirs/<config file name without extension>``, mmdet's default."""
    return osp.join('./work_dirs', osp.splitext(osp.basename(config))[0])


def enable_amp(cfg: Config) -> None:
    """Switch the optimizer wrapper to ``AmpOptimWrapper`` (mmdet's ``--amp``)."""
    optim_wrapper = cfg.optim_wrapper.type
    if optim_wrapper == 'AmpOptimWrapper':
        print_log(
            'AMP training is already enabled in your config.',
            logger='current',
            level=logging.WARNING,
        )
        return
    if optim_wrapper != 'OptimWrapper':
        raise ValueError(
            '`--amp` is only supported when the optimizer wrapper type is `OptimWrapper` '
            f'but got {optim_wrapper}.'
        )
    cfg.optim_wrapper.type = 'AmpOptimWrapper'
    cfg.optim_wrapper.loss_scale = 'dynamic'


def enable_auto_scale_lr(cfg: Config) -> None:
    """Turn on ``auto_scale_lr`` (mmdet's ``--auto-scale-lr``)."""
    scale = cfg.get('auto_scale_lr')
    if not scale or 'enable' not in scale or 'base_batch_size' not in scale:
        raise RuntimeError(
            'Can not find "auto_scale_lr" or "auto_scale_lr.enable" or '
            '"auto_scale_lr.base_batch_size" in your configuration file.'
        )
    cfg.auto_scale_lr.enable = True


def build_train_cfg(args: argparse.Namespace) -> Config:
    """Load the config and apply the command line to it, as mmdet's ``tools/train.py`` does.

    Also prepares CPU distributed mode when ``--launcher pytorch`` runs without CUDA.
    """
    cfg = Config.fromfile(args.config)
    cfg.launcher = args.launcher
    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)
    # work_dir is determined in this priority: CLI > segment in file > filename
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir', None) is None:
        cfg.work_dir = default_work_dir(args.config)
    if args.amp:
        enable_amp(cfg)
    if args.auto_scale_lr:
        enable_auto_scale_lr(cfg)
    # resume is determined in this priority: resume from > auto_resume
    if args.resume == 'auto':
        cfg.resume = True
        cfg.load_from = None
    elif args.resume is not None:
        cfg.resume = True
        cfg.load_from = args.resume
    setup_cpu_distributed(cfg, args.launcher)
    return cfg


def build_runner(cfg: Config) -> Runner:
    """The default Runner, or the one named by ``cfg.runner_type``."""
    if 'runner_type' not in cfg:
        return Runner.from_cfg(cfg)
    return RUNNERS.build(cfg)


def prepare_process() -> None:
    """Process-wide setup before a Runner is built (also used by compare_upstream.py)."""
    # Reduce the number of repeated compilations and improve training speed.
    setup_cache_size_limit_of_dynamo()
    # torch >= 2.6 loads with weights_only=True: allow-list what mmengine checkpoints hold.
    register_safe_checkpoint_globals()
    fix_ssd_head_predict()


def main(argv=None) -> None:
    """Train the detector described by the command line."""
    args = parse_args(argv)
    prepare_process()
    cfg = build_train_cfg(args)
    runner = build_runner(cfg)
    runner.train()


if __name__ == '__main__':
    main()
