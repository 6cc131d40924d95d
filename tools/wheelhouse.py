"""Build an offline wheelhouse for ``make install WHEELHOUSE=DIR``, and check one.

``download`` (run on a machine with network access, any Python 3.8+ with pip >= 20.3) puts
into one folder everything that ``tools/install.sh`` installs except torch: the wheels of
mmengine, mmdet, the pinned run-time and dev packages and all their dependencies, mmcv
2.1.0's source (PyPI has no wheel of it; ``make install`` builds it on the target), and
mmcv's build tools (setuptools 69.5.1, wheel, ninja). The target interpreter and platform
are chosen with ``--python-version`` and ``--platform`` (default: this machine's); only
binary wheels are taken, so nothing but mmcv is compiled on the target. A ``manifest.json``
lists every file and the pins, so that ``check`` can name what is missing.

The torch wheel is left out on purpose: a CUDA build is several GB, and the target machine
usually has its torch preinstalled (``make install`` keeps it).

``check DIR`` names every pinned package and every manifest file that DIR lacks, and warns
when DIR was built for another Python version. ``tools/install.sh`` runs it before it
installs from a wheelhouse.

Examples::

    python3 tools/wheelhouse.py download --out wheelhouse
    python3 tools/wheelhouse.py download --out wh312 --python-version 3.12 \\
        --platform manylinux2014_x86_64
    python3 tools/wheelhouse.py check wh312 --python-version 3.12
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parents[1]
CONSTRAINTS = ROOT / 'requirements' / 'constraints.txt'
MANIFEST = 'manifest.json'
# Never in the wheelhouse (see the module docstring). triton: a CUDA torch brings its own,
# and with a CPU torch it only lets the tests run the kernels through its interpreter
# (tools/install.sh installs it when the wheelhouse has it, and goes on without it).
EXCLUDED = ('torch', 'triton')
# Built from source on the target; PyPI has only an sdist of mmcv 2.1.0.
SDISTS = ('mmcv',)
# mmcv 2.1.0's setup.py imports pkg_resources: build it with this setuptools (tools/install.sh).
MMCV_BUILD_SETUPTOOLS = 'setuptools==69.5.1'
BUILD_TOOLS = ('wheel', 'ninja')
# mmcv 2.1.0's requirements/runtime.txt (read from the sdist when it is there).
MMCV_RUNTIME_FALLBACK = ('addict', 'packaging', 'Pillow', 'pyyaml', 'yapf')
_WHEEL_RE = re.compile(r'^(?P<name>[^-]+)-(?P<version>[^-]+)(-\d[^-]*)?-[^-]+-[^-]+-[^-]+\.whl$')
_SDIST_RE = re.compile(r'^(?P<name>.+)-(?P<version>[0-9][^-]*)\.(tar\.gz|zip)$')


def normalize(name: str) -> str:
    """PEP 503 name: lower case, runs of ``-_.`` as one ``-``."""
    return re.sub(r'[-_.]+', '-', name).lower()


def dist_of(filename: str) -> Optional[Tuple[str, str]]:
    """``(normalized name, version)`` of a wheel or sdist file name; None for other files."""
    for regex in (_WHEEL_RE, _SDIST_RE):
        match = regex.match(filename)
        if match:
            return normalize(match['name']), match['version']
    return None


def read_pins(path: Path = CONSTRAINTS) -> Dict[str, str]:
    """``{normalized name: 'name==version'}`` of a constraints file's ``name==version`` lines."""
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split('#', 1)[0].strip()
        if '==' in line:
            name = line.split('==', 1)[0].strip()
            pins[normalize(name)] = line
    return pins


def required_pins(pins: Dict[str, str]) -> List[str]:
    """The pins a wheelhouse must hold: all but torch, plus mmcv's build setuptools."""
    wanted = [pin for name, pin in pins.items() if name not in EXCLUDED]
    return wanted + [MMCV_BUILD_SETUPTOOLS]


def inventory(folder: Path) -> Dict[str, set]:
    """``{normalized name: {versions}}`` of the wheels and sdists in ``folder``."""
    found: Dict[str, set] = {}
    for entry in folder.iterdir():
        dist = dist_of(entry.name)
        if dist:
            found.setdefault(dist[0], set()).add(dist[1])
    return found


def missing_packages(folder: Path, required: Iterable[str]) -> List[str]:
    """The entries of ``required`` (``name`` or ``name==version``) with no file in ``folder``."""
    found = inventory(folder)
    missing = []
    for req in required:
        name, _, version = req.partition('==')
        versions = found.get(normalize(name.strip()), set())
        if not versions or (version and version.strip() not in versions):
            missing.append(req)
    return missing


def check(
    folder: Path, python_version: Optional[str] = None, pins: Optional[Dict[str, str]] = None
) -> List[str]:
    """Problems that keep ``make install WHEELHOUSE=folder`` from working; empty when none.

    Names every pinned package (``requirements/constraints.txt``, torch excepted) and every
    file of the folder's manifest that is missing, and a Python version other than the one
    the wheelhouse was built for.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return [f'{folder} is not a folder']
    problems = []
    missing = missing_packages(folder, required_pins(pins or read_pins()))
    manifest_file = folder / MANIFEST
    manifest = json.loads(manifest_file.read_text()) if manifest_file.is_file() else None
    if manifest:
        present = {entry.name for entry in folder.iterdir()}
        for entry in manifest['files']:
            if entry['file'] not in present and entry['requirement'] not in missing:
                missing.append(entry['requirement'])
        built_for = manifest.get('python_version')
        if python_version:
            python_version = '.'.join(python_version.split('.')[:2])
        if python_version and built_for and built_for != python_version:
            problems.append(
                f'{folder} was built for Python {built_for}, not {python_version}: '
                f'rebuild it with `make wheelhouse PYTHON_VERSION={python_version}`'
            )
    if missing:
        problems.append(
            f'{folder} is missing {len(missing)} package(s): {", ".join(missing)}. Rebuild it '
            'on a machine with network access (`make wheelhouse`, same PYTHON_VERSION and '
            'PLATFORM), or add those files to it.'
        )
    return problems


def mmcv_runtime_requirements(sdist: Path) -> List[str]:
    """mmcv's run-time requirements from its sdist's ``requirements/runtime.txt`` (Linux)."""
    try:
        with tarfile.open(sdist) as tar:
            member = next(
                m for m in tar.getmembers() if m.name.endswith('/requirements/runtime.txt')
            )
            text = tar.extractfile(member).read().decode()
    except (StopIteration, tarfile.TarError, OSError):
        return list(MMCV_RUNTIME_FALLBACK)
    reqs = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith('#') or 'win32' in line:
            continue
        name = re.split(r'[<>=!~;\[ ]', line, maxsplit=1)[0]
        if normalize(name) != 'mmengine':  # pinned with the rest
            reqs.append(name)
    return reqs


def target_args(python_version: Optional[str], platforms: Sequence[str]) -> List[str]:
    """pip download options for the target interpreter and platforms (binary wheels only)."""
    args = ['--only-binary=:all:']
    if python_version:
        args += ['--python-version', python_version, '--implementation', 'cp']
    for platform in platforms:
        args += ['--platform', platform]
    return args


def run_pip(python: str, args: List[str], env: Optional[dict] = None) -> None:
    """``python -m pip download ...``, echoed; raises SystemExit with pip's code on failure."""
    cmd = [python, '-m', 'pip', 'download', '--disable-pip-version-check', *args]
    print('[wheelhouse] ' + ' '.join(cmd), flush=True)
    result = subprocess.run(cmd, env=env)
    if result.returncode:
        raise SystemExit(
            f'[wheelhouse] pip download failed (exit {result.returncode}); see its message '
            'above. A package with no wheel for the target needs another --platform '
            '(e.g. manylinux_2_28_x86_64) or Python version.'
        )


def download(
    out: Path, python: str, python_version: Optional[str], platforms: Sequence[str]
) -> dict:
    """Fill ``out`` (see the module docstring) and write its manifest; return the manifest."""
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    pins = read_pins()
    constraints = [pin for name, pin in pins.items() if name not in EXCLUDED]
    with tempfile.TemporaryDirectory() as tmp:
        constraint_file = Path(tmp, 'constraints.txt')
        constraint_file.write_text('\n'.join(constraints) + '\n')
        # mmcv's sdist: pip runs its setup.py for metadata, in an isolated build env whose
        # setuptools must still have pkg_resources (PIP_CONSTRAINT reaches that env).
        build_constraint = Path(tmp, 'build-constraints.txt')
        build_constraint.write_text('setuptools<70\n')
        env = dict(os.environ, PIP_CONSTRAINT=str(build_constraint))
        sdists = [pins[name] for name in SDISTS]
        run_pip(python, ['--no-deps', '--no-binary', ':all:', '-d', str(out), *sdists], env=env)
        mmcv_sdist = next(out.glob('mmcv-*.tar.gz'), None)
        mmcv_reqs = mmcv_runtime_requirements(mmcv_sdist) if mmcv_sdist else []
        wanted = [pin for name, pin in pins.items() if name not in EXCLUDED + SDISTS]
        wanted = [pin for pin in wanted if normalize(pin.split('==')[0]) not in BUILD_TOOLS]
        target = target_args(python_version, platforms)
        run_pip(python, [*target, '-c', str(constraint_file), '-d', str(out), *wanted, *mmcv_reqs])
        build = [MMCV_BUILD_SETUPTOOLS] + [pins.get(name, name) for name in BUILD_TOOLS]
        run_pip(python, [*target, '--no-deps', '-d', str(out), *build])
    files = []
    for entry in sorted(out.iterdir()):
        dist = dist_of(entry.name)
        if dist:
            files.append(dict(file=entry.name, requirement=f'{dist[0]}=={dist[1]}'))
    if python_version:
        python_version = '.'.join(python_version.split('.')[:2])
    else:
        python_version = subprocess.run(
            [python, '-c', 'import sys; print("%d.%d" % sys.version_info[:2])'],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    manifest = dict(
        python_version=python_version,
        platforms=list(platforms) or ['this machine'],
        excluded=list(EXCLUDED),
        created=time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()),
        files=files,
    )
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + '\n')
    size_mb = sum(entry.stat().st_size for entry in out.iterdir()) / 2**20
    print(
        f'[wheelhouse] {out}: {len(files)} files, {size_mb:.0f} MiB, for Python {python_version} '
        f'(platform: {", ".join(manifest["platforms"])}), in {time.perf_counter() - start:.0f} s. '
        f'Install offline with: make install WHEELHOUSE={out}'
    )
    return manifest


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    sub = parser.add_subparsers(dest='command', required=True)
    down = sub.add_parser('download', help='fill a wheelhouse (needs network access)')
    down.add_argument('--out', default='wheelhouse', help='folder (default: wheelhouse)')
    down.add_argument('--python', default=sys.executable, help='the Python whose pip downloads')
    down.add_argument('--python-version', help='target Python, e.g. 3.12 (default: --python)')
    down.add_argument(
        '--platform',
        nargs='*',
        default=[],
        help='target platform tag(s), e.g. manylinux2014_x86_64 (default: this machine)',
    )
    chk = sub.add_parser('check', help='name what a wheelhouse lacks; exit 1 if anything')
    chk.add_argument('folder')
    chk.add_argument('--python-version', help='the Python that will install from it')
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.command == 'download':
        platforms = [p for item in args.platform for p in item.split()]
        download(Path(args.out), args.python, args.python_version or None, platforms)
        return 0
    problems = check(Path(args.folder), args.python_version)
    for problem in problems:
        print(f'[wheelhouse] {problem}', file=sys.stderr)
    return 1 if problems else 0


if __name__ == '__main__':
    sys.exit(main())
