"""Benchmark the anchor-head loss: mmdet's heads against their mmdet_anchorloss twins.

For each case, the upstream head and its plugin twin are built from the same mmdet config
(the shipped RetinaNet R-50 FPN, Faster R-CNN RPN and SSD300 configs, with their
``train_cfg``) and fed the same random predictions and ground truth, at the real feature-map
sizes of the input. Each side runs in its own subprocess (this script with ``--worker``),
one at a time, so that each has its own peak memory and the machine holds one side's
tensors at once. Timed separately, median of ``--repeats`` after ``--warmup`` calls (the
first call, which holds the plugin's ``torch.compile``, is reported on its own):

- ``assign``: target assignment; upstream ``get_anchors`` + ``get_targets``, plugin
  ``batch_targets``;
- ``fwd``: ``loss_by_feat`` (assignment included, as in training);
- ``bwd``: ``backward()`` of the sum of the losses;
- ``fwd+bwd``: their sum per repeat.

Peak memory is above the inputs: on CUDA ``max_memory_allocated`` during the timed repeats
minus the allocation after the inputs are built; on CPU the peak resident set during the
timed repeats (the kernel's high-water mark, reset after the warm-up through
``/proc/self/clear_refs``, else ``ru_maxrss``) minus the resident set after the inputs are
built. The floor is one elementwise pass (``torch.sigmoid``) over a tensor the size of all
classification logits; the plugin's fwd+bwd is also given in those passes. The two sides'
losses must agree per key and per level (rtol 1e-4); the RPN's ``RandomSampler`` sees the
same torch seed on both sides.

The workers import a copy of the plugin package taken at the start of the run (others may
edit it meanwhile; ``--no-snapshot`` uses the live tree); each record carries a hash of the
sources it ran. On a shared CPU, give ``--threads 1``: when other work holds a core, two
OpenMP threads wait on each other at every op, and upstream's many small ops slow down many
times over. ``--profile`` adds one profiled fwd+bwd per side (top ops by self time).

Writes the results to ``--out`` (JSON, with the machine) and a markdown copy of the tables
next to it (``.md``); each worker's output goes to ``logs/`` beside them.

Example::

    python tools/benchmark_loss.py --device cpu --out work_dirs/bench/benchmark.json
    python tools/benchmark_loss.py --threads 1 --cases retina-b8-g10 --repeats 5 --profile
    python tools/benchmark_loss.py --quick --cases retina-b2-g10 --repeats 1
"""

import argparse
import copy
import gc
import hashlib
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import mmcv
import mmdet
import torch
from mmdet.registry import MODELS
from mmdet.utils import register_all_modules
from mmengine.config import Config
from mmengine.structures import InstanceData
from tqdm import tqdm

import mmdet_anchorloss  # registers the plugin classes

SIDES = ('upstream', 'plugin')
PHASES = ('assign', 'fwd', 'bwd', 'fwd_bwd')
LOSS_RTOL = 1e-4
FLOOR_REPEATS = 5
PROFILE_ROWS = 10
# Plugin twins of the upstream types in a head config.
PLUGIN_TYPES = mmdet_anchorloss.PLUGIN_TWINS


class Case(NamedTuple):
    """One benchmark case: a shipped mmdet config, a batch size and gts per image."""

    name: str
    config: str  # relative to mmdet's shipped configs (mmdet/.mim/configs)
    head_key: str  # the head's key in ``model``
    train_cfg_key: Optional[str]  # ``model.train_cfg[key]`` (two-stage), None: ``train_cfg``
    batch_size: int
    num_gts: int
    img_shape: Tuple[int, int]  # (h, w) of every image before padding
    pad_divisor: int


RETINA = 'retinanet/retinanet_r50_fpn_1x_coco.py'
FASTER = 'faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py'
SSD300 = 'ssd/ssd300_coco.py'
CASES: Dict[str, Case] = {
    c.name: c
    for c in (
        Case('retina-b2-g10', RETINA, 'bbox_head', None, 2, 10, (800, 1333), 32),
        Case('retina-b2-g100', RETINA, 'bbox_head', None, 2, 100, (800, 1333), 32),
        Case('retina-b8-g10', RETINA, 'bbox_head', None, 8, 10, (800, 1333), 32),
        Case('retina-b8-g100', RETINA, 'bbox_head', None, 8, 100, (800, 1333), 32),
        Case('rpn-b8-g10', FASTER, 'rpn_head', 'rpn', 8, 10, (800, 1333), 32),
        Case('ssd-b32-g10', SSD300, 'bbox_head', None, 32, 10, (300, 300), 1),
    )
}
# --quick: images a quarter of the size on each side (SSD300's feature maps are fixed by its
# anchor generator, so its batch shrinks instead), for tests and smoke runs.
QUICK_SCALE = 4
QUICK_SSD_BATCH = 4


def parse_args(argv=None) -> argparse.Namespace:
    """Parse the command line (the orchestrator's, or a worker's with ``--worker``)."""
    parser = argparse.ArgumentParser(
        description='Time and measure the anchor-head loss, upstream mmdet vs mmdet_anchorloss.'
    )
    parser.add_argument(
        '--cases',
        nargs='+',
        choices=sorted(CASES),
        default=list(CASES),
        metavar='CASE',
        help=f'cases to run (default: all): {", ".join(CASES)}',
    )
    parser.add_argument('--device', default='cpu', choices=['cpu', 'cuda'])
    parser.add_argument('--repeats', type=int, default=3, help='timed repeats (median)')
    parser.add_argument(
        '--warmup',
        type=int,
        default=1,
        help='untimed calls before the repeats (at least 1; the first holds torch.compile)',
    )
    parser.add_argument('--out', default='work_dirs/bench/benchmark.json', help='JSON output')
    parser.add_argument('--quick', action='store_true', help='smaller inputs (tests, smoke)')
    parser.add_argument('--seed', type=int, default=0, help='seed of the random inputs')
    parser.add_argument(
        '--profile',
        action='store_true',
        help=f'profile one more fwd+bwd per side with torch.profiler; print the top '
        f'{PROFILE_ROWS} ops by self time',
    )
    parser.add_argument(
        '--threads', type=int, help="torch threads per worker (default: torch's default)"
    )
    parser.add_argument(
        '--no-snapshot',
        action='store_true',
        help='workers import the live package (default: a copy taken at the start of the run)',
    )
    parser.add_argument('--worker', choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument('--result-file', help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup < 1:
        parser.error('--repeats and --warmup must be at least 1')
    if args.worker and (len(args.cases) != 1 or not args.result_file):
        parser.error('--worker needs exactly one case and --result-file')
    return args


# --------------------------------------------------------------------------------------------
# Configs and inputs (worker side).
# --------------------------------------------------------------------------------------------


def mmdet_config_dir() -> Path:
    """mmdet's shipped configs (``mmdet/.mim/configs``)."""
    path = Path(mmdet.__file__).parent / '.mim' / 'configs'
    if not path.is_dir():
        raise FileNotFoundError(f'mmdet ships no configs at {path}; reinstall mmdet with pip.')
    return path


def head_config(case: Case) -> dict:
    """The upstream head config of ``case``, its ``train_cfg`` merged in (as detectors do)."""
    model = Config.fromfile(str(mmdet_config_dir() / case.config)).model
    head = copy.deepcopy(model[case.head_key].to_dict())
    train_cfg = model.train_cfg[case.train_cfg_key] if case.train_cfg_key else model.train_cfg
    head['train_cfg'] = copy.deepcopy(train_cfg.to_dict())
    return head


def plugin_config(cfg: dict) -> dict:
    """The plugin twin of an upstream head config: head, losses, assigner and coder swapped."""
    cfg = copy.deepcopy(cfg)
    parts = [cfg, cfg.get('loss_cls'), cfg.get('loss_bbox'), cfg['train_cfg']['assigner']]
    parts.append(cfg['bbox_coder'])
    for part in parts:
        if part is not None and part['type'] in PLUGIN_TYPES:
            part['type'] = PLUGIN_TYPES[part['type']]
    return cfg


def build_head(case: Case, side: str, device: str):
    """The upstream head of ``case`` or its plugin twin, on ``device``."""
    register_all_modules()
    cfg = head_config(case)
    if side == 'plugin':
        cfg = plugin_config(cfg)
    return MODELS.build(cfg).to(device)


class Inputs(NamedTuple):
    """``loss_by_feat``'s arguments; the prediction maps are leaf tensors."""

    cls_scores: list  # L tensors (B, A_l * C, H_l, W_l), requires_grad
    bbox_preds: list  # L tensors (B, A_l * 4, H_l, W_l), requires_grad
    gts: list  # B InstanceData, bboxes (G, 4), labels (G,)
    metas: list  # B dicts
    featmap_sizes: list  # L (H_l, W_l)


def case_geometry(case: Case, quick: bool) -> Tuple[int, Tuple[int, int], Tuple[int, int]]:
    """(batch size, img_shape, padded batch shape) of ``case``."""
    batch, (h, w) = case.batch_size, case.img_shape
    if quick and case.pad_divisor == 1:  # SSD300: fixed input size, so a smaller batch
        batch = min(batch, QUICK_SSD_BATCH)
    elif quick:
        h, w = h // QUICK_SCALE, w // QUICK_SCALE
    d = case.pad_divisor
    return batch, (h, w), (-(-h // d) * d, -(-w // d) * d)


def random_boxes(n: int, h: int, w: int, gen) -> torch.Tensor:
    """(n, 4) boxes inside an h x w image; sides log-uniform in [8, 0.8 min(h, w)]."""
    lo, hi = torch.log(torch.tensor(8.0)), torch.log(torch.tensor(0.8 * min(h, w)))
    wh = torch.exp(lo + torch.rand(n, 2, generator=gen) * (hi - lo))
    x1 = torch.rand(n, generator=gen) * (w - wh[:, 0])
    y1 = torch.rand(n, generator=gen) * (h - wh[:, 1])
    return torch.stack([x1, y1, x1 + wh[:, 0], y1 + wh[:, 1]], dim=1)


def featmap_sizes(strides: Sequence[Tuple[int, int]], pad_shape: Tuple[int, int]) -> list:
    """(H_l, W_l) per level for a padded (h, w) input: ceil(h / stride), as the backbones give.

    Args:
        strides (Sequence[tuple]): (stride_w, stride_h) per level, as the anchor generators
            store them.
        pad_shape (tuple): (h, w) of the padded batch.
    """
    h, w = pad_shape
    return [(-(-h // sh), -(-w // sw)) for sw, sh in strides]


def make_inputs(head, case: Case, quick: bool, seed: int, device: str) -> Inputs:
    """Random predictions (at the real feature-map sizes) and ground truth for ``case``.

    Generated on the CPU from ``seed``, so both sides (and both devices) see the same values.
    """
    gen = torch.Generator().manual_seed(seed)
    batch, img_shape, pad_shape = case_geometry(case, quick)
    metas = [
        dict(
            img_id=i,
            img_shape=img_shape,
            ori_shape=img_shape,
            pad_shape=pad_shape,
            batch_input_shape=pad_shape,
            scale_factor=(1.0, 1.0),
        )
        for i in range(batch)
    ]
    gts = []
    for _ in range(batch):
        boxes = random_boxes(case.num_gts, *img_shape, gen)
        labels = torch.randint(0, head.num_classes, (case.num_gts,), generator=gen)
        gts.append(InstanceData(bboxes=boxes.to(device), labels=labels.to(device)))
    sizes = featmap_sizes(head.prior_generator.strides, pad_shape)
    cls_scores, bbox_preds = [], []
    for (fh, fw), a in zip(sizes, head.prior_generator.num_base_anchors):
        cls = torch.randn(batch, a * head.cls_out_channels, fh, fw, generator=gen) * 2 - 2
        reg = torch.randn(batch, a * 4, fh, fw, generator=gen) * 0.5
        cls_scores.append(cls.to(device).requires_grad_())
        bbox_preds.append(reg.to(device).requires_grad_())
    return Inputs(cls_scores, bbox_preds, gts, metas, sizes)


# --------------------------------------------------------------------------------------------
# Timing and memory (worker side).
# --------------------------------------------------------------------------------------------


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


class Step(NamedTuple):
    """One call of each phase: seconds, and the losses of the forward."""

    assign: float
    fwd: float
    bwd: float
    losses: dict


def run_step(
    head, side: str, inputs: Inputs, seed: int, device: str, with_assign: bool = True
) -> Step:
    """Time assignment (unless ``with_assign`` is False: 0), ``loss_by_feat`` and
    ``backward`` once, with fresh gradients."""
    maps = inputs.cls_scores + inputs.bbox_preds
    for x in maps:
        x.grad = None

    def assign():
        torch.manual_seed(seed)
        if side == 'plugin':
            return head.batch_targets(
                inputs.featmap_sizes, inputs.gts, inputs.metas, None, device=device
            )
        anchors, valid = head.get_anchors(inputs.featmap_sizes, inputs.metas, device=device)
        return head.get_targets(anchors, valid, inputs.gts, inputs.metas, None)

    def forward():
        torch.manual_seed(seed)
        return head.loss_by_feat(inputs.cls_scores, inputs.bbox_preds, inputs.gts, inputs.metas)

    t_assign = 0.0
    if with_assign:
        targets, t_assign = timed(assign, device)
        del targets
    losses, t_fwd = timed(forward, device)
    total = total_loss(losses)
    _, t_bwd = timed(total.backward, device)
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


def reset_peak_rss() -> bool:
    """Reset the kernel's resident-set high-water mark (Linux >= 4.0); False if not possible."""
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
        return True
    except OSError:
        return False


class MemoryProbe:
    """Peak memory of a window above a base taken right after the inputs are built."""

    def __init__(self, device: str) -> None:
        self.device = device
        gc.collect()
        if device == 'cuda':
            self.base_mb = torch.cuda.memory_allocated() / 2**20
        else:
            self.base_mb = (rss_kb() or 0) / 1024
        self.window_reset = False

    def start_window(self) -> None:
        """Start the measured window (after the warm-up)."""
        gc.collect()
        if self.device == 'cuda':
            torch.cuda.reset_peak_memory_stats()
            self.window_reset = True
        else:
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
        )


def logits_floor(inputs: Inputs, device: str, repeats: int = FLOOR_REPEATS) -> dict:
    """Median seconds of ``torch.sigmoid`` over a tensor the size of all cls logits."""
    numel = sum(x.numel() for x in inputs.cls_scores)
    x = torch.randn(numel, device=device)
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


def profile_step(head, side: str, inputs: Inputs, seed: int, device: str) -> dict:
    """One fwd+bwd (no separate assignment) under ``torch.profiler``: the top ops by self
    time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    sort_by = 'self_cpu_time_total'
    if device == 'cuda':
        activities.append(ProfilerActivity.CUDA)
        sort_by = 'self_cuda_time_total'
    with profile(activities=activities) as prof:
        run_step(head, side, inputs, seed, device, with_assign=False)
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
    return dict(sort_by=sort_by, table=table, top=rows, total_self_cpu_ms=total_ms)


def plain_losses(losses: dict) -> Dict[str, List[float]]:
    """``loss_by_feat``'s dict as floats, per key and per entry (level, or image for SSD)."""
    return {
        k: [float(t.detach().sum()) for t in (v if isinstance(v, (list, tuple)) else [v])]
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


def run_worker(args: argparse.Namespace) -> None:
    """Benchmark one side of one case; write the record to ``args.result_file``."""
    case, side, device = CASES[args.cases[0]], args.worker, args.device
    if args.threads:
        torch.set_num_threads(args.threads)
    head = build_head(case, side, device)
    inputs = make_inputs(head, case, args.quick, args.seed, device)
    probe = MemoryProbe(device)
    with warnings.catch_warnings(record=True) as fallbacks:
        warnings.simplefilter('always')
        first = run_step(head, side, inputs, args.seed, device)
    losses = plain_losses(first.losses)
    grad_norms = [float(x.grad.norm()) for x in inputs.cls_scores + inputs.bbox_preds]
    first = first._replace(losses=None)
    for _ in range(args.warmup - 1):
        run_step(head, side, inputs, args.seed, device)
    graphs_before = compiled_graphs()
    probe.start_window()
    steps = [
        run_step(head, side, inputs, args.seed, device)._replace(losses=None)
        for _ in range(args.repeats)
    ]
    memory = probe.result()
    times = {phase: [getattr(s, phase) for s in steps] for phase in ('assign', 'fwd', 'bwd')}
    times['fwd_bwd'] = [s.fwd + s.bwd for s in steps]
    record = dict(
        side=side,
        head=type(head).__name__,
        loss_cls=type(head.loss_cls).__name__ if hasattr(head, 'loss_cls') else None,
        assigner=type(head.assigner).__name__,
        num_anchors_per_image=sum(
            h * w * a
            for (h, w), a in zip(inputs.featmap_sizes, head.prior_generator.num_base_anchors)
        ),
        featmap_sizes=inputs.featmap_sizes,
        times=times,
        median={phase: statistics.median(v) for phase, v in times.items()},
        min={phase: min(v) for phase, v in times.items()},
        first_call=dict(
            assign=first.assign, fwd=first.fwd, bwd=first.bwd, fwd_bwd=first.fwd + first.bwd
        ),
        memory=memory,
        losses=losses,
        grad_norms=grad_norms,
        compile=compile_info(fallbacks),
        graphs_compiled_during_timing=compiled_graphs() - graphs_before,
        num_threads=torch.get_num_threads(),
        source=source_fingerprint(),
        floor=logits_floor(inputs, device),
    )
    if args.profile:
        record['profile'] = profile_step(head, side, inputs, args.seed, device)
    Path(args.result_file).write_text(json.dumps(record, indent=1))


# --------------------------------------------------------------------------------------------
# Orchestrator: run each side in a subprocess, compare, report.
# --------------------------------------------------------------------------------------------


class LossCheck(NamedTuple):
    """Agreement of the two sides' losses (and of their gradient norms)."""

    agree: bool
    max_rel_diff: float
    worst: str  # 'key[entry]' of the largest relative difference
    grad_norm_max_rel_diff: Optional[float]


def relative_difference(got: float, ref: float) -> float:
    """``|got - ref| / |ref|``; 0 when both are 0."""
    if got == ref:
        return 0.0
    return abs(got - ref) / max(abs(ref), 1e-12)


def compare_losses(
    upstream: Dict[str, List[float]],
    plugin: Dict[str, List[float]],
    upstream_grads: Sequence[float] = (),
    plugin_grads: Sequence[float] = (),
    rtol: float = LOSS_RTOL,
) -> LossCheck:
    """Compare per key and per entry; keys or lengths that differ never agree."""
    if set(upstream) != set(plugin) or any(len(upstream[k]) != len(plugin[k]) for k in upstream):
        shapes = {k: len(v) for k, v in upstream.items()}, {k: len(v) for k, v in plugin.items()}
        return LossCheck(False, float('inf'), f'keys/lengths differ: {shapes}', None)
    diffs = {
        f'{key}[{i}]': relative_difference(b, a)
        for key in upstream
        for i, (a, b) in enumerate(zip(upstream[key], plugin[key]))
    }
    worst = max(diffs, key=diffs.get) if diffs else '-'
    max_diff = diffs[worst] if diffs else 0.0
    grads = None
    if upstream_grads and len(upstream_grads) == len(plugin_grads):
        grads = max(relative_difference(b, a) for a, b in zip(upstream_grads, plugin_grads))
    return LossCheck(max_diff <= rtol, max_diff, worst, grads)


def source_fingerprint() -> dict:
    """Which plugin code this process imported: its path and a hash of its sources."""
    package = Path(mmdet_anchorloss.__file__).parent
    digest = hashlib.sha1()
    for path in sorted(package.rglob('*.py')):
        digest.update(str(path.relative_to(package)).encode() + path.read_bytes())
    return dict(sources_sha1=digest.hexdigest()[:12], package=str(package))


def git_head() -> Optional[str]:
    """The repository's commit (read only; None outside a git checkout)."""
    try:
        out = subprocess.run(
            ['git', 'rev-parse', '--short', 'HEAD'],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip()


def snapshot_package(dest: Path) -> dict:
    """Copy the plugin package into ``dest``; returns the workers' environment.

    Others may edit the package during a long run: with the copy first on ``PYTHONPATH``,
    every worker of the run imports the same code.
    """
    src = Path(mmdet_anchorloss.__file__).parent
    shutil.copytree(src, dest / 'mmdet_anchorloss', ignore=shutil.ignore_patterns('__pycache__'))
    path = os.pathsep.join(p for p in (str(dest), os.environ.get('PYTHONPATH')) if p)
    return dict(os.environ, PYTHONPATH=path)


def machine_info(device: str) -> dict:
    """CPU model, cores, library versions and the device's name."""
    cpu_model = platform.processor() or platform.machine()
    try:
        with open('/proc/cpuinfo') as f:
            models = [line.split(':', 1)[1].strip() for line in f if line.startswith('model name')]
        cpu_model = models[0] if models else cpu_model
    except OSError:
        pass
    info = dict(
        cpu_model=cpu_model,
        cpu_cores=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
        torch=torch.__version__,
        mmcv=mmcv.__version__,
        mmdet=mmdet.__version__,
        python=platform.python_version(),
        platform=platform.platform(),
        device=device,
        device_name=cpu_model,
        compile_env=os.environ.get('MMDET_ANCHORLOSS_COMPILE', 'auto'),
    )
    if device == 'cuda':
        info['device_name'] = torch.cuda.get_device_name()
    return info


def worker_command(args: argparse.Namespace, case: str, side: str, result_file: str) -> list:
    """This script as a worker for one side of one case."""
    cmd = [sys.executable, str(Path(__file__).resolve()), '--worker', side, '--cases', case]
    cmd += ['--device', args.device, '--repeats', str(args.repeats)]
    cmd += ['--warmup', str(args.warmup), '--seed', str(args.seed)]
    cmd += ['--threads', str(args.threads)] if args.threads else []
    cmd += ['--result-file', result_file]
    cmd += ['--quick'] * args.quick + ['--profile'] * args.profile
    return cmd


def run_side(args: argparse.Namespace, case: str, side: str, log_dir: Path, env: dict) -> dict:
    """Run one worker to completion; its record, or ``{'error': ...}`` if it failed."""
    log_file = log_dir / f'{case}-{side}.log'
    with tempfile.TemporaryDirectory() as tmp:
        result_file = os.path.join(tmp, 'result.json')
        start = time.perf_counter()
        with open(log_file, 'w') as log:  # the worker's output, kept for failures
            proc = subprocess.run(
                worker_command(args, case, side, result_file),
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        wall = time.perf_counter() - start
        if proc.returncode != 0 or not os.path.isfile(result_file):
            tail = log_file.read_text()[-2000:]
            return dict(side=side, error=f'exit {proc.returncode}; see {log_file}\n{tail}')
        record = json.loads(Path(result_file).read_text())
    record['worker_wall_s'] = wall
    return record


def summarise_case(case: Case, quick: bool, records: Dict[str, dict], load: tuple) -> dict:
    """Speed-ups, memory ratio, passes and the loss check of one case."""
    batch, img_shape, pad_shape = case_geometry(case, quick)
    summary = dict(
        case=case.name,
        config=case.config,
        batch_size=batch,
        num_gts=case.num_gts,
        img_shape=img_shape,
        pad_shape=pad_shape,
        loadavg_at_start=load,
        **records,
    )
    up, pl = records['upstream'], records['plugin']
    if 'error' in up or 'error' in pl:
        return summary
    summary['speedup'] = {p: up['median'][p] / pl['median'][p] for p in PHASES}
    up_mb, pl_mb = up['memory']['peak_mb'], pl['memory']['peak_mb']
    summary['memory_ratio_upstream_over_plugin'] = up_mb / pl_mb if pl_mb > 0 else None
    floor = pl['floor']['seconds']
    summary['floor_s'] = floor
    summary['passes'] = {s: records[s]['median']['fwd_bwd'] / floor for s in SIDES}
    check = compare_losses(up['losses'], pl['losses'], up['grad_norms'], pl['grad_norms'])
    summary['loss_check'] = check._asdict()
    return summary


def fmt(value, spec: str = '.3f') -> str:
    """A number for the tables; '-' for None."""
    return '-' if value is None else format(value, spec)


def markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A markdown table, first column left-aligned, the others right-aligned."""
    lines = ['| ' + ' | '.join(header) + ' |', '|---' + '|---:' * (len(header) - 1) + '|']
    lines += ['| ' + ' | '.join(row) + ' |' for row in rows]
    return '\n'.join(lines)


def timing_table(summaries: Sequence[dict]) -> str:
    """Per case and phase: upstream s, plugin s, speed-up, the plugin's first call."""
    header = ['case', 'phase', 'upstream s', 'plugin s', 'speed-up', 'plugin 1st call s']
    rows = []
    for s in summaries:
        if 'speedup' not in s:
            rows.append([s['case'], 'FAILED', '-', '-', '-', '-'])
            continue
        up, pl = s['upstream'], s['plugin']
        for phase in PHASES:
            rows.append(
                [
                    s['case'],
                    phase.replace('_', '+'),
                    fmt(up['median'][phase]),
                    fmt(pl['median'][phase]),
                    fmt(s['speedup'][phase], '.1f') + 'x',
                    fmt(pl['first_call'][phase], '.2f'),
                ]
            )
    return markdown(header, rows)


def summary_table(summaries: Sequence[dict]) -> str:
    """Per case: memory, passes over the logits, loss agreement, machine load."""
    header = [
        'case',
        'anchors/img',
        'up peak MB',
        'plugin peak MB',
        'mem up/plugin',
        'floor s',
        'up passes',
        'plugin passes',
        'loss max rel diff',
        'agree',
        'load 1m',
    ]
    rows = []
    for s in summaries:
        load = fmt(s['loadavg_at_start'][0], '.1f')
        if 'speedup' not in s:
            rows.append([s['case']] + ['-'] * 9 + [load])
            continue
        up, pl, check = s['upstream'], s['plugin'], s['loss_check']
        ratio = s['memory_ratio_upstream_over_plugin']
        rows.append(
            [
                s['case'],
                str(pl['num_anchors_per_image']),
                fmt(up['memory']['peak_mb'], '.0f'),
                fmt(pl['memory']['peak_mb'], '.0f'),
                fmt(ratio, '.1f') + 'x' if ratio is not None else '-',
                fmt(s['floor_s'], '.4f'),
                fmt(s['passes']['upstream'], '.1f'),
                fmt(s['passes']['plugin'], '.1f'),
                fmt(check['max_rel_diff'], '.1e'),
                'yes' if check['agree'] else f'NO ({check["worst"]})',
                load,
            ]
        )
    return markdown(header, rows)


def profile_text(summaries: Sequence[dict]) -> str:
    """The profiler tables of every side that has one."""
    parts = []
    for s in summaries:
        for side in SIDES:
            prof = s.get(side, {}).get('profile')
            if prof:
                parts.append(f'### {s["case"]} {side} (sorted by {prof["sort_by"]})\n')
                parts.append('```\n' + prof['table'].rstrip() + '\n```')
    return '\n'.join(parts)


def run_cases(args: argparse.Namespace, log_dir: Path, env: dict) -> List[dict]:
    """Both sides of every case, one worker at a time, with a progress bar."""
    summaries = []
    bar = tqdm(total=2 * len(args.cases), unit='side', desc='benchmark', dynamic_ncols=True)
    for name in args.cases:
        load = os.getloadavg()
        records = {}
        for side in SIDES:
            bar.set_postfix_str(f'{name} {side}')
            records[side] = run_side(args, name, side, log_dir, env)
            if 'error' in records[side]:
                tqdm.write(f'[benchmark] {name} {side} FAILED: {records[side]["error"]}')
            bar.update()
        summary = summarise_case(CASES[name], args.quick, records, load)
        if 'speedup' in summary:
            sp, check = summary['speedup'], summary['loss_check']
            tqdm.write(
                f'[benchmark] {name}: fwd+bwd {records["upstream"]["median"]["fwd_bwd"]:.3f} s '
                f'-> {records["plugin"]["median"]["fwd_bwd"]:.3f} s ({sp["fwd_bwd"]:.1f}x), '
                f'loss max rel diff {check["max_rel_diff"]:.1e}'
            )
        summaries.append(summary)
    bar.close()
    return summaries


def warn_if_oversubscribed(args: argparse.Namespace) -> None:
    """Say so when other work leaves fewer idle cores than a worker has threads.

    Threads of an OpenMP parallel region then wait on each other at every op; runs of many
    small ops (upstream's per-image loops) slow down many times over, which distorts the
    comparison. ``--threads 1`` keeps such runs comparable on a shared machine.
    """
    if args.device != 'cpu':
        return
    threads = args.threads or torch.get_num_threads()
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if threads > 1 and load + threads > cores + 0.5:
        print(
            f'[benchmark] WARNING: load average {load:.1f} on {cores} cores with {threads} '
            'threads per worker: timings will suffer from oversubscription '
            '(consider --threads 1; the load is recorded per case)',
            flush=True,
        )


def main(argv=None) -> None:
    """Run the cases (or, with ``--worker``, one side of one case)."""
    args = parse_args(argv)
    if args.worker:
        run_worker(args)
        return
    out = Path(args.out)
    log_dir = out.parent / 'logs'
    log_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    machine = machine_info(args.device)
    warn_if_oversubscribed(args)
    with tempfile.TemporaryDirectory(prefix='anchorloss_bench_') as tmp:
        env = dict(os.environ) if args.no_snapshot else snapshot_package(Path(tmp))
        if args.threads:
            env['OMP_NUM_THREADS'] = str(args.threads)
        summaries = run_cases(args, log_dir, env)
    report = dict(
        machine=machine,
        settings=dict(
            repeats=args.repeats,
            warmup=args.warmup,
            quick=args.quick,
            seed=args.seed,
            threads=args.threads,
            snapshot=not args.no_snapshot,
            git_head=git_head(),
            loss_rtol=LOSS_RTOL,
            timing='median of repeats after warm-up; fwd includes assignment',
        ),
        loadavg_at_end=os.getloadavg(),
        total_wall_s=time.perf_counter() - start,
        cases=summaries,
    )
    versions = {
        s[side]['source']['sources_sha1']
        for s in summaries
        for side in SIDES
        if 'source' in s[side]
    }
    report['plugin_sources_changed_during_run'] = len(versions) > 1
    out.write_text(json.dumps(report, indent=1))
    text = '\n\n'.join(
        t for t in (timing_table(summaries), summary_table(summaries), profile_text(summaries)) if t
    )
    head = (
        f'{machine["device_name"]}, {machine["cpu_cores"]} cores, torch {machine["torch"]}, '
        f'load at end {report["loadavg_at_end"][0]:.1f}; plugin sources {", ".join(versions)} '
        f'(git {report["settings"]["git_head"]}, threads {args.threads or "default"})'
    )
    out.with_suffix('.md').write_text(f'# Anchor-head loss benchmark\n\n{head}\n\n{text}\n')
    print(f'\n{head}\n\n{text}\n\nwrote {out} and {out.with_suffix(".md")}')
    if report['plugin_sources_changed_during_run']:
        print(f'[benchmark] WARNING: the plugin sources changed during the run: {versions}')
    if any('speedup' not in s for s in summaries):
        sys.exit(f'[benchmark] some workers failed; their output is in {log_dir}')
    if any(not s['loss_check']['agree'] for s in summaries):
        sys.exit('[benchmark] the losses of the two sides disagree (see the table)')


if __name__ == '__main__':
    main()
