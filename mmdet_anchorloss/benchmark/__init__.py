"""Benchmark the anchor-head loss: mmdet's heads against their mmdet_anchorloss twins.

``tools/benchmark_loss.py`` is the command line; this package is what it runs:

- ``cases``: the cases (shipped mmdet configs, batch, gts, dtype), the plugin twin of a
  config, and the random inputs both sides share;
- ``measure``: one side of one case in a worker process: time per phase, peak memory,
  dispatched ops / launches / host syncs (``mmdet_anchorloss.profiling.count_ops``), and on
  CUDA the profiler's kernels, ``cudaStreamSynchronize`` calls and the classification loss's
  kernel time;
- ``worker``: runs ``measure`` in its own process (``python -m
  mmdet_anchorloss.benchmark.worker``) and launches such processes;
- ``report``: the loss comparison, the tables, the machine.

Nothing here is imported by ``mmdet_anchorloss`` itself.
"""

from .cases import CASES, SIDES, Case, default_cases
from .measure import WorkerOptions
from .report import compare_losses

__all__ = ['CASES', 'SIDES', 'Case', 'WorkerOptions', 'compare_losses', 'default_cases']
