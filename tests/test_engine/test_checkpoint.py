"""Safe checkpoint loading: resume works under weights_only=True, code in a pickle never runs."""

import pickletools
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Set

import pytest
import torch
from engine_utils import ROOT, read_scalars, run_train, tiny_run_options
from mmengine.logging import HistoryBuffer
from mmengine.runner import CheckpointLoader

from mmdet_anchorloss.engine.checkpoint import (
    UnsafeCheckpointError,
    history_buffer_getattr,
    load_from_local_safe,
    register_safe_checkpoint_globals,
)

# The process-wide registration normally comes with `import mmdet_anchorloss`; made explicit
# here so these in-process tests do not depend on import order.
register_safe_checkpoint_globals()

MAX_ITERS = 4
STOP_AT = 2
COMPARED = ('loss', 'loss_cls', 'loss_bbox', 'grad_norm', 'lr')


class CodeInPickle:
    """An object whose unpickling runs code: it creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f'open({self.marker!r}, "w").close()',))


class GetattrInPickle:
    """An object that unpickles as ``getattr(obj, name)``."""

    def __init__(self, obj, name: str):
        self.obj, self.name = obj, name

    def __reduce__(self):
        return (getattr, (self.obj, self.name))


def pickle_globals(path: Path) -> Set[str]:
    """Every ``module.name`` a torch checkpoint's pickle refers to (read, not run)."""
    with zipfile.ZipFile(path) as archive:
        data = archive.read(next(n for n in archive.namelist() if n.endswith('data.pkl')))
    found = set()
    for opcode, arg, _ in pickletools.genops(data):
        if opcode.name == 'GLOBAL':
            found.add(arg.replace(' ', '.'))
    return found


@pytest.fixture(scope='module')
def full_run(shapes_root, tmp_path_factory) -> Path:
    """An uninterrupted 4-iteration run that saves a checkpoint every 2 iterations."""
    work_dir = tmp_path_factory.mktemp('full_run')
    run_train(work_dir, tiny_run_options(shapes_root, MAX_ITERS, STOP_AT))
    assert (work_dir / f'iter_{STOP_AT}.pth').is_file()
    return work_dir


def test_package_import_installs_safe_loader():
    """``import mmdet_anchorloss`` alone puts the safe loader behind mmengine's local paths."""
    code = (
        'import mmdet_anchorloss, torch\n'
        'from mmengine.runner import CheckpointLoader\n'
        "print(CheckpointLoader._get_checkpoint_loader('/x/iter_1.pth').__name__)\n"
        "print(any(getattr(g, '__name__', '') == 'HistoryBuffer' "
        'for g in torch.serialization.get_safe_globals()))\n'
    )
    out = subprocess.run(
        [sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == ['load_from_local_safe', 'True'], (
        'mmdet_anchorloss/__init__.py must call '
        'mmdet_anchorloss.engine.checkpoint.register_safe_checkpoint_globals()'
    )


def test_allow_list_is_what_mmengine_writes(full_run):
    """The checkpoint loads weights-only, and every allow-listed non-dtype entry is used."""
    ckpt = full_run / f'iter_{STOP_AT}.pth'
    assert torch.serialization.get_unsafe_globals_in_checkpoint(str(ckpt)) == []
    # pickle protocol 2 writes builtins as __builtin__; numpy 2 writes numpy._core
    used = {
        name.replace('__builtin__.', 'builtins.').replace('numpy._core.', 'numpy.core.')
        for name in pickle_globals(ckpt)
    }
    for name in (
        'mmengine.logging.history_buffer.HistoryBuffer',
        'builtins.getattr',
        'numpy.core.multiarray._reconstruct',
        'numpy.ndarray',
        'numpy.dtype',
        'numpy.core.multiarray.scalar',
    ):
        assert name in used, f'{name} is allow-listed but mmengine no longer writes it'
    checkpoint = torch.load(ckpt, weights_only=True)
    buffer = checkpoint['message_hub']['log_scalars']['train/loss']
    assert isinstance(buffer, HistoryBuffer)
    assert len(buffer.data[0]) == STOP_AT
    assert checkpoint['meta']['iter'] == STOP_AT


def test_resume_reaches_same_losses(full_run, shapes_root, tmp_path):
    """Stopped after iteration 2 and resumed, the run logs the same numbers at 3 and 4."""
    work_dir = tmp_path / 'resumed'
    work_dir.mkdir()
    ckpt = work_dir / f'iter_{STOP_AT}.pth'
    ckpt.write_bytes((full_run / f'iter_{STOP_AT}.pth').read_bytes())
    result = run_train(
        work_dir, tiny_run_options(shapes_root, MAX_ITERS, STOP_AT), '--resume', str(ckpt)
    )
    log = result.stdout + result.stderr
    assert 'Loads checkpoint by local_safe backend' in log
    assert f'resumed epoch: 0, iter: {STOP_AT}' in log
    expected, resumed = read_scalars(full_run), read_scalars(work_dir)
    assert sorted(resumed) == list(range(STOP_AT + 1, MAX_ITERS + 1))
    for it in resumed:
        for key in COMPARED:
            # mmengine prints 4 digits after the point (LogProcessor.num_digits)
            assert f'{resumed[it][key]:.4f}' == f'{expected[it][key]:.4f}', (it, key)
    # the momentum state came back too: iteration 4 would differ without it
    assert resumed[MAX_ITERS]['loss'] == expected[MAX_ITERS]['loss']


def test_code_in_checkpoint_is_refused(tmp_path):
    """A pickle that would run code is refused with a message; the code does not run."""
    marker = tmp_path / 'pwned'
    path = tmp_path / 'evil.pth'
    torch.save({'state_dict': {'w': torch.ones(2)}, 'meta': CodeInPickle(marker)}, path)
    with pytest.raises(UnsafeCheckpointError) as info:
        CheckpointLoader.load_checkpoint(str(path))
    message = str(info.value)
    assert str(path) in message
    assert 'builtins.exec' in message
    assert 'not on the allow-list' in message
    assert 'trust' in message and 'add_safe_globals' in message
    assert not marker.exists()
    # the payload is live: loading without the allow-list check would have run it
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_getattr_stand_in_only_gives_history_buffer_methods(tmp_path):
    """``builtins.getattr`` is allow-listed as a stand-in that refuses other attributes."""
    assert history_buffer_getattr(HistoryBuffer, 'mean') is HistoryBuffer.mean
    path = tmp_path / 'getattr.pth'
    torch.save({'x': GetattrInPickle(HistoryBuffer, '__init__')}, path)
    with pytest.raises(UnsafeCheckpointError, match='getattr'):
        load_from_local_safe(str(path))
    torch.save({'x': GetattrInPickle(torch.Tensor, 'new_empty')}, path)
    with pytest.raises(UnsafeCheckpointError, match='getattr'):
        load_from_local_safe(str(path))
    torch.save({'x': GetattrInPickle(HistoryBuffer, 'max')}, path)
    assert load_from_local_safe(str(path))['x'] is HistoryBuffer.max


def test_train_resume_refuses_code_in_checkpoint(shapes_root, tmp_path):
    """``tools/train.py --resume evil.pth`` stops with the refusal; the code does not run."""
    marker = tmp_path / 'pwned'
    path = tmp_path / 'evil.pth'
    torch.save({'meta': {'iter': 1, 'epoch': 0}, 'message_hub': CodeInPickle(marker)}, path)
    result = run_train(
        tmp_path / 'work',
        tiny_run_options(shapes_root, MAX_ITERS, STOP_AT),
        '--resume',
        str(path),
        check=False,
    )
    assert result.returncode != 0
    assert 'UnsafeCheckpointError' in result.stderr
    assert f"Refusing to load checkpoint '{path}'" in result.stderr
    assert not marker.exists()
