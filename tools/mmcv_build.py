"""How ``tools/install.sh`` builds mmcv 2.1.0's ops on this machine, or why it cannot.

``python tools/mmcv_build.py plan`` (run with the Python that has torch) prints shell
assignments for ``eval``: ``MMCV_CUDA`` (1: build CUDA ops, 0: CPU ops only),
``TORCH_CUDA_ARCH_LIST``, ``MAX_JOBS``, ``CUDA_HOME``, ``MMCV_BUILD_WHAT`` (one line for the
log) and ``MMCV_BUILD_ESTIMATE_S``. It exits 3, with a message that names the fix, when a
CUDA build is wanted and cannot work: no ``nvcc``, or nvcc's CUDA major version differs from
torch's.

CUDA ops are built when torch is a CUDA build and sees a GPU (``MMCV_CUDA=auto``, the
default), for the local GPUs' architectures only (``torch.cuda.get_device_capability()``;
``TORCH_CUDA_ARCH_LIST`` overrides); ``MMCV_CUDA=1`` forces them (a build node without a
GPU: set ``TORCH_CUDA_ARCH_LIST``), ``MMCV_CUDA=0`` builds CPU ops only. ``MAX_JOBS``
defaults to the number of cores.

``python tools/mmcv_build.py check-ops DEVICE [--no-probe]`` exits 0 when the installed mmcv's
ops run on DEVICE (``--no-probe``: are compiled for it), else 1 with the reason (see
``mmdet_anchorloss/engine/env_info.py``).
"""

import importlib.util
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
# Measured: mmcv 2.1.0 CPU ops, about 7-8 minutes with 2 jobs (2 cores); CUDA ops for one
# architecture (sm_90, nvcc 13), about 250 s with 16 jobs on 16 cores. In core-seconds:
CPU_BUILD_CORE_S = 900
CUDA_BUILD_CORE_S_PER_ARCH = 4000
CPU_OPS_BUILD_S = 60  # the CPU part of a CUDA build that does not shrink with more jobs


class PlanError(RuntimeError):
    """A CUDA build of mmcv's ops cannot work here; the message names the fix."""


def find_nvcc(env: Dict[str, str]) -> Optional[str]:
    """nvcc as torch.utils.cpp_extension finds it: CUDA_HOME/CUDA_PATH, PATH, /usr/local/cuda."""
    for var in ('CUDA_HOME', 'CUDA_PATH'):
        if env.get(var):
            path = os.path.join(env[var], 'bin', 'nvcc')
            return path if os.access(path, os.X_OK) else None
    found = shutil.which('nvcc', path=env.get('PATH'))
    if found:
        return found
    default = '/usr/local/cuda/bin/nvcc'
    return default if os.access(default, os.X_OK) else None


def nvcc_version(nvcc: str) -> Optional[str]:
    """``'12.4'`` from ``nvcc --version`` (``... release 12.4, V12.4.131``)."""
    try:
        out = subprocess.run([nvcc, '--version'], capture_output=True, text=True).stdout
    except OSError:
        return None
    match = re.search(r'release (\d+)\.(\d+)', out)
    return f'{match[1]}.{match[2]}' if match else None


def parse_arch_list(text: str) -> List[str]:
    """``'8.0;9.0'`` / ``'8.0 9.0+PTX'`` -> ``['8.0', '9.0+PTX']``."""
    return [item for item in re.split(r'[;\s,]+', text.strip()) if item]


def plan(
    torch_version: str,
    torch_cuda: Optional[str],
    capabilities: Sequence[str],
    env: Dict[str, str],
    nvcc: Optional[str],
    nvcc_cuda: Optional[str],
    nproc: int,
) -> Dict[str, str]:
    """The build settings (see the module docstring); raises :class:`PlanError`.

    Args:
        torch_version: ``torch.__version__``.
        torch_cuda: ``torch.version.cuda`` (None for a CPU build).
        capabilities: the visible GPUs' compute capabilities, ``['9.0']``; empty without one.
        env: the environment (``MMCV_CUDA``, ``TORCH_CUDA_ARCH_LIST``, ``MAX_JOBS``).
        nvcc: the nvcc found (None when there is none).
        nvcc_cuda: its CUDA version, ``'12.4'``.
        nproc: the number of cores.
    """
    want = env.get('MMCV_CUDA', 'auto').strip().lower() or 'auto'
    if want not in ('auto', '0', '1'):
        raise PlanError(f'MMCV_CUDA must be auto, 0 or 1, not {want!r}')
    jobs = int(env.get('MAX_JOBS') or nproc)
    if want == '0' or (want == 'auto' and not (torch_cuda and capabilities)):
        why = (
            'MMCV_CUDA=0'
            if want == '0'
            else (
                f'torch {torch_version} is a CPU build'
                if not torch_cuda
                else f'torch {torch_version} (CUDA {torch_cuda}) sees no GPU'
            )
        )
        return dict(
            MMCV_CUDA='0',
            MAX_JOBS=str(jobs),
            MMCV_BUILD_WHAT=f'CPU ops only ({why}), MAX_JOBS={jobs}',
            MMCV_BUILD_ESTIMATE_S=str(round(CPU_BUILD_CORE_S / jobs)),
        )
    if not torch_cuda:
        raise PlanError(
            f'MMCV_CUDA=1 asks for mmcv CUDA ops, but torch {torch_version} is a CPU build. '
            'Install a CUDA build of torch first (make install keeps it), or leave MMCV_CUDA '
            'unset.'
        )
    override = env.get('TORCH_CUDA_ARCH_LIST', '').strip()
    archs = parse_arch_list(override) if override else sorted(set(capabilities))
    if not archs:
        raise PlanError(
            "MMCV_CUDA=1 without a visible GPU: set TORCH_CUDA_ARCH_LIST to the target GPUs' "
            'compute capabilities, e.g. TORCH_CUDA_ARCH_LIST=9.0 for H100 (8.0: A100, 8.9: L4/'
            'L40, 8.6: A10/RTX 30xx).'
        )
    fallback = (
        "To install without mmcv's CUDA ops anyway, set MMCV_CUDA=0 (the plugin's heads "
        "then train on the GPU, but mmdet's upstream heads, NMS and RoI ops fail there)."
    )
    if not nvcc:
        raise PlanError(
            f'nvcc (the CUDA compiler) was not found, and mmcv\'s CUDA ops must be compiled '
            f'for torch {torch_version}, which is built with CUDA {torch_cuda}. Install the '
            f'CUDA {torch_cuda} toolkit (e.g. the cuda-toolkit-{torch_cuda.replace(".", "-")} '
            f'or cuda-nvcc package, or the nvidia-cuda-nvcc wheel) and put its bin/ on PATH or '
            f'set CUDA_HOME to it (looked in CUDA_HOME, CUDA_PATH, PATH, /usr/local/cuda). '
            + fallback
        )
    if not nvcc_cuda:
        raise PlanError(f'could not read the CUDA version from `{nvcc} --version`.')
    if nvcc_cuda.split('.')[0] != torch_cuda.split('.')[0]:
        raise PlanError(
            f'{nvcc} is CUDA {nvcc_cuda}, but torch {torch_version} is built with CUDA '
            f'{torch_cuda}: mmcv\'s CUDA ops built with it would not load. Use the CUDA '
            f'{torch_cuda.split(".")[0]}.x toolkit (CUDA_HOME=/usr/local/cuda-{torch_cuda} if '
            f'it is installed), or a torch built for CUDA {nvcc_cuda.split(".")[0]}. ' + fallback
        )
    note = ''
    if nvcc_cuda != torch_cuda:
        note = f" (minor version differs from torch's CUDA {torch_cuda}: works, as torch allows)"
    arch_list = ';'.join(archs)
    source = 'TORCH_CUDA_ARCH_LIST' if override else 'the local GPU'
    estimate = CPU_OPS_BUILD_S + CUDA_BUILD_CORE_S_PER_ARCH * len(archs) / jobs
    return dict(
        MMCV_CUDA='1',
        TORCH_CUDA_ARCH_LIST=arch_list,
        MAX_JOBS=str(jobs),
        # the toolkit's root, also when nvcc is a symlink (/usr/local/bin/nvcc)
        CUDA_HOME=os.path.dirname(os.path.dirname(os.path.realpath(nvcc))),
        MMCV_BUILD_WHAT=(
            f'CUDA ops for compute capability {arch_list} (from {source}), nvcc {nvcc_cuda}'
            f'{note}, torch {torch_version}, MAX_JOBS={jobs}'
        ),
        MMCV_BUILD_ESTIMATE_S=str(math.ceil(estimate)),
    )


def torch_facts():
    """``(version, cuda, capabilities)`` of the torch this Python imports."""
    import torch

    caps = []
    if torch.version.cuda and torch.cuda.is_available():
        caps = [
            '%d.%d' % torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())
        ]
    return torch.__version__, torch.version.cuda, caps


def load_env_info():
    """``mmdet_anchorloss/engine/env_info.py`` by path (the package may not be installed)."""
    path = ROOT / 'mmdet_anchorloss' / 'engine' / 'env_info.py'
    spec = importlib.util.spec_from_file_location('_anchorloss_env_info', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ['plan']:
        env = dict(os.environ)
        version, cuda, caps = torch_facts()
        nvcc = find_nvcc(env) if (cuda and env.get('MMCV_CUDA', 'auto') != '0') else None
        try:
            settings = plan(
                version,
                cuda,
                caps,
                env,
                nvcc,
                nvcc_version(nvcc) if nvcc else None,
                os.cpu_count() or 1,
            )
        except PlanError as exc:
            print(f'[install] ERROR: {exc}', file=sys.stderr)
            return 3
        for key, value in settings.items():
            print(f'{key}={shlex.quote(value)}')
        return 0
    if argv[:1] == ['check-ops'] and len(argv) in (2, 3):
        env_info = load_env_info()
        try:
            env_info.check_mmcv_ops(argv[1], probe='--no-probe' not in argv)
        except env_info.MmcvOpsError as exc:
            print(exc)
            return 1
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == '__main__':
    sys.exit(main())
