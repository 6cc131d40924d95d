"""The layers stay apart: core/ and kernels/ import no registry and no head."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / 'mmdet_anchorloss'
FORBIDDEN = ('registry', 'heads', 'losses', 'assigners', 'coders', 'datasets', 'engine')


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            yield ('.' * node.level) + (node.module or '')
        elif isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)


def test_core_and_kernels_know_no_registry_or_head():
    checked = 0
    for layer in ('core', 'kernels'):
        for path in sorted((PACKAGE / layer).glob('*.py')):
            for name in _imports(path):
                parts = name.lstrip('.').split('.')
                assert 'mmdet.registry' not in name, (path.name, name)
                if name.startswith('..') or name.startswith('mmdet_anchorloss'):
                    top = parts[1] if name.startswith('mmdet_anchorloss') else parts[0]
                    assert top not in FORBIDDEN, f'{layer}/{path.name} imports {name}'
            checked += 1
    assert checked >= 12
