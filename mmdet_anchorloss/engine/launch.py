"""Launch-time setup for ``tools/train.py`` and ``tools/test.py``.

Distributed training and testing on machines without CUDA:
mmengine 0.10.7's ``launcher='pytorch'`` calls ``torch.cuda.set_device`` unconditionally
(which fails on a CPU-only torch) and wraps the model in DDP with ``device_ids=[local_rank]``
(which DDP rejects for CPU modules). :func:`setup_cpu_distributed` prepares a config so that
the same command line works there: it initialises the ``gloo`` process group itself from the
``torchrun`` environment before the Runner is built (the Runner then skips its own
``init_dist``), and asks for a DDP wrapper without device ids. With CUDA, mmengine's own path
runs (one process per GPU, ``torch.cuda.set_device(local_rank)``, DDP with ``device_ids``) on
the ``nccl`` backend: :func:`setup_cpu_distributed` sets ``env_cfg.dist_cfg.backend='nccl'``
unless the config names a backend.

Launch with ``torchrun`` (``tools/dist_train.sh``), not ``torch.distributed.launch``.

Also: :func:`check_amp_available` (a clear error for ``--amp`` without CUDA) and
:func:`fix_ssd_head_predict` (mmdet 3.3.0's ``SSDHead`` cannot predict).
"""

import os

import torch
import torch.distributed as dist
from mmengine.config import Config

__all__ = [
    'check_amp_available',
    'default_cuda_backend',
    'fix_ssd_head_predict',
    'setup_cpu_distributed',
]

TORCHRUN_ENV = ('RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT')


def setup_cpu_distributed(cfg: Config, launcher: str) -> bool:
    """Make ``cfg`` runnable with ``launcher`` when CUDA is not available.

    Args:
        cfg: the full config; ``env_cfg.dist_cfg.backend`` and ``model_wrapper_cfg`` are
            set in place when CPU distributed mode is set up.
        launcher: the ``--launcher`` value: ``'none'``, ``'pytorch'``, ``'slurm'`` or
            ``'mpi'``.

    Returns:
        bool: True when this call set up CPU distributed mode (gloo process group, DDP
        without device ids); False when there is nothing to do (no launcher), or with CUDA
        (where the backend defaults to ``nccl``, see :func:`default_cuda_backend`).

    Raises:
        RuntimeError: for a launcher other than ``'pytorch'`` without CUDA, or when the
            ``torchrun`` environment variables are missing.
    """
    if launcher == 'none':
        return False
    if torch.cuda.is_available():
        default_cuda_backend(cfg)
        return False
    if launcher != 'pytorch':
        raise RuntimeError(
            f'Distributed launch without CUDA supports only --launcher pytorch (torchrun); '
            f'got --launcher {launcher}.'
        )
    missing = [name for name in TORCHRUN_ENV if name not in os.environ]
    if missing:
        raise RuntimeError(
            f'--launcher pytorch needs the torchrun environment; {", ".join(missing)} not set. '
            'Start the job with torchrun (see tools/dist_train.sh).'
        )
    # Assigned, not setdefault: a Config's setdefault hands back a dict it did not store
    # when the key is missing, and the backend would be lost.
    env_cfg = dict(cfg.get('env_cfg') or {})
    env_cfg['dist_cfg'] = dict(env_cfg.get('dist_cfg') or {}, backend='gloo')
    cfg.env_cfg = env_cfg
    cfg.model_wrapper_cfg = _cpu_model_wrapper_cfg(cfg)
    if not dist.is_initialized():
        dist.init_process_group(backend='gloo')
    return True


def default_cuda_backend(cfg: Config) -> str:
    """The process-group backend of a distributed run on CUDA: the config's
    ``env_cfg.dist_cfg.backend`` when it names one, else ``nccl`` (set in place)."""
    # assign step by step: ConfigDict.setdefault stores a copy of a new dict
    if cfg.get('env_cfg') is None:
        cfg.env_cfg = {}
    if cfg.env_cfg.get('dist_cfg') is None:
        cfg.env_cfg.dist_cfg = {}
    if not cfg.env_cfg.dist_cfg.get('backend'):
        cfg.env_cfg.dist_cfg.backend = 'nccl'
    return cfg.env_cfg.dist_cfg.backend


def _cpu_model_wrapper_cfg(cfg: Config) -> dict:
    """The model wrapper config for CPU DDP: the config's own, or mmengine's default wrapper
    (``broadcast_buffers=False``, ``find_unused_parameters`` from the config), with
    ``device_ids=None``."""
    wrapper_cfg = dict(cfg.get('model_wrapper_cfg') or {})
    if not wrapper_cfg:
        wrapper_cfg = dict(
            broadcast_buffers=False,
            find_unused_parameters=cfg.get('find_unused_parameters', False),
        )
    wrapper_cfg.setdefault('type', 'MMDistributedDataParallel')
    wrapper_cfg['device_ids'] = None
    return wrapper_cfg


def check_amp_available() -> None:
    """Fail early, with a clear message, when ``--amp`` cannot run on this machine.

    mmengine's ``AmpOptimWrapper`` asserts a CUDA (or NPU/MLU/MUSA) device.

    Raises:
        RuntimeError: when CUDA is not available.
    """
    if not torch.cuda.is_available():
        raise RuntimeError(
            "--amp (automatic mixed precision) needs a CUDA device: mmengine's "
            'AmpOptimWrapper does not run on CPU, and torch.cuda.is_available() is False here. '
            'Run without --amp.'
        )


def fix_ssd_head_predict() -> None:
    """Let mmdet 3.3.0's ``SSDHead`` predict (see ``heads.patch_ssd_predict``)."""
    from ..heads import patch_ssd_predict

    patch_ssd_predict()
