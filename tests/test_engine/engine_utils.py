"""Helpers of the engine tests: a tiny shapes dataset and short training runs.

The runs go through ``tools/train.py`` (or ``tools/dist_train.sh``) in a subprocess, as a
user would start them, on 64x64 images, two images per batch, no validation, a log line and
a scalars.json record every iteration, with the eager focal-loss kernels
(``MMDET_ANCHORLOSS_COMPILE=0``). ``ANCHORLOSS_TEST_CONFIG`` picks another config.
"""

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import pytest

ROOT = Path(__file__).resolve().parents[2]
CONFIG = os.environ.get(
    'ANCHORLOSS_TEST_CONFIG', str(ROOT / 'configs' / 'shapes' / 'retinanet_r18_fpn_shapes.py')
)
IMG_SIZE = 64


def make_shapes(out: Path, num_train: int = 8, num_val: int = 2, seed: int = 0) -> Path:
    """Write a small shapes dataset with ``tools/make_shapes_dataset.py``; returns ``out``."""
    cmd = [sys.executable, str(ROOT / 'tools' / 'make_shapes_dataset.py'), '--out', str(out)]
    cmd += ['--num-train', str(num_train), '--num-val', str(num_val), '--seed', str(seed)]
    cmd += ['--img-size', str(IMG_SIZE)]
    subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT)
    return out


def tiny_run_options(
    data_root: Path, max_iters: int, ckpt_interval: int, shuffle: bool = True
) -> List[str]:
    """``--cfg-options`` for a short, deterministic CPU run on ``data_root``."""
    return [
        f'train_dataloader.dataset.data_root={data_root}/',
        'train_dataloader.batch_size=2',
        'train_dataloader.num_workers=0',
        'train_dataloader.persistent_workers=False',
        f'train_dataloader.sampler.shuffle={shuffle}',
        # pipeline[2] is the Resize of configs/shapes/_base_/shapes_detection.py
        f'train_dataloader.dataset.pipeline.2.scale=({IMG_SIZE},{IMG_SIZE})',
        f'train_cfg.max_iters={max_iters}',
        'train_cfg.val_interval=100000',
        'val_cfg=None',
        'val_dataloader=None',
        'val_evaluator=None',
        'default_hooks.logger.interval=1',
        'log_processor.window_size=1',
        f'default_hooks.checkpoint.interval={ckpt_interval}',
        'default_hooks.checkpoint.max_keep_ckpts=100',
        'randomness.seed=0',
        'randomness.deterministic=True',
    ]


def run_train(
    work_dir: Path,
    options: Sequence[str],
    *extra_args: str,
    config: str = CONFIG,
    nproc: int = 1,
    check: bool = True,
    timeout: float = 300,
    env: Optional[Dict[str, str]] = None,
) -> subprocess.CompletedProcess:
    """Run ``tools/train.py`` (``nproc`` > 1: ``tools/dist_train.sh``) and return the result.

    Args:
        work_dir (Path): ``--work-dir``.
        options (Sequence[str]): ``--cfg-options`` items.
        *extra_args (str): more command line arguments (``--resume``, ...), before the
            options.
        config (str): the config file. Defaults to :data:`CONFIG`.
        nproc (int): processes; more than 1 runs ``tools/dist_train.sh`` (torchrun, gloo).
        check (bool): fail the test, showing the output's tail, when the run fails.
        timeout (float): seconds before the run is killed.
        env (dict, optional): extra environment variables.
    """
    if nproc > 1:
        cmd = ['bash', str(ROOT / 'tools' / 'dist_train.sh'), config, str(nproc)]
    else:
        cmd = [sys.executable, str(ROOT / 'tools' / 'train.py'), config]
    cmd += ['--work-dir', str(work_dir), *extra_args, '--cfg-options', *options]
    full_env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS='1')
    # eager focal-loss kernels: these runs test the engine, and a first torch.compile costs
    # more than the whole run on 2 cores
    full_env.setdefault('MMDET_ANCHORLOSS_COMPILE', '0')
    full_env.update(env or {})
    result = subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=full_env
    )
    if check and result.returncode != 0:
        pytest.fail(
            f'training failed (exit {result.returncode}): {" ".join(cmd)}\n'
            f'--- stdout tail ---\n{result.stdout[-3000:]}\n--- stderr tail ---\n'
            f'{result.stderr[-6000:]}'
        )
    return result


def read_scalars(work_dir: Path) -> Dict[int, dict]:
    """The training records of the newest run's ``vis_data/scalars.json``, by iteration."""
    files = sorted(work_dir.glob('*/vis_data/scalars.json'))
    assert files, f'no scalars.json under {work_dir}'
    records = [json.loads(line) for line in files[-1].read_text().splitlines() if line.strip()]
    return {rec['iter']: rec for rec in records if 'loss' in rec}
