"""Train a config and its upstream twin over several seeds, alternately; collect the runs.

The library side of ``tools/compare_upstream.py``. Each run (one side, one seed) trains in its
own process (:mod:`.compare_worker`), so each has its own peak memory and compile state. The
sides alternate seed by seed, plugin first on even seeds and upstream first on odd ones
(A B, B A, A B, ...), so that a change of machine load hits both. While a run trains, the
1-minute load average is sampled every few seconds.

Work dir layout: ``seed_<seed>/<side>/`` holds each run's training work dir, its
``profile.json`` (from the worker) and ``launch.json`` (order, load samples, wall time, from
here); :mod:`.compare_report` turns them into ``report.md``, ``report.json`` and
``loss_curves.png``.
"""

import argparse
import json
import os
import os.path as osp
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from .compare_stats import SIDES

PROFILE_FILE = 'profile.json'  # written by compare_worker
LAUNCH_FILE = 'launch.json'
LOAD_SAMPLE_INTERVAL_S = 5.0


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


def run_dir(work_dir: str, seed: int, side: str) -> str:
    """Where one run's files go: ``<work_dir>/seed_<seed>/<side>``."""
    return osp.join(work_dir, f'seed_{seed}', side)


def config_seeds(config: str, cfg_options: Sequence[str], num_seeds: int) -> List[int]:
    """``num_seeds`` consecutive seeds from the config's ``randomness.seed`` (after
    ``cfg_options``; 0 when unset), so that the first run is the config's own."""
    from mmengine.config import Config, DictAction

    cfg = Config.fromfile(config, import_custom_modules=False)
    if cfg_options:
        parser = argparse.ArgumentParser()
        parser.add_argument('--options', nargs='+', action=DictAction)
        cfg.merge_from_dict(parser.parse_args(['--options', *cfg_options]).options)
    first = (cfg.get('randomness') or {}).get('seed')
    first = 0 if first is None else int(first)
    return [first + i for i in range(num_seeds)]


def run_order(seeds: Sequence[int]) -> List[Tuple[int, str]]:
    """(seed, side) in training order: A B, B A, A B, ... (plugin first on even positions)."""
    order = []
    for i, seed in enumerate(seeds):
        sides = SIDES if i % 2 == 0 else SIDES[::-1]
        order += [(seed, side) for side in sides]
    return order


def run_sampling_load(
    cmd: Sequence[str], env: dict, interval: float = LOAD_SAMPLE_INTERVAL_S
) -> List[float]:
    """Run ``cmd`` to the end, sampling ``os.getloadavg()[0]`` every ``interval`` seconds.

    Raises:
        subprocess.CalledProcessError: when the command fails.
    """
    samples = []
    with subprocess.Popen(cmd, env=env) as proc:
        while True:
            try:
                proc.wait(timeout=interval)
                break
            except subprocess.TimeoutExpired:
                samples.append(os.getloadavg()[0])
    if proc.returncode != 0:
        raise subprocess.CalledProcessError(proc.returncode, cmd)
    return samples


def train_side(
    config: str,
    work_dir: str,
    *,
    side: str,
    seed: int,
    order: int,
    max_iters: Optional[int] = None,
    cfg_options: Sequence[str] = (),
) -> dict:
    """Train one side with one seed in a worker process; write and return its launch record."""
    cmd = [sys.executable, '-m', 'mmdet_anchorloss.engine.compare_worker', config]
    cmd += ['--work-dir', work_dir, '--side', side, '--seed', str(seed)]
    if max_iters is not None:
        cmd += ['--max-iters', str(max_iters)]
    if cfg_options:
        cmd += ['--cfg-options', *cfg_options]
    # unbuffered: the worker's log lines show up as they happen, also when piped to a file
    env = dict(os.environ, PYTHONUNBUFFERED='1')
    start = time.perf_counter()
    samples = run_sampling_load(cmd, env)
    launch = dict(
        side=side,
        seed=seed,
        order=order,
        wall_s=time.perf_counter() - start,
        load_samples=samples,
        load_sample_interval_s=LOAD_SAMPLE_INTERVAL_S,
        cores=os.cpu_count(),
        omp_num_threads=os.environ.get('OMP_NUM_THREADS'),
    )
    Path(work_dir, LAUNCH_FILE).write_text(json.dumps(launch, indent=1))
    return launch


def train_all(
    configs: Dict[str, str],
    work_dir: str,
    seeds: Sequence[int],
    *,
    max_iters: Optional[int] = None,
    cfg_options: Sequence[str] = (),
    log: Callable[[str], None] = print,
) -> None:
    """Train every (seed, side) of :func:`run_order` into :func:`run_dir`."""
    order = run_order(seeds)
    for position, (seed, side) in enumerate(order):
        out = run_dir(work_dir, seed, side)
        log(f'[compare] run {position + 1}/{len(order)}: {side}, seed {seed} -> {out}')
        launch = train_side(
            configs[side],
            out,
            side=side,
            seed=seed,
            order=position,
            max_iters=max_iters,
            cfg_options=cfg_options,
        )
        load = max(launch['load_samples'], default=float('nan'))
        log(f'[compare] {side}, seed {seed}: {launch["wall_s"]:.0f} s, max load {load:.1f}')


def load_runs(work_dir: str, seeds: Optional[Sequence[int]] = None) -> List[dict]:
    """Read the runs of ``seeds`` (default: every complete seed in ``work_dir``) back: the
    input of :func:`.compare_stats.compare_runs`.

    Raises:
        FileNotFoundError: when the work dir holds no complete seed (both sides' profiles).
    """
    runs = []
    seed_dirs = sorted(Path(work_dir).glob('seed_*'), key=lambda p: int(p.name.split('_')[1]))
    if seeds is not None:
        seed_dirs = [p for p in seed_dirs if int(p.name.split('_')[1]) in set(seeds)]
    for seed_dir in seed_dirs:
        profiles = [seed_dir / side / PROFILE_FILE for side in SIDES]
        if not all(p.is_file() for p in profiles):
            continue
        run = dict(seed=int(seed_dir.name.split('_')[1]), launch={})
        for side, profile in zip(SIDES, profiles):
            run[side] = json.loads(profile.read_text())
            launch = seed_dir / side / LAUNCH_FILE
            if launch.is_file():
                run['launch'][side] = json.loads(launch.read_text())
        runs.append(run)
    if not runs:
        raise FileNotFoundError(f'No seed_*/{{plugin,upstream}}/{PROFILE_FILE} in {work_dir}')
    return runs
