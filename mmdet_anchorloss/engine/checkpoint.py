"""Safe checkpoint loading for mmengine checkpoints under ``torch.load(weights_only=True)``.

Since torch 2.6, ``torch.load`` defaults to ``weights_only=True``: the unpickler only builds
tensors, plain containers and the classes a program has allow-listed. mmengine 0.10.7 calls
``torch.load(filename, map_location=...)`` with no ``weights_only`` argument, and its own
checkpoints hold a ``message_hub`` with :class:`mmengine.logging.HistoryBuffer` objects (whose
histories are numpy arrays), so ``--resume`` and ``load_from`` fail with an
``UnpicklingError``.

Turning ``weights_only`` off is not the fix: a checkpoint is then a program, and any object
in it may run code while it is unpickled. Instead :func:`register_safe_checkpoint_globals`

* allow-lists exactly the few classes and functions mmengine itself writes into a checkpoint
  (:func:`safe_checkpoint_globals`), and
* re-registers mmengine's local-file checkpoint loader (the ``''`` scheme of
  :class:`mmengine.runner.CheckpointLoader`, used by ``Runner.resume``, ``Runner.load_checkpoint``
  and ``mmengine.runner.load_checkpoint``) with :func:`load_from_local_safe`, which passes
  ``weights_only=True`` explicitly (also on torch 2.4 and 2.5, whose default is still False) and
  turns torch's ``UnpicklingError`` into an :class:`UnsafeCheckpointError` that names the file,
  the objects that are not allow-listed, and what to do if the file is trusted.

``mmdet_anchorloss`` calls :func:`register_safe_checkpoint_globals` when it is imported, so any
config with ``custom_imports=dict(imports=['mmdet_anchorloss'])`` gets it.
"""

import os
import os.path as osp
import pickle
import re
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import torch

__all__ = [
    'UnsafeCheckpointError',
    'history_buffer_getattr',
    'load_from_local_safe',
    'register_safe_checkpoint_globals',
    'safe_checkpoint_globals',
]

# Numeric numpy dtypes whose arrays and scalars a checkpoint may hold (HistoryBuffer keeps
# float64 values and int64 counts; the others cover logs of other scalar types). The object
# dtype is deliberately absent: an object array is a container of arbitrary pickled objects.
_NUMPY_DTYPES = (
    'bool',
    'int8',
    'int16',
    'int32',
    'int64',
    'uint8',
    'uint16',
    'uint32',
    'uint64',
    'float16',
    'float32',
    'float64',
)
# HistoryBuffer's own statistics methods. ``HistoryBuffer.__getstate__`` stores them in the
# pickle, and pickle protocol 2 (torch.save's default) writes a method as
# ``getattr(HistoryBuffer, 'mean')``.
_HISTORY_BUFFER_METHODS = ('min', 'max', 'current', 'mean')
_TRUE_VALUES = ('1', 'y', 'yes', 'true')
_registered = False


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint holds objects outside the allow-list and was not loaded.

    Subclasses :class:`pickle.UnpicklingError`, the error torch raises for the same cause, so
    code that already catches that keeps working.
    """


def _torch_has_safe_globals() -> bool:
    """Whether this torch has ``torch.serialization.add_safe_globals`` (torch >= 2.4)."""
    return hasattr(torch.serialization, 'add_safe_globals')


def safe_checkpoint_globals() -> List[Union[Callable, Tuple[Callable, str]]]:
    """The classes and functions, beyond torch's defaults, that mmengine checkpoints hold.

    Found by saving the checkpoints of a real (tiny) mmengine training run and loading them
    with ``weights_only=True`` until they loaded; ``tests/test_engine/test_checkpoint.py``
    repeats that check. Everything else in such a checkpoint (tensors, ``OrderedDict``, dict,
    list, tuple, str, int, float, bool, None) is on torch's own allow-list.

    Returns:
        list[Callable | tuple[Callable, str]]: what to pass to
        ``torch.serialization.add_safe_globals``:

        * ``mmengine.logging.HistoryBuffer``: ``checkpoint['message_hub']['log_scalars']``
          maps every logged scalar (loss, lr, time, ...) to one. Rebuilt with ``__new__``
          and its own ``__setstate__`` (a ``__dict__`` update): no code of the file runs.
        * ``(history_buffer_getattr, 'builtins.getattr')``: a HistoryBuffer pickles its
          statistics methods as ``getattr(HistoryBuffer, 'mean')``; this stand-in for
          ``getattr`` returns only those four methods (the real ``getattr`` would let a
          pickle reach any attribute of any allowed object).
        * numpy's array reconstructor (``numpy.core.multiarray._reconstruct``; under
          ``numpy._core`` on numpy 2) and ``numpy.ndarray``: a HistoryBuffer's
          ``_log_history`` (float64) and ``_count_history`` (int64) are numpy arrays.
        * ``numpy.dtype`` and the classes of the numeric dtypes (``numpy.dtypes.Float64DType``,
          ``Int64DType``, ...; bool, int8-64, uint8-64, float16-64): an array pickles its
          dtype as ``numpy.dtype('f8', ...)`` plus a state that torch only sets on an
          allow-listed type. Numeric dtypes only, never ``object``; more than the two seen
          here because the count dtype follows the platform and logs may hold other types.
        * numpy's scalar reconstructor (``numpy.core.multiarray.scalar``):
          ``checkpoint['message_hub']['runtime_info']['eta']`` is a ``numpy.float64``.
    """
    from mmengine.logging import HistoryBuffer

    # Take numpy's reconstructors from what numpy itself pickles, so the module path that
    # the checkpoint names (numpy.core on numpy 1, numpy._core on numpy 2) comes with them.
    array_reconstruct = np.empty(0).__reduce__()[0]
    scalar_reconstruct = np.float64(0.0).__reduce__()[0]
    dtype_classes = [type(np.dtype(name)) for name in _NUMPY_DTYPES]
    return [
        HistoryBuffer,
        (history_buffer_getattr, 'builtins.getattr'),
        array_reconstruct,
        np.ndarray,
        np.dtype,
        *dtype_classes,
        scalar_reconstruct,
    ]


def history_buffer_getattr(obj: Any, name: str) -> Callable:
    """A ``getattr`` that only returns HistoryBuffer's statistics methods.

    Allow-listed under the name ``builtins.getattr``, so the weights-only unpickler calls
    it for the ``getattr(HistoryBuffer, 'mean')`` records of an mmengine checkpoint. The real
    ``getattr`` is never allow-listed: with it a pickle could walk from any allowed object to
    any attribute (``__class__``, ``__subclasses__``, ...) and reach code.

    Args:
        obj (Any): the object whose attribute the pickle asks for.
        name (str): the attribute name.

    Returns:
        Callable: ``HistoryBuffer.min``, ``.max``, ``.current`` or ``.mean``.

    Raises:
        pickle.UnpicklingError: for any other object or attribute.
    """
    from mmengine.logging import HistoryBuffer

    if obj is HistoryBuffer and name in _HISTORY_BUFFER_METHODS:
        return getattr(HistoryBuffer, name)
    raise pickle.UnpicklingError(
        f'getattr({obj!r}, {name!r}) is not allowed in a checkpoint: only the statistics '
        f'methods {_HISTORY_BUFFER_METHODS} of mmengine.logging.HistoryBuffer are.'
    )


def _weights_only_kwargs() -> Dict[str, bool]:
    """``torch.load`` keyword arguments that keep the weights-only unpickler on.

    ``weights_only=True`` is passed explicitly, so torch 2.4 and 2.5 (default False) are safe
    too. Two cases leave torch's own default in place: a torch without
    ``add_safe_globals`` (< 2.4; HistoryBuffer could not be allow-listed there), and
    ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` set by the user, torch's documented, explicit
    opt-out for a trusted file (torch warns when it applies).
    """
    if not _torch_has_safe_globals():
        return {}
    if os.environ.get('TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD', '0').lower() in _TRUE_VALUES:
        return {}
    return {'weights_only': True}


def _unsafe_globals_in(filename: str) -> List[str]:
    """Names of the globals in a checkpoint that are not allow-listed, read without loading.

    Uses ``torch.serialization.get_unsafe_globals_in_checkpoint`` (torch >= 2.5), which scans
    the pickle's opcodes and runs nothing. Returns an empty list where that is not available
    or the file is not in the zip format.
    """
    scan = getattr(torch.serialization, 'get_unsafe_globals_in_checkpoint', None)
    if scan is None:
        return []
    try:
        return sorted(scan(filename))
    except Exception:  # only used to enrich the error message
        return []


def _refusal_message(filename: str, error: Exception) -> str:
    """The message of :class:`UnsafeCheckpointError` for a file torch refused to unpickle."""
    names = _unsafe_globals_in(filename)
    detail = str(error)
    # Keep torch's own diagnosis (the part after "WeightsUnpickler error:"), not its advice
    # to set weights_only=False.
    match = re.search(
        r'WeightsUnpickler error:\s*(.*?)(?:\n\nCheck the documentation|$)', detail, re.S
    )
    if match:
        detail = match.group(1).strip()
    found = f' ({", ".join(names)})' if names else ''
    example = names[0] if names else 'the.module.Class'
    return (
        f'Refusing to load checkpoint {filename!r}: it holds objects that are not on the '
        f'allow-list of types a checkpoint may contain{found}. Unpickling them could run '
        'arbitrary code, so the file was not loaded and no code from it ran. '
        'Allowed are torch tensors and plain containers plus what mmengine itself writes '
        '(mmengine.logging.HistoryBuffer, numeric numpy arrays and scalars; see '
        'mmdet_anchorloss.engine.checkpoint.safe_checkpoint_globals). '
        'If you trust where the file comes from and the named objects are plain data '
        'types, allow-list them before loading with '
        f'torch.serialization.add_safe_globals([{example}]) (import it first); or, in a '
        'trusted environment, load it once with torch.load(path, weights_only=False) and '
        're-save only its tensors and plain data; setting TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 '
        'disables this check for a whole run and runs any code the file holds. '
        f'torch reported: {detail}'
    )


def load_from_local_safe(
    filename: str, map_location: Optional[Union[str, torch.device, Callable, Dict]] = None
) -> Any:
    """Load a local checkpoint with the weights-only unpickler and a clear refusal.

    Replaces ``mmengine.runner.checkpoint.load_from_local`` as the loader of local paths in
    :class:`mmengine.runner.CheckpointLoader` (same signature and behaviour otherwise).

    Args:
        filename (str): path of the checkpoint; ``~`` is expanded.
        map_location (str | torch.device | Callable | dict, optional): as in
            :func:`torch.load`. Defaults to None.

    Returns:
        Any: the loaded checkpoint, usually a dict (``meta``, ``state_dict``, ``optimizer``,
        ``message_hub``, ``param_schedulers``) or a bare state dict.

    Raises:
        FileNotFoundError: ``filename`` is not a file.
        UnsafeCheckpointError: the file holds objects outside the allow-list; it names the
            file, the objects, and how to proceed if the file is trusted.
    """
    filename = osp.expanduser(filename)
    if not osp.isfile(filename):
        raise FileNotFoundError(f'{filename} can not be found.')
    try:
        return torch.load(filename, map_location=map_location, **_weights_only_kwargs())
    except UnsafeCheckpointError:
        raise
    except pickle.UnpicklingError as error:
        raise UnsafeCheckpointError(_refusal_message(filename, error)) from error


def register_safe_checkpoint_globals() -> None:
    """Allow-list mmengine's checkpoint contents and install :func:`load_from_local_safe`.

    Idempotent; call it before loading a checkpoint (``mmdet_anchorloss`` does at import).
    On a torch without ``add_safe_globals`` (< 2.4) it does nothing: such a torch loads with
    ``weights_only=False`` by default and cannot be made safe this way.
    """
    global _registered
    if _registered or not _torch_has_safe_globals():
        return
    from mmengine.runner import CheckpointLoader

    torch.serialization.add_safe_globals(safe_checkpoint_globals())
    CheckpointLoader.register_scheme(prefixes='', loader=load_from_local_safe, force=True)
    _registered = True
