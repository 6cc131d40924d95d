"""Mutation testing of the core modules against the fast parity tests (``make mutate``).

Each mutant changes one token of one core module (a comparison, an arithmetic or boolean
operator, a number, ``min``/``max``, a ``not``) in a scratch copy of the repository, and the
fast tests run on it (``pytest -x``); a mutant is killed when a test fails or the run times
out. Nothing in the working tree is modified, so it is safe while others edit it.

The heavy imports (torch, mmcv, mmdet, mmengine, pytest) are made once; each mutant runs in
a forked child that imports the package fresh from the scratch copy, so a mutant costs its
tests' run time, not an interpreter start.

Prints one line per surviving mutant and ``mutation score: K killed of N``; writes every
result to ``--out`` (default ``work_dirs/mutate/results.tsv``). Mutants listed as
equivalent in ``docs/testing.md`` (lines ``path :: a -> b :: original line :: reason``) are
reported apart.
"""

import argparse
import ast
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import tokenize
from pathlib import Path
from typing import Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parents[2]

TARGETS = (
    'mmdet_anchorloss/assigners/batch_max_iou_assigner.py',
    'mmdet_anchorloss/core/assign.py',
    'mmdet_anchorloss/core/sampling.py',
    'mmdet_anchorloss/core/targets.py',
    'mmdet_anchorloss/core/layout.py',
    'mmdet_anchorloss/core/reduce.py',
    'mmdet_anchorloss/kernels/iou.py',
    'mmdet_anchorloss/kernels/sigmoid.py',
    'mmdet_anchorloss/kernels/softmax.py',
    'mmdet_anchorloss/losses/fused_focal_loss.py',
    'mmdet_anchorloss/losses/fused_cross_entropy_loss.py',
)

# The fast parity tests. The compiled-kernel tests are left out: the package runs eagerly
# here (MMDET_ANCHORLOSS_COMPILE=0), the compiled functions are the same source.
TESTS = (
    'tests/test_core/test_boundaries.py',
    'tests/test_core/test_loss_interface.py',
    'tests/test_core/test_assigner.py',
    'tests/test_core/test_targets.py',
    'tests/test_core/test_parity.py',
    'tests/test_core/test_fused_losses.py',
    'tests/test_core/test_degenerate.py',
    'tests/test_core/test_layout.py',
    'tests/test_core/test_twins.py',
    'tests/test_core/test_sync_budget.py',
    'tests/test_core/test_amp.py',
)
DESELECT = 'not compiled and not memory'

OPERATORS = {
    '<': '<=',
    '<=': '<',
    '>': '>=',
    '>=': '>',
    '==': '!=',
    '!=': '==',
    '+': '-',
    '-': '+',
    '*': '/',
    '/': '*',
    '//': '/',
    '%': '//',
    '&': '|',
    '|': '&',
    '+=': '-=',
    '-=': '+=',
    '~': '',
}
NAMES = {
    'and': 'or',
    'or': 'and',
    'True': 'False',
    'False': 'True',
    'not': '',
    'min': 'max',
    'max': 'min',
    'amin': 'amax',
    'amax': 'amin',
    'minimum': 'maximum',
    'maximum': 'minimum',
    'any': 'all',
    'all': 'any',
}
SKIP_LINE = '# pragma: no mutate'


class Mutant(NamedTuple):
    path: str  # relative to the repository root
    line: int  # 1-based
    col: int
    old: str
    new: str
    source: str  # the mutated file's full text
    text: str  # the original line, stripped

    def key(self) -> Tuple[str, str, str]:
        return self.path, self.text, f'{self.old} -> {self.new or "(removed)"}'


def _number(tok: str) -> Optional[str]:
    try:
        value = int(tok, 0)
        return str(value + 1)
    except ValueError:
        pass
    try:
        value = float(tok)
    except ValueError:
        return None
    return repr(value + 1.0)


def mutants_of(path: str) -> Iterator[Mutant]:
    """Every one-token mutant of ``path`` that still compiles."""
    text = (ROOT / path).read_text()
    lines = text.splitlines(keepends=True)
    starts = [0]
    for line in lines:
        starts.append(starts[-1] + len(line))
    toks = list(tokenize.generate_tokens(io.StringIO(text).readline))
    for i, tok in enumerate(toks):
        row, col = tok.start
        if row > len(lines) or SKIP_LINE in lines[row - 1]:
            continue
        new = None
        if tok.type == tokenize.OP:
            new = OPERATORS.get(tok.string)
        elif tok.type == tokenize.NAME:
            if tok.string == 'is' and toks[i + 1].string != 'not':
                new = 'is not'
            else:
                new = NAMES.get(tok.string)
        elif tok.type == tokenize.NUMBER:
            new = _number(tok.string)
        if new is None:
            continue
        at = starts[row - 1] + col
        source = text[:at] + new + text[at + len(tok.string) :]
        try:
            compile(source, path, 'exec')
        except SyntaxError:
            continue
        yield Mutant(path, row, col, tok.string, new, source, lines[row - 1].strip())


def equivalents(doc: Path) -> Dict[Tuple[str, str, str], str]:
    """``(path, line, 'a -> b') -> reason`` from ``docs/testing.md``.

    Each equivalent mutant is one line ``path :: a -> b :: original line :: reason``.
    """
    out = {}
    if not doc.is_file():
        return out
    for line in doc.read_text().splitlines():
        parts = [p.strip() for p in line.split(' :: ', 3)]
        if len(parts) == 4 and parts[0] in TARGETS:
            out[(parts[0], parts[2], parts[1])] = parts[3]
    return out


def scratch_copy() -> Path:
    """The tracked and untracked (not ignored) files of the working tree, in a temp dir."""
    files = subprocess.run(
        ['git', 'ls-files', '-co', '--exclude-standard', '-z'],
        cwd=ROOT,
        check=True,
        capture_output=True,
    ).stdout.split(b'\0')
    dest = Path(tempfile.mkdtemp(prefix='mutate_'))
    for name in files:
        if not name:
            continue
        src = ROOT / name.decode()
        if src.is_file():
            (dest / name.decode()).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name.decode())
    return dest


class _Coverage:
    """pytest plugin: which tests execute which lines of the mutated files (line tracing).

    Lines run while no test is running (imports, collection) are filed under ``'*'``: a
    mutant there runs every test.
    """

    def __init__(self, files: Dict[str, str]) -> None:
        self.files = files  # absolute path -> path relative to the repository
        self.current = '*'
        self.order: List[str] = []
        self.lines: Dict[Tuple[str, int], List[str]] = {}

    def _local(self, path):
        def trace(frame, event, arg):
            if event == 'line':
                seen = self.lines.setdefault((path, frame.f_lineno), [])
                if not seen or seen[-1] != self.current:
                    seen.append(self.current)
            return trace

        return trace

    def _global(self, frame, event, arg):
        path = self.files.get(frame.f_code.co_filename)
        return None if path is None else self._local(path)

    def pytest_runtest_protocol(self, item, nextitem):
        self.current = item.nodeid
        self.order.append(item.nodeid)

    def pytest_runtest_logfinish(self, nodeid, location):
        self.current = '*'

    def start(self) -> None:
        threading.settrace(self._global)
        sys.settrace(self._global)


def start_tests(
    workdir: Path, tests: Sequence[str], coverage: Optional[Tuple[Sequence[str], Path]] = None
) -> int:
    """Fork; the child runs pytest in ``workdir`` and exits with its code. Returns the pid.

    With ``coverage=(files, out)`` the child also writes, as json to ``out``, which tests
    execute which lines of ``files``.
    """
    pid = os.fork()
    if pid:
        return pid
    try:  # child: fresh package from the scratch copy, output discarded
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        os.chdir(workdir)
        sys.path.insert(0, str(workdir))
        import pytest

        plugins = []
        if coverage is not None:
            cov = _Coverage({str(workdir / f): f for f in coverage[0]})
            cov.start()
            plugins.append(cov)
        args = ['-x', '-q', '-p', 'no:cacheprovider', '-k', DESELECT, *tests]
        code = pytest.main(args, plugins=plugins)
        if coverage is not None:
            sys.settrace(None)
            rows = [[p, n, ids] for (p, n), ids in cov.lines.items()]
            coverage[1].write_text(json.dumps(dict(order=cov.order, lines=rows)))
        import mmdet_anchorloss

        if not mmdet_anchorloss.__file__.startswith(str(workdir)):
            code = 99  # the scratch copy was not the package under test
    except BaseException:
        code = 98
    os._exit(int(code))


def statement_lines(path: str) -> Dict[int, range]:
    """Line -> the lines of its innermost simple statement or compound statement header.

    A mutant can make a line run where it did not (``a and b`` -> ``a or b`` on the second
    line of a condition): the tests of the whole statement are run, not only the line's.
    """
    out: Dict[int, range] = {}
    for node in ast.walk(ast.parse((ROOT / path).read_text())):
        if not isinstance(node, ast.stmt):
            continue
        body = getattr(node, 'body', None)
        last = body[0].lineno - 1 if isinstance(body, list) and body else node.end_lineno
        span = range(node.lineno, max(node.lineno, last) + 1)
        for line in span:
            if line not in out or len(span) <= len(out[line]):
                out[line] = span
    return out


def tests_for(
    m: 'Mutant',
    lines: Dict[Tuple[str, int], List[str]],
    order: List[str],
    spans: Dict[str, Dict[int, range]],
):
    """The node ids that execute the mutant's statement, in the suite's order ([] if none)."""
    if m.path not in spans:
        spans[m.path] = statement_lines(m.path)
    span = spans[m.path].get(m.line, range(m.line, m.line + 1))
    ids = {i for line in span for i in lines.get((m.path, line), [])}
    if '*' in ids:
        return list(order)
    return [t for t in order if t in ids]


def wait_any(running: Dict[int, float], timeout: float) -> Tuple[int, str, float]:
    """Wait for one child of ``running`` (pid -> start); kill those over ``timeout``."""
    while True:
        for pid, start in list(running.items()):
            done, status = os.waitpid(pid, os.WNOHANG)
            secs = time.time() - start
            if done:
                del running[pid]
                code = os.waitstatus_to_exitcode(status)
                return pid, ('passed' if code == 0 else f'failed:{code}'), secs
            if secs > timeout:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                del running[pid]
                return pid, 'timeout', secs
        time.sleep(0.05)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--files', nargs='*', default=list(TARGETS), help='modules to mutate')
    parser.add_argument('--tests', nargs='*', default=list(TESTS), help='pytest node ids')
    parser.add_argument('--out', default='work_dirs/mutate/results.tsv')
    parser.add_argument('--list', action='store_true', help='list the mutants and exit')
    parser.add_argument('--jobs', type=int, default=1, help='mutants tested at once')
    parser.add_argument('--match', default='', help='only mutants whose line contains this')
    parser.add_argument('--retest', help='only the mutants that survived in this results file')
    args = parser.parse_args(argv)

    os.environ.setdefault('MMDET_ANCHORLOSS_COMPILE', '0')
    os.environ.setdefault('OMP_NUM_THREADS', '1')
    # No .pyc in the scratch copy: a same-size mutant written within the same second as
    # the last one would otherwise be run from a stale cache.
    sys.dont_write_bytecode = True
    mutants = [m for f in args.files for m in mutants_of(f) if args.match in m.text]
    if args.retest:
        alive = set()
        for row in Path(args.retest).read_text().splitlines()[1:]:
            path, _, _, old, new, result, _, text = row.split('\t', 7)
            if result in ('passed', 'no test'):
                alive.add((path, text, f'{old} -> {new or "(removed)"}'))
        mutants = [m for m in mutants if m.key() in alive]
    if args.list:
        for m in mutants:
            print(f'{m.path}:{m.line}:{m.col}  {m.old!r} -> {m.new!r}  {m.text}')
        print(f'{len(mutants)} mutants')
        return 0

    # The heavy imports, once; the package itself is imported by each child.
    import mmdet.models  # noqa: F401
    import mmengine  # noqa: F401
    import pytest  # noqa: F401
    import torch

    torch.set_num_threads(1)
    known = equivalents(ROOT / 'docs' / 'testing.md')
    works = [scratch_copy() for _ in range(max(1, args.jobs))]
    out = ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    killed, equiv, survived = 0, 0, []
    try:
        cov_file = works[0] / 'mutate_coverage.json'
        pid = start_tests(works[0], args.tests, (sorted({m.path for m in mutants}), cov_file))
        _, status, base = wait_any({pid: time.time()}, 3600)
        if status != 'passed':
            print(f'the tests fail without any mutant ({status}); fix them first')
            return 1
        traced = json.loads(cov_file.read_text())
        order: List[str] = traced['order']
        lines = {(path, line): ids for path, line, ids in traced['lines']}
        reach = {i for ids in lines.values() for i in ids}
        order = [t for t in order if t in reach]
        spans: Dict[str, Dict[int, range]] = {}
        timeout = max(60.0, 2 * base)
        print(
            f'{len(mutants)} mutants; unmutated tests pass in {base:.0f} s (traced), '
            f'{len(order)} tests reach the mutated files',
            flush=True,
        )
        todo = list(reversed(mutants))
        running: Dict[int, float] = {}
        owner: Dict[int, Tuple[Path, Mutant, str]] = {}
        free = list(works)
        n = 0
        with open(out, 'w') as f:
            f.write('path\tline\tcol\told\tnew\tresult\tseconds\tline_text\n')
            while todo or running:
                while todo and free:
                    m = todo.pop()
                    selected = tests_for(m, lines, order, spans)
                    if not selected:  # no test executes the line: it survives unseen
                        n += 1
                        f.write(f'{m.path}\t{m.line}\t{m.col}\t{m.old}\t{m.new}\tno test\t0\t')
                        f.write(f'{m.text}\n')
                        if m.key() in known:
                            equiv += 1
                        else:
                            survived.append(m)
                            print(f'NOT RUN  {m.path}:{m.line}  {m.key()[2]}  | {m.text}')
                        continue
                    work = free.pop()
                    target = work / m.path
                    original = target.read_text()
                    target.write_text(m.source)
                    pid = start_tests(work, selected)
                    running[pid] = time.time()
                    owner[pid] = (work, m, original)
                if not running:
                    continue
                pid, status, secs = wait_any(running, timeout)
                work, m, original = owner.pop(pid)
                (work / m.path).write_text(original)
                free.append(work)
                n += 1
                alive = status == 'passed'
                killed += not alive
                if alive and m.key() in known:
                    equiv += 1
                elif alive:
                    survived.append(m)
                    print(f'SURVIVED {m.path}:{m.line}  {m.key()[2]}  | {m.text}', flush=True)
                f.write(
                    f'{m.path}\t{m.line}\t{m.col}\t{m.old}\t{m.new}\t{status}\t{secs:.1f}\t'
                    f'{m.text}\n'
                )
                f.flush()
                if n % 25 == 0:
                    print(f'  {n}/{len(mutants)} done, {killed} killed', flush=True)
    finally:
        for work in works:
            shutil.rmtree(work, ignore_errors=True)
    total = len(mutants)
    minutes = (time.time() - t0) / 60
    print(f'equivalent (docs/testing.md): {equiv}; surviving, not listed: {len(survived)}')
    print(f'non-equivalent killed: {killed} of {total - equiv}; took {minutes:.1f} min')
    print(f'mutation score: {killed} killed of {total}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
