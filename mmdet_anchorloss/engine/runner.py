"""Build a training config and Runner as mmdet's ``tools/train.py`` does.

Shared by ``tools/train.py`` (the command line) and :mod:`.compare_worker` (one side of
``tools/compare_upstream.py``), so both apply a config and its overrides the same way.
"""

import logging
import os.path as osp
from typing import Optional

import torch
from mmengine.config import Config
from mmengine.logging import print_log
from mmengine.runner import Runner

from .checkpoint import register_safe_checkpoint_globals
from .env_info import check_mmcv_ops
from .launch import fix_ssd_head_predict, setup_cpu_distributed

__all__ = ['build_runner', 'build_train_cfg', 'default_work_dir', 'prepare_process']


def prepare_process() -> None:
    """Process-wide setup before a Runner is built (training and testing)."""
    from mmdet.utils import setup_cache_size_limit_of_dynamo

    # Reduce the number of repeated compilations and improve training speed.
    setup_cache_size_limit_of_dynamo()
    # torch >= 2.6 loads with weights_only=True: allow-list what mmengine checkpoints hold.
    register_safe_checkpoint_globals()
    fix_ssd_head_predict()


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


def build_train_cfg(
    config: str,
    *,
    work_dir: Optional[str] = None,
    cfg_options: Optional[dict] = None,
    amp: bool = False,
    auto_scale_lr: bool = False,
    resume: Optional[str] = None,
    launcher: str = 'none',
) -> Config:
    """Load ``config`` and apply the training command line to it, as mmdet's tools/train.py.

    Args:
        config: the config file.
        work_dir: output directory; default: the config's own, else :func:`default_work_dir`.
        cfg_options: ``--cfg-options`` as parsed by mmengine's ``DictAction``.
        amp: ``--amp``. auto_scale_lr: ``--auto-scale-lr``.
        resume: ``--resume``: ``'auto'`` (latest checkpoint in the work dir), a checkpoint
            path, or None.
        launcher: ``--launcher``; ``'pytorch'`` without CUDA prepares the gloo backend.
    """
    cfg = Config.fromfile(config)
    cfg.launcher = launcher
    if cfg_options is not None:
        cfg.merge_from_dict(cfg_options)
    # work_dir is determined in this priority: CLI > segment in file > filename
    if work_dir is not None:
        cfg.work_dir = work_dir
    elif cfg.get('work_dir', None) is None:
        cfg.work_dir = default_work_dir(config)
    if amp:
        enable_amp(cfg)
    if auto_scale_lr:
        enable_auto_scale_lr(cfg)
    # resume is determined in this priority: resume from > auto_resume
    if resume == 'auto':
        cfg.resume = True
        cfg.load_from = None
    elif resume is not None:
        cfg.resume = True
        cfg.load_from = resume
    setup_cpu_distributed(cfg, launcher)
    return cfg


def build_runner(cfg: Config) -> Runner:
    """The default Runner, or the one named by ``cfg.runner_type``.

    On a GPU, first checks that mmcv's compiled ops run there (``env_info.check_mmcv_ops``):
    an mmcv built without CUDA ops fails with a message that names the fix instead of
    mmcv's own error at the first op.
    """
    from mmdet.registry import RUNNERS  # mmdet's child registry also finds mmengine's runners

    if torch.cuda.is_available():
        check_mmcv_ops('cuda')

    if 'runner_type' not in cfg:
        return Runner.from_cfg(cfg)
    return RUNNERS.build(cfg)
