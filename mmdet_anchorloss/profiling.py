"""Count what a step dispatches: aten ops, and the ones that force a host sync on CUDA.

``count_ops()`` is a context manager that counts every aten op that reaches the dispatcher
(the kernels a step launches outside compiled regions, plus the ones that only make
views) and flags the ops that make the host wait for the device on CUDA:

- ``_local_scalar_dense`` (``.item()``, ``bool()``, ``int()``, ``float()``);
- ``nonzero``, ``masked_select``, ``unique*`` (the output size depends on the data);
- ``index`` / ``index_put_`` with a boolean mask;
- ``repeat_interleave`` without ``output_size``;
- ``Tensor.tolist()`` / ``Tensor.numpy()`` and copies to the CPU (seen through a
  ``TorchFunctionMode``, since on CPU they dispatch nothing);
- copies the other way that wait too: ``torch.tensor(values, device=...)`` (counted on
  any device, as a CUDA run makes them) and, on CUDA, ``.to('cuda')`` of a CPU tensor
  that is not pinned or not ``non_blocking`` (``sync_policy.upload`` makes neither).

Ops inside ``torch.compile``d regions are not counted (the counter sets
``ignore_compile_internals``, which torch 2.13 honours), and those regions run compiled.
Dynamo guards on the torch-function mode stack, so the first counted call of each compiled
function in a process recompiles it once: count a second step.

It runs on CPU as well as CUDA, so a test can hold the budget without a GPU: in a block
where every tensor is on the CPU, the CPU stands in for the device and every such op
counts. Once the block has dispatched an op on a device, a syncing op whose tensors are on
the host (``.item()`` of a CPU scalar, ``nonzero`` of a CPU mask) waits for nothing; it is
listed in ``host_reads``, not counted as a sync. Reads inside ``host_memory()`` (memory
that is the host's on every device: the CPU generator's state) are ``host_reads`` even in
a CPU-only block. On CUDA,
``torch.cuda.set_sync_debug_mode('error')`` is the runtime's own check of the same thing.

``stage(name)`` marks a step of the loss (anchors, assignment, sampling, ...) for
``torch.profiler``, so that a profile splits the step's host time by stage.
"""

import collections
import contextlib
import contextvars
import traceback
from typing import Counter, NamedTuple

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

_SYNC_PACKETS = {
    aten._local_scalar_dense,
    aten.nonzero,
    aten.masked_select,
    aten.unique_dim,
    aten._unique,
    aten._unique2,
    aten.unique_consecutive,
}
_SYNC_METHODS = {'tolist', 'numpy'}
_UPLOADS = {
    'tensor': 'torch.tensor',
    'as_tensor': 'torch.as_tensor',
    'new_tensor': 'Tensor.new_tensor',
}


def _is_cuda_target(target) -> bool:
    return target is not None and not isinstance(target, torch.dtype) and 'cuda' in str(target)


def _pageable_upload(src: torch.Tensor, kwargs: dict) -> bool:
    """A CPU tensor copied to CUDA from pageable memory, or without non_blocking: the host
    waits for the copy."""
    if src.device.type != 'cpu':
        return False
    return not (kwargs.get('non_blocking') and src.is_pinned())


def _host_data_to_device(name: str, args: tuple, kwargs: dict) -> bool:
    """``torch.tensor`` / ``as_tensor`` of host values with an explicit device, or
    ``Tensor.new_tensor`` of host values (on the device of the tensor)."""
    data = args[1 if name == 'new_tensor' else 0] if args else kwargs.get('data')
    if isinstance(data, torch.Tensor):
        return False
    return name == 'new_tensor' or kwargs.get('device') is not None


class OpCounts(NamedTuple):
    """What a counted region dispatched.

    Attributes:
        ops (int): aten ops dispatched (outside compiled regions).
        launches (int): of those, ops that are not views (a kernel launch each on CUDA,
            at most).
        syncs (int): ops that force a device-to-host sync on CUDA.
        sync_ops (Counter): the syncing ops by name.
        sync_sites (Counter): the syncing ops by ``op at file:line`` of the innermost frame
            of this package (or of the caller) that asked for them.
        by_op (Counter): every dispatched op by name.
        host_reads (Counter): by site, syncing ops on host tensors in a block that ran on a
            device, and reads inside ``host_memory()``: they wait for nothing (see the
            module doc).
    """

    ops: int
    launches: int
    syncs: int
    sync_ops: Counter
    sync_sites: Counter
    by_op: Counter
    host_reads: Counter


def _site(name: str) -> str:
    """``name at file:line`` of the innermost frame outside torch."""
    for frame in reversed(traceback.extract_stack()[:-3]):
        path = frame.filename.replace('\\', '/')
        if '/torch/' not in path and not path.endswith('profiling.py'):
            return f'{name} at {"/".join(path.split("/")[-2:])}:{frame.lineno}'
    return name


def _is_sync(func, args, kwargs) -> bool:
    packet = func.overloadpacket
    if packet in _SYNC_PACKETS:
        return True
    if packet in (aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_):
        indices = args[1] if len(args) > 1 else kwargs.get('indices', ())
        return any(
            isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices
        )
    if packet is aten.repeat_interleave:
        return func is aten.repeat_interleave.Tensor and kwargs.get('output_size') is None
    return False


def _on_host(args) -> bool:
    """True when the op's first tensor argument (or first tensor in a list) is on the CPU."""
    for a in args:
        if isinstance(a, (list, tuple)):
            a = next((t for t in a if isinstance(t, torch.Tensor)), None)
        if isinstance(a, torch.Tensor):
            return a.device.type == 'cpu'
    return True


def _is_view(func) -> bool:
    return bool(getattr(func, 'is_view', False)) or func.overloadpacket in (
        aten.detach,
        aten.view,
        aten._unsafe_view,
        aten.alias,
        aten.lift_fresh,
    )


class _DispatchCounter(TorchDispatchMode):
    def __init__(self, owner: 'count_ops') -> None:
        super().__init__()
        self.owner = owner

    @classmethod
    def ignore_compile_internals(cls) -> bool:
        # Compiled regions run compiled, and the ops inside them are not counted. Without
        # this, Dynamo skips every frame while a dispatch mode is on the stack: a
        # ``fullgraph=True`` function then raises, and ``MaybeCompiled`` falls back to
        # eager kernels for the rest of the process.
        return True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func.overloadpacket.__name__)
        self.owner.by_op[name] += 1
        if not _is_view(func):
            self.owner.launches += 1
        on_host = _on_host(args)
        if not on_host:
            self.owner.saw_device = True
        if _is_sync(func, args, kwargs):
            self.owner.record(name, on_host)
        return func(*args, **kwargs)


class _FunctionCounter(TorchFunctionMode):
    def __init__(self, owner: 'count_ops') -> None:
        super().__init__()
        self.owner = owner

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, '__name__', '')
        if name in _SYNC_METHODS:
            self.owner.record(f'Tensor.{name}', _on_host(args[:1]))
        elif name in ('cpu', 'to', 'cuda') and args and isinstance(args[0], torch.Tensor):
            src = args[0]
            target = args[1] if len(args) > 1 else kwargs.get('device')
            if name == 'cpu' or (target is not None and str(target) == 'cpu'):
                if src.device.type != 'cpu':
                    self._count(f'Tensor.{name}')
            elif (name == 'cuda' or _is_cuda_target(target)) and _pageable_upload(src, kwargs):
                self._count(f'Tensor.{name}(cuda)')  # a synchronous copy from pageable memory
        elif name in _UPLOADS and _host_data_to_device(name, args, kwargs):
            # torch.tensor(host values, device=...): on CUDA a synchronous copy from pageable
            # memory. Counted whatever the device, so that a CPU run counts a CUDA step's.
            self._count(f'{_UPLOADS[name]}(host data, device)')
        return func(*args, **kwargs)

    def _count(self, what: str) -> None:
        self.owner.record(what, on_host=False)


_HOST_MEMORY = contextvars.ContextVar('anchorloss_host_memory', default=False)


@contextlib.contextmanager
def host_memory():
    """Mark a block whose tensor reads are of host memory on every device (the CPU
    generator's state): ``count_ops`` lists them in ``host_reads``, never as syncs, also
    where the CPU stands in for the device. Costs a context variable, counted or not."""
    token = _HOST_MEMORY.set(True)
    try:
        yield
    finally:
        _HOST_MEMORY.reset(token)


class count_ops:  # noqa: N801 (used as a context manager, like torch's modes)
    """Count dispatched aten ops and CUDA host syncs inside a ``with`` block.

    Example:
        >>> with count_ops() as counter:
        ...     loss = head.loss_by_feat(...); sum(...).backward()
        >>> counter.result().syncs
    """

    def __init__(self) -> None:
        self.by_op: Counter = collections.Counter()
        self.sync_ops: Counter = collections.Counter()
        self.sync_sites: Counter = collections.Counter()
        self.launches = 0
        self.saw_device = False  # an op ran on a device (not the CPU) inside the block
        self._host: list = []  # (op, site) of syncing ops on host tensors, in order
        self._host_memory: Counter = collections.Counter()  # by site, inside host_memory()
        self._modes = (_FunctionCounter(self), _DispatchCounter(self))

    def record(self, what: str, on_host: bool) -> None:
        """Note a syncing op; one on host tensors is decided at ``result()``."""
        site = _site(what)
        if on_host and _HOST_MEMORY.get():
            self._host_memory[site] += 1
        elif on_host:
            self._host.append((what, site))
        else:
            self.sync_ops[what] += 1
            self.sync_sites[site] += 1

    def __enter__(self) -> 'count_ops':
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)

    def result(self) -> OpCounts:
        sync_ops = collections.Counter(self.sync_ops)
        sync_sites = collections.Counter(self.sync_sites)
        host_reads: Counter = collections.Counter(self._host_memory)
        for what, site in self._host:
            if self.saw_device:  # the host's own data: nothing to wait for
                host_reads[site] += 1
            else:  # the CPU stands in for the device
                sync_ops[what] += 1
                sync_sites[site] += 1
        return OpCounts(
            ops=sum(self.by_op.values()),
            launches=self.launches,
            syncs=sum(sync_ops.values()),
            sync_ops=sync_ops,
            sync_sites=sync_sites,
            by_op=collections.Counter(self.by_op),
            host_reads=host_reads,
        )


STAGE_PREFIX = 'anchorloss/'


def stage(name: str):
    """A ``torch.profiler.record_function`` range ``anchorloss/<name>`` while a profiler
    records; otherwise nothing.

    Outside a profile a range would cost two dispatched ops and a few microseconds each, so
    none is opened: the launch budget and the timings see no difference.
    """
    if getattr(torch.autograd.profiler, '_is_profiler_enabled', False):
        return torch.profiler.record_function(STAGE_PREFIX + name)
    return contextlib.nullcontext()
