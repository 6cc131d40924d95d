"""Build a few of mmcv 2.1.0's ops from its sdist, for a GPU lease too short for the whole.

mmcv's full CUDA build takes about 320 s of a 600 s call on a 16-core GPU machine. Upstream's
side of the benchmark and of the gpu tests needs few of its ops: the focal losses (RetinaNet's
``FocalLoss`` on CUDA) and ``nms`` (prediction, mmcv's op check). This builds those from
mmcv's own sources, unchanged, with torch's JIT extension builder, into a copy of mmcv's
Python package whose ``mmcv._ext`` holds the built ops and raises a clear error for any other::

    python tools/mmcv_ops_subset.py MMCV_SDIST_DIR OUT_DIR [--jobs N]

``MMCV_SDIST_DIR`` is mmcv-2.1.0's unpacked sdist; put ``OUT_DIR`` on ``PYTHONPATH``. The
kernels are mmcv's own files (``focal_loss_cuda.cu``, ``nms_cuda.cu``, their dispatchers and
the CPU ``nms``); the binding file and the CUDA registrations are mmcv's own lines, cut from
``pybind.cpp`` and ``cuda/cudabind.cpp``. ``tools/gpu_session.sh`` uses it and falls back to
the full build when it fails.

mmcv's two version queries are answered in Python, with what the build used (the compiler,
nvcc's release), not by ``info.cpp``: on an H200 (2026-11-27) the first subset build's
``get_compiling_cuda_version`` crashed every process that called it (mmdet_anchorloss's
environment report, so every ``tools/train.py`` run), and the cause was not found.
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

# mmcv._ext's functions that are built, as pybind.cpp binds them
FUNCTIONS = (
    'sigmoid_focal_loss_forward',
    'sigmoid_focal_loss_backward',
    'softmax_focal_loss_forward',
    'softmax_focal_loss_backward',
    'nms',
    'softnms',
    'nms_match',
)
# their sources under mmcv/ops/csrc/pytorch
SOURCES = (
    'focal_loss.cpp',
    'nms.cpp',
    'cpu/nms.cpp',
    'cuda/focal_loss_cuda.cu',
    'cuda/nms_cuda.cu',
)
# the paragraphs of cuda/cudabind.cpp that register them for CUDA
CUDABIND = re.compile(
    r'\b(?:Sigmoid|Softmax)FocalLoss\w*|\b(?:sigmoid|softmax)_focal_loss\w*'
    r'|\bNMSCUDAKernelLauncher\b|\bnms_cuda\b|\bnms_impl\b'
)

STUB = '''"""mmcv._ext with only some ops built (tools/mmcv_ops_subset.py); the rest raise."""
from ._ext_subset import *  # noqa: F401,F403


def __getattr__(name):
    def missing(*args, **kwargs):
        raise NotImplementedError(
            f'mmcv op {{name!r}} is not built here: tools/mmcv_ops_subset.py built only '
            f'{{BUILT}}'
        )

    return missing


def get_compiler_version():
    return {compiler!r}


def get_compiling_cuda_version():
    return {cuda!r}


BUILT = {built!r}
'''


def compiler_version() -> str:
    """'GCC X.Y' of the C++ compiler torch's extension builder runs (``CXX``, else ``c++``),
    as mmcv's ``get_compiler_version`` words it; 'unknown' where it does not answer."""
    cxx = os.environ.get('CXX', 'c++')
    try:
        out = subprocess.run(
            [cxx, '-dumpfullversion', '-dumpversion'], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return 'unknown'
    return 'GCC ' + '.'.join(out.split('.')[:2]) if out else 'unknown'


def cuda_version(nvcc_output: str) -> str:
    """'13.0' from ``nvcc --version``'s output, as mmcv's ``get_compiling_cuda_version``
    words CUDART_VERSION; 'not available' without one (mmcv's answer without CUDA)."""
    found = re.search(r'release (\d+\.\d+)', nvcc_output)
    return found.group(1) if found else 'not available'


def stub_source(built, compiler: str, cuda: str) -> str:
    """mmcv's ``_ext`` for the subset: the built ops, the version queries, and a clear error
    for any other op."""
    return STUB.format(built=sorted(built), compiler=compiler, cuda=cuda)


def _nvcc_output() -> str:
    from torch.utils.cpp_extension import CUDA_HOME

    nvcc = Path(CUDA_HOME or '/usr/local/cuda') / 'bin' / 'nvcc'
    try:
        return subprocess.run([str(nvcc), '--version'], capture_output=True, text=True).stdout
    except OSError:
        return ''


def binding_source(pybind: str) -> str:
    """pybind.cpp's declarations and ``m.def`` lines for ``FUNCTIONS``, as a module."""
    head = pybind[: pybind.index('PYBIND11_MODULE')]
    decls, defs = [], []
    for name in FUNCTIONS:
        decl = re.search(rf'^[A-Za-z][^;{{}}()]*\b{name}\([^;{{}}]*\);', head, re.M)
        bind = re.search(rf'm\.def\("{name}",[^;]*\);', pybind)
        if not (decl and bind):
            raise SystemExit(f'{name}: not found in pybind.cpp')
        decls.append(decl.group(0))
        defs.append('  ' + bind.group(0))
    includes = re.findall(r'^#include .*$', head, re.M)
    return '\n'.join(
        includes + decls + ['', 'PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {'] + defs + ['}', '']
    )


def cudabind_source(cudabind: str) -> str:
    """cudabind.cpp's includes and the paragraphs that name the built ops."""
    paragraphs = re.split(r'\n\s*\n', cudabind)
    includes = [p for p in paragraphs if p.lstrip().startswith('#include')][:1]
    kept = [p for p in paragraphs if CUDABIND.search(p) and not p.lstrip().startswith('#')]
    return '\n\n'.join(includes + kept) + '\n'


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('sdist', type=Path, help="mmcv-2.1.0's unpacked sdist")
    parser.add_argument('out', type=Path, help='folder to hold the mmcv package')
    parser.add_argument('--jobs', type=int, default=os.cpu_count())
    parser.add_argument(
        '--check-only', action='store_true', help='write the generated sources and stop'
    )
    args = parser.parse_args(argv)
    csrc = args.sdist / 'mmcv' / 'ops' / 'csrc'
    build = args.out / 'build'
    build.mkdir(parents=True, exist_ok=True)
    (build / 'pybind_subset.cpp').write_text(
        binding_source((csrc / 'pytorch' / 'pybind.cpp').read_text())
    )
    (build / 'cudabind_subset.cpp').write_text(
        cudabind_source((csrc / 'pytorch' / 'cuda' / 'cudabind.cpp').read_text())
    )
    if args.check_only:
        print(f'wrote {build}/pybind_subset.cpp and cudabind_subset.cpp')
        return
    os.environ['MAX_JOBS'] = str(args.jobs)
    from torch.utils.cpp_extension import load

    flags = ['-DMMCV_WITH_CUDA', '-O3']
    # only the module's init is exported: no symbol of another loaded library can stand in
    # for these (a guard, not a known cure: see the module's docstring)
    hidden = '-fvisibility=hidden'
    # torch's builder names each object after its file: nms.cpp and cpu/nms.cpp would clash
    sources = [build / 'pybind_subset.cpp', build / 'cudabind_subset.cpp']
    for source in SOURCES:
        sources.append(build / source.replace('/', '_'))
        shutil.copy(csrc / 'pytorch' / source, sources[-1])
    module = load(
        name='_ext_subset',
        sources=[str(s) for s in sources],
        extra_include_paths=[str(csrc / d) for d in ('pytorch', 'common', 'common/cuda')],
        extra_cflags=flags + [hidden],
        extra_cuda_cflags=flags + ['-Xcompiler', hidden],
        build_directory=str(build),
        verbose=True,
    )
    package = args.out / 'mmcv'
    if package.exists():
        shutil.rmtree(package)
    shutil.copytree(args.sdist / 'mmcv', package)
    shutil.copy(module.__file__, package / '_ext_subset.so')
    built = [n for n in FUNCTIONS if hasattr(module, n)]
    (package / '_ext.py').write_text(
        stub_source(built, compiler_version(), cuda_version(_nvcc_output()))
    )
    print(f'built {len(built)} of mmcv._ext\'s functions into {package}: {", ".join(built)}')


if __name__ == '__main__':
    sys.exit(main())
