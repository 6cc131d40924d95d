"""One side of ``tools/compare_upstream.py``: train a config with the profiling hook, evaluate.

Run by :func:`mmdet_anchorloss.engine.compare.train_side` in its own process, so each side
has its own peak memory and compile state::

    python -m mmdet_anchorloss.engine.compare_worker CONFIG --work-dir DIR --side plugin \\
        --seed 0 [--max-iters N] [--cfg-options key=value ...]

It writes ``DIR/profile.json`` (see :class:`.profile_hook.AnchorLossProfileHook`).
"""

import argparse
import os.path as osp
from typing import Optional, Sequence

from mmengine.config import Config, DictAction

from .compare import PROFILE_FILE
from .profile_hook import AnchorLossProfileHook
from .runner import build_runner, build_train_cfg, prepare_process


def set_max_iters(cfg: Config, max_iters: int) -> None:
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


def build_profiled_cfg(
    config: str,
    work_dir: str,
    *,
    side: str,
    seed: int,
    max_iters: Optional[int] = None,
    cfg_options: Optional[dict] = None,
) -> Config:
    """The training config of one side: ``seed``, ``max_iters`` and the profiling hook set."""
    cfg = build_train_cfg(config, work_dir=work_dir, cfg_options=cfg_options)
    cfg.randomness = dict(cfg.get('randomness') or {}, seed=seed)
    if max_iters is not None:
        set_max_iters(cfg, max_iters)
    hook = dict(
        type='AnchorLossProfileHook',
        out_file=osp.join(work_dir, PROFILE_FILE),
        extra=dict(side=side, seed=seed, config=config),
    )
    cfg.custom_hooks = list(cfg.get('custom_hooks', [])) + [hook]
    return cfg


def train_profiled(cfg: Config) -> None:
    """Train; evaluate on the test set afterwards when no validation ran during training."""
    runner = build_runner(cfg)
    runner.train()
    hook = next(h for h in runner.hooks if isinstance(h, AnchorLossProfileHook))
    if not hook.record['metrics'] and cfg.get('test_dataloader') is not None:
        runner.test()


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Parse the worker command line (see the module docstring) and run one side."""
    parser = argparse.ArgumentParser(description='One side of tools/compare_upstream.py')
    parser.add_argument('config')
    parser.add_argument('--work-dir', required=True)
    parser.add_argument('--side', required=True)
    parser.add_argument('--seed', type=int, required=True)
    parser.add_argument('--max-iters', type=int)
    parser.add_argument('--cfg-options', nargs='+', action=DictAction)
    args = parser.parse_args(argv)
    prepare_process()
    cfg = build_profiled_cfg(
        args.config,
        args.work_dir,
        side=args.side,
        seed=args.seed,
        max_iters=args.max_iters,
        cfg_options=args.cfg_options,
    )
    train_profiled(cfg)


if __name__ == '__main__':
    main()
