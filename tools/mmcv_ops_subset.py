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
"""

import argparse
import os
import re
import shutil
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
    'get_compiler_version',
    'get_compiling_cuda_version',
)
# their sources under mmcv/ops/csrc/pytorch
SOURCES = (
    'focal_loss.cpp',
    'nms.cpp',
    'info.cpp',
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


BUILT = {built!r}
'''


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
    # for these (the first build, without it, crashed in get_compiling_cuda_version on an
    # H200; that this was the cause is a guess, and the session script checks every build)
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
    built = sorted(n for n in FUNCTIONS if hasattr(module, n))
    (package / '_ext.py').write_text(STUB.format(built=built))
    print(f'built {len(built)} of mmcv._ext\'s functions into {package}: {", ".join(built)}')


if __name__ == '__main__':
    sys.exit(main())
