"""What a run ran on, and whether mmcv's compiled ops can run there.

:func:`environment_info` collects the device (``cuda`` when torch sees a GPU, else ``cpu``),
the torch and CUDA versions, the GPU's name and compute capability, and the mmcv/mmengine/
mmdet versions with the devices mmcv's compiled ops support; reports (``make gpu-check``,
the upstream comparison) record it. ``python -m mmdet_anchorloss.engine.env_info`` prints it
(``--json`` for the dict).

:func:`check_mmcv_ops` turns mmcv's unclear failure at the first GPU op (``... implementation
for device cuda:0 not found``) into an error that says what is wrong and how to fix it: mmcv
without compiled ops (mmcv-lite), mmcv built without CUDA ops on a CUDA machine, or CUDA ops
that do not run on this GPU (built for other architectures).

This module imports only torch at import time (mmcv lazily), so ``tools/install.sh`` can load
it by file path before the package is installed.
"""

import functools
import os
import platform
import sys
from typing import Optional, Union

import torch

__all__ = ['MmcvOpsError', 'check_mmcv_ops', 'environment_info', 'format_environment']

MMCV_CUDA_FIX = (
    'Rebuild mmcv 2.1.0 with CUDA ops for this GPU: run `bash tools/install.sh` in the '
    'project (with the CUDA torch importable and nvcc of the same CUDA major version on PATH '
    'or in CUDA_HOME, it rebuilds mmcv when its ops lack CUDA), or by hand: '
    '`MMCV_WITH_OPS=1 FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST={arch} MAX_JOBS=$(nproc) '
    'pip install --no-build-isolation --no-cache-dir --force-reinstall --no-deps mmcv==2.1.0` '
    '(with setuptools<70 installed; see README, "On a GPU machine").'
)
MMCV_OPS_FIX = (
    'mmdet needs the full mmcv 2.1.0 with compiled ops, not mmcv-lite: run `make install` '
    '(it builds mmcv from source with MMCV_WITH_OPS=1), see README.'
)


class MmcvOpsError(RuntimeError):
    """mmcv's compiled ops cannot run on the device in use; the message names the fix."""


def _device_arch(index: int = 0) -> str:
    """``'9.0'`` for the GPU ``index`` (its compute capability); ``'<arch>'`` without CUDA."""
    try:
        return '%d.%d' % torch.cuda.get_device_capability(index)
    except Exception:  # noqa: BLE001 - no CUDA: the message keeps a placeholder
        return '<arch>'


def mmcv_ops_cuda_version() -> Optional[str]:
    """The CUDA version mmcv's ops were compiled with; None when they have no CUDA (or no
    compiled ops at all)."""
    try:
        from mmcv.ops import get_compiling_cuda_version
    except Exception:  # noqa: BLE001 - mmcv-lite, a broken build: no compiled ops
        return None
    version = get_compiling_cuda_version()
    return None if version in (None, '', 'not available') else str(version)


def _probe(nms, dev: torch.device) -> None:
    """A tiny ``nms`` on ``dev``; raises what mmcv or CUDA raise."""
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 10.0, 10.0]], device=dev)
    keep = nms(boxes, torch.tensor([0.9, 0.8], device=dev), 0.5)[1]
    if dev.type == 'cuda':
        torch.cuda.synchronize(dev)
    if keep.tolist() != [0]:
        raise RuntimeError(f'nms kept {keep.tolist()} of two overlapping boxes, expected [0]')


@functools.lru_cache(maxsize=None)
def _checked(device: str, probe: bool) -> None:
    import mmcv

    try:
        from mmcv.ops import get_compiling_cuda_version, nms
    except Exception as exc:  # noqa: BLE001
        raise MmcvOpsError(
            f'mmcv {mmcv.__version__} at {os.path.dirname(mmcv.__file__)} has no compiled ops '
            f'(importing mmcv.ops failed: {exc}). {MMCV_OPS_FIX}'
        ) from exc
    dev = torch.device(device)
    if dev.type != 'cuda':
        return
    compiled = get_compiling_cuda_version()
    if compiled in (None, '', 'not available'):
        raise MmcvOpsError(
            f'mmcv {mmcv.__version__} at {os.path.dirname(mmcv.__file__)} was built without '
            f'CUDA ops (mmcv.ops.get_compiling_cuda_version() says {compiled!r}), so its ops '
            f'(NMS, focal loss, RoIAlign, ...) cannot run on {device}. '
            + MMCV_CUDA_FIX.format(arch=_device_arch(dev.index or 0))
        )
    if not probe:
        return
    try:
        _probe(nms, dev)
    except Exception as exc:  # noqa: BLE001 - RuntimeError, AssertionError (no CUDA), ...
        arch = _device_arch(dev.index or 0)
        raise MmcvOpsError(
            f'mmcv {mmcv.__version__} has CUDA ops (CUDA {compiled}) but they fail on {device} '
            f'(compute capability {arch}, torch CUDA {torch.version.cuda}): {exc}. Usually '
            f'they were built for other GPU architectures or another CUDA. '
            + MMCV_CUDA_FIX.format(arch=arch)
        ) from exc


def check_mmcv_ops(device: Union[str, torch.device] = 'cuda', probe: bool = True) -> None:
    """Raise :class:`MmcvOpsError`, naming the fix, when mmcv's ops cannot run on ``device``.

    Checks that ``mmcv.ops`` imports (compiled ops present) and, for a CUDA device, that mmcv
    was compiled with CUDA and (``probe=True``) that a tiny ``nms`` runs on that device. Cheap
    after the first call: a passing check is remembered per device.

    Args:
        device: the device the model's tensors are on (``'cuda'``, ``'cuda:1'``, ``'cpu'``).
        probe: run the tiny op on a CUDA device (catches ops built for other GPU archs).
    """
    _checked(str(torch.device(device)), probe)


def environment_info() -> dict:
    """The machine and stack a run ran on, as a JSON-able dict.

    Keys: ``device`` (``'cuda'`` or ``'cpu'``: what mmengine picks), ``cuda_available``,
    ``torch``, ``torch_cuda`` (CUDA version torch was built with; None for a CPU build),
    ``cudnn``, ``gpu_count``, ``gpu_name``, ``gpu_names``, ``gpu_capability`` (``'9.0'``),
    ``python``, ``platform``, ``cpu_count``, ``mmcv``, ``mmcv_ops`` (compiled ops import),
    ``mmcv_ops_cuda`` (CUDA version mmcv's ops were built with, or None),
    ``mmcv_ops_devices`` (devices the compiled ops support), ``mmengine``, ``mmdet``.
    """
    cuda = torch.cuda.is_available()
    count = torch.cuda.device_count() if cuda else 0
    names = [torch.cuda.get_device_name(i) for i in range(count)]
    info = dict(
        device='cuda' if cuda else 'cpu',
        cuda_available=cuda,
        torch=torch.__version__,
        torch_cuda=torch.version.cuda,
        cudnn=torch.backends.cudnn.version() if cuda else None,
        gpu_count=count,
        gpu_name=names[0] if names else None,
        gpu_names=names,
        gpu_capability=_device_arch(0) if cuda else None,
        python=platform.python_version(),
        platform=platform.platform(),
        cpu_count=os.cpu_count(),
    )
    for name in ('mmcv', 'mmengine', 'mmdet'):
        try:
            info[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - report what is there
            info[name] = None
    try:
        import mmcv.ops  # noqa: F401

        info['mmcv_ops'] = True
    except Exception:  # noqa: BLE001
        info['mmcv_ops'] = False
    info['mmcv_ops_cuda'] = mmcv_ops_cuda_version()
    devices = ['cpu'] if info['mmcv_ops'] else []
    info['mmcv_ops_devices'] = devices + (['cuda'] if info['mmcv_ops_cuda'] else [])
    return info


def format_environment(info: Optional[dict] = None) -> str:
    """One line: device, GPU, torch, CUDA, mmcv and its ops' devices."""
    info = info or environment_info()
    if info['device'] == 'cuda':
        device = f'cuda ({info["gpu_name"]}, sm_{info["gpu_capability"].replace(".", "")}'
        device += f', {info["gpu_count"]} GPUs)' if info['gpu_count'] > 1 else ')'
    else:
        device = 'cpu (no CUDA GPU visible to torch)'
    ops = ', '.join(info['mmcv_ops_devices']) or 'none'
    return (
        f'device {device}; torch {info["torch"]}, CUDA {info["torch_cuda"] or "none"}; '
        f'mmcv {info["mmcv"]} (compiled ops for: {ops}); mmdet {info["mmdet"]}; '
        f'Python {info["python"]}'
    )


def main(argv=None) -> int:
    """``python -m mmdet_anchorloss.engine.env_info [--json] [--check-ops]``."""
    import json

    argv = sys.argv[1:] if argv is None else argv
    info = environment_info()
    print(json.dumps(info, indent=1) if '--json' in argv else format_environment(info))
    if '--check-ops' in argv:
        try:
            check_mmcv_ops(info['device'])
        except MmcvOpsError as exc:
            print(f'ERROR: {exc}', file=sys.stderr)
            return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
