"""Measure one side of one case: time, peak memory, dispatched ops, and on CUDA the kernels.

Everything here runs inside a worker process (``benchmark.worker``) that holds one head.
"""

import ctypes
import gc
import hashlib
import os
import re
import resource
import statistics
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, Iterable, List, NamedTuple, Optional, Sequence

import torch

from ..core.randperm_replay import replay_matches_torch
from ..kernels.sync_policy import cuda_sync_policy
from ..profiling import STAGE_PREFIX, count_ops
from .cases import CASES, Case, Inputs, autocast, build_head, make_inputs

PHASES = ('assign', 'fwd', 'bwd', 'fwd_bwd')
FLOOR_REPEATS = 5
PROFILE_ROWS = 10
TOP_OPS = 15
# The classification loss's kernels, by name (profiler kernel names are demangled C++ or
# Triton function names): mmcv's focal-loss kernels (upstream RetinaNet on CUDA), torch's
# kernels whose names carry binary_cross_entropy / log_sigmoid (upstream RPN; torch builds
# BCE-with-logits partly from generic elementwise kernels, which are not matched, so
# upstream's figure is a lower bound) and softmax / log_softmax / nll_loss (upstream SSD),
# the plugin's hand-written Triton kernels, and every inductor kernel (``triton_...``: on
# CUDA the plugin compiles its focal/BCE and softmax kernels, and the assigner's small
# (B, N) finalize step).
CLS_KERNEL_PATTERN = re.compile(
    r'(?i)sigmoid_focal_loss|softmax_focal_loss|binary_cross_entropy|log_sigmoid'
    r'|softmax|nll_loss|_sigmoid_level_kernel|_softmax_ce_|^triton_'
)
# CUDA runtime and driver calls that launch a kernel, as torch.profiler names them.
LAUNCH_CALLS = ('cudaLaunchKernel', 'cudaLaunchKernelExC', 'cuLaunchKernel', 'cuLaunchKernelEx')


class WorkerOptions(NamedTuple):
    """What one worker runs: one side of one case, and how."""

    case: str
    side: str
    device: str = 'cpu'
    repeats: int = 3
    warmup: int = 1
    seed: int = 0
    quick: bool = False
    threads: Optional[int] = None
    profile: bool = False


def synchronize(device: str) -> None:
    """Wait for the device's queued work (CUDA); nothing on the CPU."""
    if device == 'cuda':
        torch.cuda.synchronize()


def timed(fn: Callable, device: str):
    """(result of ``fn()``, seconds), synchronised on both ends."""
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return out, time.perf_counter() - start


def total_loss(losses: dict) -> torch.Tensor:
    """Sum of every entry of a ``loss_by_feat`` dict (lists of 0-d or (1,) tensors)."""
    return sum(sum(v) if isinstance(v, (list, tuple)) else v for v in losses.values()).sum()


class Bench(NamedTuple):
    """A built head and its inputs: what every measurement takes."""

    head: torch.nn.Module
    case: Case
    side: str
    inputs: Inputs
    seed: int
    device: str

    def assign(self):
        """Target assignment alone: upstream ``get_anchors`` + ``get_targets``, plugin
        ``batch_targets``."""
        torch.manual_seed(self.seed)
        inputs, device = self.inputs, self.device
        with autocast(self.case, device):
            if self.side == 'plugin':
                return self.head.batch_targets(
                    inputs.featmap_sizes, inputs.gts, inputs.metas, None, device=device
                )
            anchors, valid = self.head.get_anchors(
                inputs.featmap_sizes, inputs.metas, device=device
            )
            return self.head.get_targets(anchors, valid, inputs.gts, inputs.metas, None)

    def forward(self) -> dict:
        """``loss_by_feat`` (under autocast for a half case), with fresh gradients."""
        for x in self.inputs.cls_scores + self.inputs.bbox_preds:
            x.grad = None
        torch.manual_seed(self.seed)
        inputs = self.inputs
        with autocast(self.case, self.device):
            return self.head.loss_by_feat(
                inputs.cls_scores, inputs.bbox_preds, inputs.gts, inputs.metas
            )

    def step(self) -> dict:
        """One fwd+bwd with no synchronisation added: what the counters see."""
        losses = self.forward()
        total_loss(losses).backward()
        return losses


class Step(NamedTuple):
    """One call of each phase: seconds, and the losses of the forward."""

    assign: float
    fwd: float
    bwd: float
    losses: Optional[dict]


def run_step(bench: Bench, with_assign: bool = True) -> Step:
    """Time assignment (unless ``with_assign`` is False: 0), ``loss_by_feat`` and
    ``backward`` once, with fresh gradients."""
    t_assign = 0.0
    if with_assign:
        targets, t_assign = timed(bench.assign, bench.device)
        del targets
    losses, t_fwd = timed(bench.forward, bench.device)
    _, t_bwd = timed(total_loss(losses).backward, bench.device)
    return Step(t_assign, t_fwd, t_bwd, losses)


def rss_kb(field: str = 'VmRSS') -> Optional[int]:
    """A ``/proc/self/status`` memory field in kB (None where there is no procfs)."""
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith(field + ':'):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def trim_host_heap() -> bool:
    """Give the C heap's free pages back to the system (glibc's ``malloc_trim``), so that
    the resident set holds live data only; False where there is no glibc."""
    try:
        ctypes.CDLL('libc.so.6').malloc_trim(0)
    except (OSError, AttributeError):
        return False
    return True


def reset_peak_rss() -> bool:
    """Reset the kernel's resident-set high-water mark (Linux >= 4.0); False if not possible."""
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
        return True
    except OSError:
        return False


class MemoryProbe:
    """Peak memory of a window above a base taken right after the inputs are built.

    On CUDA ``max_memory_allocated`` in the window minus the allocation at the base; on CPU
    the peak resident set in the window (the kernel's high-water mark, reset through
    ``/proc/self/clear_refs``, else ``ru_maxrss``) minus the resident set at the base.

    On CPU that peak also holds what the warm-up left resident: the inputs' gradients, the
    libraries a side loads on its first call (``torch.compile``'s inductor, some 200 MB),
    and the C heap's free pages. So the window also starts from the heap trimmed
    (``malloc_trim``), and ``step_peak_mb`` is the window's peak above that resident set:
    what the steps themselves add. ``resident_after_warmup_mb`` is what the warm-up left.
    """

    def __init__(self, device: str) -> None:
        self.device = device
        gc.collect()
        if device == 'cuda':
            self.base_mb = torch.cuda.memory_allocated() / 2**20
        else:  # trimmed here too, so that both resident sets hold live data only
            trim_host_heap()
            self.base_mb = (rss_kb() or 0) / 1024
        self.window_reset = False
        self.window_base_mb = self.base_mb  # CPU: the resident set where the window starts
        self.trimmed = False

    def start_window(self) -> None:
        """Start the measured window (after the warm-up)."""
        gc.collect()
        if self.device == 'cuda':
            torch.cuda.reset_peak_memory_stats()
            self.window_reset = True
        else:
            self.trimmed = trim_host_heap()
            self.window_base_mb = (rss_kb() or 0) / 1024
            self.window_reset = reset_peak_rss()

    def result(self) -> dict:
        """Peak MB above the inputs in the window (and over the whole process, on CPU)."""
        if self.device == 'cuda':
            peak = torch.cuda.max_memory_allocated() / 2**20
            return dict(
                kind='CUDA max_memory_allocated above the inputs',
                base_mb=self.base_mb,
                peak_mb=peak - self.base_mb,
                peak_incl_first_call_mb=None,
            )
        ru_maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        hwm = rss_kb('VmHWM')
        window = hwm / 1024 if self.window_reset and hwm is not None else ru_maxrss
        return dict(
            kind='CPU peak RSS above the RSS after the inputs'
            + ('' if self.window_reset else ' (ru_maxrss, first call included)'),
            base_mb=self.base_mb,
            peak_mb=window - self.base_mb,
            peak_incl_first_call_mb=ru_maxrss - self.base_mb,
            step_peak_mb=window - self.window_base_mb if self.window_reset else None,
            resident_after_warmup_mb=self.window_base_mb - self.base_mb,
            heap_trimmed=self.trimmed,
        )


def logits_floor(inputs: Inputs, device: str, repeats: int = FLOOR_REPEATS) -> dict:
    """Median seconds of ``torch.sigmoid`` over a tensor the size (and dtype) of all cls
    logits: one elementwise pass."""
    numel = sum(x.numel() for x in inputs.cls_scores)
    x = torch.randn(numel, device=device, dtype=inputs.cls_scores[0].dtype)
    times = []
    for _ in range(repeats + 1):
        out, seconds = timed(lambda: torch.sigmoid(x), device)
        del out
        times.append(seconds)
    return dict(op='torch.sigmoid', numel=numel, seconds=statistics.median(times[1:]))


def compiled_graphs() -> int:
    """Graphs torch.compile has captured so far in this process."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return 0
    return int(counters['stats']['unique_graphs'])


def count_step(bench: Bench) -> dict:
    """Dispatched aten ops, launches and CUDA host syncs of one fwd+bwd (``count_ops``).

    The step takes CUDA's choices of where to read back (``cuda_sync_policy``) on either
    device, so that a CPU run counts what a CUDA step makes. Counted on the second of two
    steps run under the counter, so that a recompilation the counting modes may cause is
    not counted.
    """
    with cuda_sync_policy():
        for _ in range(2):
            graphs = compiled_graphs()
            with count_ops() as counter:
                bench.step()
    counts = counter.result()
    return dict(
        ops=counts.ops,
        launches=counts.launches,
        syncs=counts.syncs,
        sync_ops=dict(counts.sync_ops),
        sync_sites=dict(counts.sync_sites),  # op at file:line, to find each one
        host_reads=dict(counts.host_reads),  # on host tensors in a device step: no sync
        top_ops=dict(counts.by_op.most_common(TOP_OPS)),
        graphs_compiled=compiled_graphs() - graphs,
        sync_policy='cuda',
    )


def _device_time_us(event) -> float:
    """An averaged profiler event's own device time (µs), across torch versions."""
    for name in ('self_device_time_total', 'self_cuda_time_total'):
        if hasattr(event, name):
            return float(getattr(event, name))
    return 0.0


def kernel_summary(events: Iterable) -> dict:
    """Kernels, launch calls, syncs and the classification loss's kernel time of one step.

    Args:
        events (Iterable): ``torch.profiler``'s averaged events (``key_averages()``): the
            device's kernels (``device_type`` CUDA, one row per kernel name) and the host's
            ops and CUDA runtime / driver calls.
    """
    kernels, calls = {}, {}
    for e in events:
        if str(e.device_type).endswith('CUDA'):
            # not kernels: copies, and the ranges of ``record_function`` (the plugin's
            # stages) that the profiler also lays on the device's timeline
            annotation = getattr(e, 'is_user_annotation', False) or e.key.startswith(STAGE_PREFIX)
            if not (annotation or e.key.startswith(('Memcpy', 'Memset'))):
                kernels[e.key] = (e.count, _device_time_us(e) / 1e3)
        else:
            calls[e.key] = calls.get(e.key, 0) + e.count
    matched = {k: v for k, v in kernels.items() if CLS_KERNEL_PATTERN.search(k)}
    top = sorted(matched.items(), key=lambda kv: -kv[1][1])[:PROFILE_ROWS]
    return dict(
        kernels=sum(n for n, _ in kernels.values()),
        kernel_ms=sum(ms for _, ms in kernels.values()),
        launch_calls=sum(calls.get(name, 0) for name in LAUNCH_CALLS),
        stream_syncs=calls.get('cudaStreamSynchronize', 0),
        device_syncs=calls.get('cudaDeviceSynchronize', 0),  # 1 is the tool's own
        cls_kernel_ms=sum(ms for _, ms in matched.values()),
        cls_kernel_pattern=CLS_KERNEL_PATTERN.pattern,
        cls_kernels=[dict(name=k[:120], calls=n, ms=ms) for k, (n, ms) in top],
    )


def cuda_kernel_profile(bench: Bench) -> dict:
    """One fwd+bwd under ``torch.profiler`` on CUDA: ``kernel_summary`` of it."""
    from torch.profiler import ProfilerActivity, profile

    bench.step()  # allocator and autotuning settle before the profiled step
    synchronize(bench.device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        bench.step()
        synchronize(bench.device)
    return kernel_summary(prof.key_averages())


def profile_step(bench: Bench) -> dict:
    """One fwd+bwd (no separate assignment) under ``torch.profiler``: the top ops by self
    time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    sort_by = 'self_cpu_time_total'
    if bench.device == 'cuda':
        activities.append(ProfilerActivity.CUDA)
        sort_by = 'self_cuda_time_total'
    with profile(activities=activities) as prof:
        run_step(bench, with_assign=False)
    events = prof.key_averages()
    table = events.table(sort_by=sort_by, row_limit=PROFILE_ROWS, max_name_column_width=60)
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:PROFILE_ROWS]
    rows = [
        dict(
            name=e.key,
            calls=e.count,
            self_cpu_ms=e.self_cpu_time_total / 1e3,
            cpu_total_ms=e.cpu_time_total / 1e3,
        )
        for e in top
    ]
    total_ms = sum(e.self_cpu_time_total for e in events) / 1e3
    # the plugin's stages (``profiling.stage``): host time from each range's start to end,
    # and the part of it spent outside any op (Python, Triton's launcher, waiting)
    stages = [
        dict(
            name=e.key[len(STAGE_PREFIX) :],
            calls=e.count,
            cpu_total_ms=e.cpu_time_total / 1e3,
            self_cpu_ms=e.self_cpu_time_total / 1e3,
        )
        for e in events
        if e.key.startswith(STAGE_PREFIX)
    ]
    return dict(sort_by=sort_by, table=table, top=rows, total_self_cpu_ms=total_ms, stages=stages)


def plain_losses(losses: dict) -> Dict[str, List[float]]:
    """``loss_by_feat``'s dict as floats, per key and per entry (level, or image for SSD)."""
    return {
        k: [float(t.detach().float().sum()) for t in (v if isinstance(v, (list, tuple)) else [v])]
        for k, v in losses.items()
    }


def compile_info(fallbacks: Sequence[warnings.WarningMessage]) -> dict:
    """Whether torch.compile ran in this process, and the plugin's eager fallbacks if any."""
    return dict(
        env=os.environ.get('MMDET_ANCHORLOSS_COMPILE', 'auto'),
        graphs_compiled=compiled_graphs(),
        fallback_warnings=[
            str(w.message) for w in fallbacks if 'mmdet_anchorloss' in str(w.message)
        ],
    )


def source_fingerprint() -> dict:
    """Which plugin code this process imported: its path and a hash of its sources."""
    package = Path(__file__).resolve().parents[1]
    digest = hashlib.sha1()
    for path in sorted(package.rglob('*.py')):
        digest.update(str(path.relative_to(package)).encode() + path.read_bytes())
    return dict(sources_sha1=digest.hexdigest()[:12], package=str(package))


def run_worker(opts: WorkerOptions) -> dict:
    """Measure one side of one case; the record the orchestrator collects."""
    case, device = CASES[opts.case], opts.device
    if opts.threads:
        torch.set_num_threads(opts.threads)
    head = build_head(case, opts.side, device)
    inputs = make_inputs(head, case, opts.quick, opts.seed, device)
    bench = Bench(head, case, opts.side, inputs, opts.seed, device)
    probe = MemoryProbe(device)
    with warnings.catch_warnings(record=True) as fallbacks:
        warnings.simplefilter('always')
        first = run_step(bench)
    losses = plain_losses(first.losses)
    grad_norms = [float(x.grad.float().norm()) for x in inputs.cls_scores + inputs.bbox_preds]
    for _ in range(opts.warmup - 1):
        run_step(bench)
    graphs_before = compiled_graphs()
    probe.start_window()
    steps = [run_step(bench)._replace(losses=None) for _ in range(opts.repeats)]
    memory = probe.result()
    times = {phase: [getattr(s, phase) for s in steps] for phase in ('assign', 'fwd', 'bwd')}
    times['fwd_bwd'] = [s.fwd + s.bwd for s in steps]
    record = dict(
        side=opts.side,
        head=type(head).__name__,
        loss_cls=type(head.loss_cls).__name__ if hasattr(head, 'loss_cls') else None,
        assigner=type(head.assigner).__name__,
        dtype=case.dtype,
        num_anchors_per_image=sum(
            h * w * a
            for (h, w), a in zip(inputs.featmap_sizes, head.prior_generator.num_base_anchors)
        ),
        featmap_sizes=inputs.featmap_sizes,
        times=times,
        median={phase: statistics.median(v) for phase, v in times.items()},
        min={phase: min(v) for phase, v in times.items()},
        # The first call of the process, which holds torch.compile's tracing and codegen.
        first_call=dict(
            assign=first.assign, fwd=first.fwd, bwd=first.bwd, fwd_bwd=first.fwd + first.bwd
        ),
        memory=memory,
        losses=losses,
        grad_norms=grad_norms,
        compile=compile_info(fallbacks),
        graphs_compiled_during_timing=compiled_graphs() - graphs_before,
        counts=count_step(bench),
        num_threads=torch.get_num_threads(),
        # RandomSampler's draws: replayed, or torch.randperm where this torch differs
        randperm_replayed=replay_matches_torch(),
        source=source_fingerprint(),
        floor=logits_floor(inputs, device),
    )
    if device == 'cuda':
        record['cuda'] = cuda_kernel_profile(bench)
    if opts.profile:
        record['profile'] = profile_step(bench)
    return record
