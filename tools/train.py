"""Train a detector: mmdet's ``tools/train.py`` command line, on CPU or GPU.

Imports ``mmdet_anchorloss`` so that its types are registered even for configs without
``custom_imports``. Distributed runs use ``torchrun`` (``tools/dist_train.sh``); without CUDA
they run on the gloo backend (see :mod:`mmdet_anchorloss.engine.launch`). The config handling
lives in :mod:`mmdet_anchorloss.engine.runner`.

Example::

    python tools/train.py configs/shapes/retinanet_r18_fpn_shapes.py
    bash tools/dist_train.sh configs/shapes/retinanet_r18_fpn_shapes.py 2
"""

import argparse
import os

from mmengine.config import DictAction

import mmdet_anchorloss  # noqa: F401  (registers the plugin types)
from mmdet_anchorloss.engine.launch import check_amp_available
from mmdet_anchorloss.engine.runner import build_runner, build_train_cfg, prepare_process


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


def main(argv=None) -> None:
    """Train the detector described by the command line."""
    args = parse_args(argv)
    prepare_process()
    cfg = build_train_cfg(
        args.config,
        work_dir=args.work_dir,
        cfg_options=args.cfg_options,
        amp=args.amp,
        auto_scale_lr=args.auto_scale_lr,
        resume=args.resume,
        launcher=args.launcher,
    )
    runner = build_runner(cfg)
    runner.train()


if __name__ == '__main__':
    main()
