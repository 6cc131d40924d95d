"""The numbers of ``tools/compare_upstream.py``: summaries, spread, verdict, where runs part.

Pure functions of the per-iteration profiles that :class:`.profile_hook.AnchorLossProfileHook`
writes (no torch), so each can be tested on hand-written records.

**The verdict rule.** For a metric measured on N seeds per side, with ``d_i = plugin_i -
upstream_i`` the paired differences:

- seed-to-seed spread ``s``: the sample standard deviation (ddof 1) of each side's N values,
  pooled over the two sides: ``s = sqrt((s_plugin**2 + s_upstream**2) / 2)``;
- the spread expected of a mean difference between two sets of N runs that differ only by
  chance: ``se = s * sqrt(2 / N)``;
- **within run-to-run spread** when ``|mean(d)| <= 2 * se``, else **differs beyond the
  spread**. With one seed there is no spread, and no verdict.

The factor 2 is a rough two-standard-error band, not a significance test; with 3 seeds it is
narrower than a t-test's (t = 2.78 at 4 degrees of freedom), so it errs towards reporting a
difference. The paired differences' own standard deviation is reported next to it: the two
sides start from the same weights and data order, but part after a few dozen iterations (see
:func:`parting`), so by the end of training the pairs are about as independent as two seeds.
"""

import math
import statistics
from typing import Dict, List, Optional, Sequence

SIDES = ('plugin', 'upstream')
WITHIN = 'within run-to-run spread'
BEYOND = 'differs beyond the spread'
NO_VERDICT = 'cannot be given with one seed (no run-to-run spread; use --seeds 3 or more)'
SPREAD_FACTOR = 2.0
# Relative differences of the total loss at which the report says the two runs part.
PARTING_TOLERANCES = (1e-5, 1e-3)
# Iterations left out of the timing averages (allocator and thread-pool warmup).
MAX_TIMING_WARMUP = 5
FINAL_LOSS_WINDOW = 10
COCO_METRICS = ('bbox_mAP', 'bbox_mAP_50', 'bbox_mAP_75')


def mean(values: Sequence[float]) -> Optional[float]:
    """Arithmetic mean, None for an empty sequence."""
    return sum(values) / len(values) if values else None


def std(values: Sequence[float]) -> Optional[float]:
    """Sample standard deviation (ddof 1), None for fewer than two values."""
    return statistics.stdev(values) if len(values) > 1 else None


def relative_difference(a: Optional[float], b: Optional[float]) -> Optional[float]:
    """``|a - b| / |b|`` (None when either is missing, 0 when both are 0)."""
    if a is None or b is None:
        return None
    if b == 0:
        return 0.0 if a == 0 else float('inf')
    return abs(a - b) / abs(b)


def summarise(record: dict) -> dict:
    """Turn one run's per-iteration profile into the report's numbers."""
    losses = record['losses']
    n = len(losses)
    skip = min(MAX_TIMING_WARMUP, n // 4)
    iter_time = record['iter_time'][skip:]
    loss_time = record['loss_time'][skip:]
    tail = losses[-FINAL_LOSS_WINDOW:]
    metrics = record.get('metrics', {})
    summary = dict(
        head=record.get('head'),
        iters=n,
        first_iter_loss=losses[0].get('loss') if losses else None,
        first_iter_losses=losses[0] if losses else {},
        final_losses={k: mean([step[k] for step in tail]) for k in (tail[0] if tail else {})},
        bbox_mAP=metrics.get('coco/bbox_mAP'),
        bbox_mAP_50=metrics.get('coco/bbox_mAP_50'),
        bbox_mAP_75=metrics.get('coco/bbox_mAP_75'),
        metrics=metrics,
        sec_per_iter=mean(iter_time),
        sec_per_iter_with_data=mean(record['wall_time'][skip:]),
        loss_sec_per_iter=mean(loss_time),
        loss_share=sum(loss_time) / sum(iter_time) if iter_time and sum(iter_time) else None,
        peak_mem_mb=record.get('peak_mem_mb'),
        mem_kind=record.get('mem_kind'),
        train_time_s=record.get('train_time_s'),
        timing_skipped_iters=skip,
    )
    summary['final_loss'] = summary['final_losses'].get('loss')
    return summary


def parting(
    plugin_losses: Sequence[dict],
    upstream_losses: Sequence[dict],
    tolerances: Sequence[float] = PARTING_TOLERANCES,
    key: str = 'loss',
) -> dict:
    """Where two runs' per-iteration ``key`` losses part.

    Returns:
        dict: ``compared_iters`` (the shorter run's length) and ``points``, one dict per
        tolerance: ``tolerance``, ``first_iter`` (1-based, the first iteration whose relative
        difference exceeds it; None when none does) and ``max_rel_diff_before`` (the largest
        relative difference over the iterations before it; None when it is the first).
    """
    diffs = [relative_difference(a[key], b[key]) for a, b in zip(plugin_losses, upstream_losses)]
    points = []
    for tol in tolerances:
        first = next((i for i, d in enumerate(diffs) if d > tol), None)
        before = diffs if first is None else diffs[:first]
        points.append(
            dict(
                tolerance=tol,
                first_iter=None if first is None else first + 1,
                max_rel_diff_before=max(before) if before else None,
            )
        )
    return dict(compared_iters=len(diffs), points=points)


def spread(plugin_values: Sequence[float], upstream_values: Sequence[float]) -> dict:
    """Mean and spread of one metric over N paired seeds, and the verdict (module docstring)."""
    n = len(plugin_values)
    diffs = [a - b for a, b in zip(plugin_values, upstream_values)]
    out = dict(n=n, diff=dict(values=diffs, mean=mean(diffs), std=std(diffs)))
    for side, values in zip(SIDES, (plugin_values, upstream_values)):
        out[side] = dict(values=list(values), mean=mean(values), std=std(values))
    if n < 2:
        out.update(seed_std=None, threshold=None, verdict=NO_VERDICT)
        return out
    seed_std = math.sqrt((out['plugin']['std'] ** 2 + out['upstream']['std'] ** 2) / 2)
    threshold = SPREAD_FACTOR * seed_std * math.sqrt(2 / n)
    verdict = WITHIN if abs(out['diff']['mean']) <= threshold else BEYOND
    out.update(seed_std=seed_std, threshold=threshold, verdict=verdict)
    return out


def accuracy_keys(summaries: Sequence[dict]) -> List[str]:
    """The metrics the verdict is about: COCO bbox mAPs, else every evaluation metric (AR)."""
    if any(s.get('bbox_mAP') is not None for s in summaries):
        return list(COCO_METRICS)
    return sorted({k for s in summaries for k in s['metrics']})


def metric_value(summary: dict, key: str) -> Optional[float]:
    """A summary's value for ``key``: a top-level number, else an evaluation metric."""
    value = summary.get(key)
    return value if isinstance(value, (int, float)) else summary['metrics'].get(key)


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    """``a / b``, None when either is missing or b is 0."""
    return a / b if a is not None and b else None


def load_summary(samples: Sequence[float], cores: int) -> dict:
    """Mean and max of the 1-minute load averages sampled during a run, against ``cores``."""
    load_mean = mean(samples)
    return dict(
        mean=load_mean,
        max=max(samples) if samples else None,
        samples=len(samples),
        cores=cores,
        overloaded=load_mean is not None and load_mean > cores,
    )


def compare_runs(runs: Sequence[dict]) -> dict:
    """Everything the report shows, from the runs of all seeds.

    Args:
        runs: one dict per seed: ``seed``, ``plugin`` and ``upstream`` (each the profile
            record of :class:`.profile_hook.AnchorLossProfileHook`), and ``launch``: for each
            side ``order`` (its place in the run sequence), ``load_samples`` (1-minute load
            averages taken while it ran), ``cores`` and ``wall_s``.

    Returns:
        dict: ``seeds``, ``per_seed`` (summaries, parting points, timing ratios and load per
        seed), ``metrics`` (:func:`spread` per accuracy metric and the final loss),
        ``verdict``, ``timing`` (:func:`spread` of the per-side times and of the ratios) and
        ``timing_reliable``.
    """
    per_seed = []
    for run in runs:
        summary = {side: summarise(run[side]) for side in SIDES}
        launch = run.get('launch', {})
        entry = dict(seed=run['seed'], **summary)
        entry['order'] = sorted(SIDES, key=lambda side: launch.get(side, {}).get('order', 0))
        entry['parting'] = parting(run['plugin']['losses'], run['upstream']['losses'])
        entry['first_iter_loss_rel_diff'] = relative_difference(
            summary['plugin']['first_iter_loss'], summary['upstream']['first_iter_loss']
        )
        entry['sec_per_iter_ratio'] = ratio(
            summary['plugin']['sec_per_iter'], summary['upstream']['sec_per_iter']
        )
        entry['loss_sec_ratio'] = ratio(
            summary['plugin']['loss_sec_per_iter'], summary['upstream']['loss_sec_per_iter']
        )
        entry['load'] = {
            side: load_summary(launch[side]['load_samples'], launch[side]['cores'])
            for side in SIDES
            if side in launch
        }
        per_seed.append(entry)

    def values(side: str, key: str) -> List[float]:
        return [metric_value(entry[side], key) for entry in per_seed]

    metrics = {}
    keys = accuracy_keys([entry[side] for entry in per_seed for side in SIDES])
    for key in keys + ['final_loss']:
        pairs = [(a, b) for a, b in zip(values('plugin', key), values('upstream', key))]
        pairs = [(a, b) for a, b in pairs if a is not None and b is not None]
        if pairs:
            metrics[key] = spread([a for a, _ in pairs], [b for _, b in pairs])
    verdicts = {metrics[k]['verdict'] for k in keys if k in metrics}
    if not verdicts:
        verdict = 'cannot be given: no evaluation metrics'
    elif BEYOND in verdicts:
        verdict = BEYOND
    else:
        verdict = verdicts.pop() if len(verdicts) == 1 else NO_VERDICT
    timing = {
        key: spread(values('plugin', key), values('upstream', key))
        for key in ('sec_per_iter', 'sec_per_iter_with_data', 'loss_sec_per_iter', 'loss_share')
        + ('peak_mem_mb',)
        if None not in values('plugin', key) + values('upstream', key)
    }
    for key in ('sec_per_iter_ratio', 'loss_sec_ratio'):
        ratios = [entry[key] for entry in per_seed if entry[key] is not None]
        timing[key] = dict(values=ratios, mean=mean(ratios), std=std(ratios))
    loads = [load for entry in per_seed for load in entry['load'].values()]
    return dict(
        seeds=[entry['seed'] for entry in per_seed],
        per_seed=per_seed,
        metrics=metrics,
        verdict_metrics=keys,
        verdict=verdict,
        timing=timing,
        timing_reliable=not any(load['overloaded'] for load in loads),
        max_load=max((load['max'] for load in loads if load['max'] is not None), default=None),
        cores=loads[0]['cores'] if loads else None,
    )


def mean_summary(summaries: Sequence[dict]) -> dict:
    """One side's summaries averaged over seeds: numbers (also nested) as their mean, other
    fields from the first seed. ``report.json``'s ``plugin`` / ``upstream`` entries."""
    out: Dict[str, object] = {}
    for key, first in summaries[0].items():
        items = [s.get(key) for s in summaries]
        if isinstance(first, dict) and all(isinstance(i, dict) for i in items):
            nested = [i for i in items if set(i) == set(first)]
            out[key] = mean_summary(nested) if len(nested) == len(items) and first else first
        elif isinstance(first, (int, float)) and all(isinstance(i, (int, float)) for i in items):
            out[key] = mean(items)
        else:
            out[key] = first
    return out
