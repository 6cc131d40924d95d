"""Write ``tools/compare_upstream.py``'s report: ``report.md``, ``report.json``, a plot.

The numbers come from :func:`.compare_stats.compare_runs`; this module only lays them out.
"""

import json
import os.path as osp
from pathlib import Path
from typing import Dict, List, Sequence

from . import compare_stats as stats
from .compare_stats import SIDES
from .env_info import environment_info, format_environment


def fmt(value, spec: str = '.4f') -> str:
    """Format a number for a table; '-' for None."""
    if value is None:
        return '-'
    if isinstance(value, str):
        return value
    return format(value, spec)


def pm(entry: dict, spec: str, signed: bool = False, unit: str = '') -> str:
    """``mean ± std`` of a :func:`.compare_stats.spread` entry (just the mean for one seed)."""
    mean = fmt(entry.get('mean'), ('+' if signed else '') + spec) + unit
    return mean if entry.get('std') is None else f'{mean} ± {fmt(entry["std"], spec)}'


def markdown_table(header: Sequence[str], rows: List[List[str]], align: str = '---:') -> str:
    """A GitHub markdown table; the first column left-aligned, the others ``align``."""
    lines = ['| ' + ' | '.join(header) + ' |', '|---|' + '|'.join([align] * (len(header) - 1))]
    lines[-1] += '|'
    lines += ['| ' + ' | '.join(str(cell) for cell in row) + ' |' for row in rows]
    return '\n'.join(lines)


def accuracy_table(result: dict) -> str:
    """Per metric: each side's mean ± std over seeds, the paired difference and the verdict."""
    n = len(result['seeds'])
    rows = []
    for key, entry in result['metrics'].items():
        spec = '.4f' if key == 'final_loss' else '.3f'
        name = key
        if key == 'final_loss':
            name = f'final loss (mean of last {stats.FINAL_LOSS_WINDOW} it)'
        bound = '-' if entry['threshold'] is None else f'± {fmt(entry["threshold"], spec)}'
        verdict = entry['verdict'] if entry['threshold'] is not None else '-'
        rows.append(
            [name, pm(entry['plugin'], spec), pm(entry['upstream'], spec)]
            + [pm(entry['diff'], spec, signed=True), bound, verdict]
        )
    header = [f'{n} seed(s)', 'plugin', 'upstream', 'paired diff.', 'spread bound', 'verdict']
    return markdown_table(header, rows)


def timing_table(result: dict) -> str:
    """Per-side times and memory (mean ± std over seeds) and the per-seed plugin/upstream ratio."""
    timing = result['timing']
    rows = []
    for key, name, spec, ratio_key in (
        ('sec_per_iter', 's / iteration (fwd+bwd+step)', '.3f', 'sec_per_iter_ratio'),
        ('sec_per_iter_with_data', 's / iteration (with data wait)', '.3f', None),
        ('loss_sec_per_iter', 'loss_by_feat forward, s / iteration', '.4f', 'loss_sec_ratio'),
        ('loss_share', 'share of the iteration in loss_by_feat', '.3f', None),
        ('peak_mem_mb', 'peak memory, MiB', '.0f', None),
    ):
        if key not in timing:
            continue
        entry = timing[key]
        ratio = pm(timing[ratio_key], '.2f', unit='x') if ratio_key else ''
        if not ratio_key and entry['plugin']['mean'] and entry['upstream']['mean']:
            ratio = fmt(entry['plugin']['mean'] / entry['upstream']['mean'], '.2f') + 'x'
        rows.append([name, pm(entry['plugin'], spec), pm(entry['upstream'], spec), ratio])
    return markdown_table(['', 'plugin', 'upstream', 'plugin / upstream'], rows)


def parting_cell(point: dict, compared: int) -> str:
    """``iteration k (max before: x)`` or ``none in N it (max: x)``."""
    before = fmt(point['max_rel_diff_before'], '.1e')
    if point['first_iter'] is None:
        return f'none in {compared} it (max {before})'
    return f'it {point["first_iter"]} (max before: {before})'


def per_seed_table(result: dict) -> str:
    """One row per seed: run order, mAP, where the runs part, time ratios, machine load."""
    tolerances = [p['tolerance'] for p in result['per_seed'][0]['parting']['points']]
    key = result['verdict_metrics'][0] if result['verdict_metrics'] else None
    rows = []
    for entry in result['per_seed']:
        values = [stats.metric_value(entry[side], key) if key else None for side in SIDES]
        load = ', '.join(
            f'{fmt(entry["load"][side]["mean"], ".1f")}/{fmt(entry["load"][side]["max"], ".1f")}'
            for side in SIDES
            if side in entry['load']
        )
        part = entry['parting']
        rows.append(
            [str(entry['seed']), ' then '.join(entry['order'])]
            + [' / '.join(fmt(v, '.3f') for v in values)]
            + [
                ' / '.join(fmt(entry[side]['first_iter_loss'], '.6f') for side in SIDES)
                + f' ({fmt(entry["first_iter_loss_rel_diff"], ".1e")})'
            ]
            + [parting_cell(p, part['compared_iters']) for p in part['points']]
            + [
                fmt(entry['sec_per_iter_ratio'], '.2f') + 'x',
                fmt(entry['loss_sec_ratio'], '.2f') + 'x',
            ]
            + [load or '-']
        )
    header = ['seed', 'run order', f'{key} plugin / upstream', 'first-iteration loss (rel. diff.)']
    header += [f'first it. rel. diff. > {t:g}' for t in tolerances]
    header += ['s/it ratio', 'loss fwd ratio', 'load mean/max (plugin, upstream)']
    return markdown_table(header, rows)


def timing_note(result: dict) -> str:
    """Whether the timing can be trusted, by the load average seen during the runs."""
    cores, max_load = result['cores'], result['max_load']
    if cores is None:
        return 'Machine load was not recorded (report rebuilt from older profiles).'
    if result['timing_reliable']:
        return (
            f'Timing reliable by the load rule: the mean 1-minute load average during each run '
            f'stayed at or below the {cores} cores (highest sample {fmt(max_load, ".1f")}).'
        )
    return (
        f'**Timing unreliable**: during at least one run the mean 1-minute load average '
        f'exceeded the {cores} cores (highest sample {fmt(max_load, ".1f")}); the sides ran '
        f'alternately, so load hit both, but the times are noisy.'
    )


def rule_text(n: int) -> str:
    """The verdict rule in words (see :mod:`.compare_stats`)."""
    return (
        f'Verdict rule: d = plugin - upstream per seed; s = the seed-to-seed standard deviation '
        f'of each side, pooled over both; the mean difference is *{stats.WITHIN}* when '
        f'|mean(d)| <= {stats.SPREAD_FACTOR:g} x s x sqrt(2/N) (the "spread bound"), else '
        f'*{stats.BEYOND}*. N = {n}.'
        + ('' if n > 1 else ' With one seed the verdict cannot be given.')
    )


def write_report(configs: Dict[str, str], work_dir: str, runs: Sequence[dict]) -> str:
    """Write ``report.md``, ``report.json`` and ``loss_curves.png``; return the summary text."""
    result = stats.compare_runs(runs)
    per_seed = result['per_seed']
    n = len(per_seed)
    report = dict(configs=configs, **result)
    for side in SIDES:
        report[side] = dict(
            stats.mean_summary([entry[side] for entry in per_seed]), config=configs[side]
        )
    report['first_iter_loss_rel_diff'] = max(
        (
            e['first_iter_loss_rel_diff']
            for e in per_seed
            if e['first_iter_loss_rel_diff'] is not None
        ),
        default=None,
    )
    report['verdict_rule'] = rule_text(n)
    report['environment'] = environment_info()
    Path(work_dir, 'report.json').write_text(json.dumps(report, indent=2))
    iters = per_seed[0]['plugin']['iters']
    summary = '\n\n'.join(
        [
            f'**Verdict: {result["verdict"]}** ({", ".join(result["verdict_metrics"])}; '
            f'{n} seed(s): {", ".join(map(str, result["seeds"]))}).',
            accuracy_table(result),
            timing_table(result),
            timing_note(result),
        ]
    )
    text = [
        f'# {osp.basename(configs["plugin"])} vs its upstream twin',
        '',
        f'- plugin: `{configs["plugin"]}`; upstream: `{configs["upstream"]}`',
        f'- {format_environment(report["environment"])}',
        f'- heads: `{per_seed[0]["plugin"]["head"]}` / `{per_seed[0]["upstream"]["head"]}`; '
        f'memory: {per_seed[0]["plugin"]["mem_kind"]}',
        f'- {iters} iterations per run; each seed trains both sides from the same weights and '
        'data order; the sides alternate (A B, B A, ...); timings leave out the first '
        f'{per_seed[0]["plugin"]["timing_skipped_iters"]} iterations.',
        '',
        summary,
        '',
        rule_text(n),
        '',
        '## Per seed: where the runs part',
        '',
        "The first iteration at which the two sides' total loss differs by more than each "
        'relative tolerance, and the largest relative difference before it.',
        '',
        per_seed_table(result),
        '',
        '![loss curves](loss_curves.png)',
        '',
    ]
    Path(work_dir, 'report.md').write_text('\n'.join(text))
    plot_curves(runs, osp.join(work_dir, 'loss_curves.png'))
    return summary


def smoothing_window(n: int) -> int:
    """Moving-average window for a curve of ``n`` points: about 1/50 of it."""
    return max(1, n // 50)


def moving_average(values: Sequence[float]) -> List[float]:
    """Trailing moving average over :func:`smoothing_window` points."""
    window = smoothing_window(len(values))
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def anchor_loss_keys(losses: Sequence[Dict[str, float]]) -> List[str]:
    """The anchor head's classification and regression loss names in a loss record."""
    keys = losses[0].keys() if losses else ()
    if 'loss_rpn_cls' in keys:
        return ['loss_rpn_cls', 'loss_rpn_bbox']
    return [k for k in ('loss_cls', 'loss_bbox') if k in keys]


def plot_curves(runs: Sequence[dict], out_file: str) -> None:
    """The first seed's loss curves, both sides overlaid (one panel per loss), and a last panel
    with the relative difference of the total loss per iteration for every seed."""
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    first = runs[0]
    keys = anchor_loss_keys(first['plugin']['losses']) + ['loss']
    fig, axes = plt.subplots(1, len(keys) + 1, figsize=(5 * (len(keys) + 1), 3.6))
    for ax, key in zip(axes, keys):
        for side, style, colour in zip(SIDES, ('-', '--'), ('C0', 'C1')):
            values = [step.get(key) for step in first[side]['losses']]
            steps = range(1, len(values) + 1)
            ax.plot(steps, values, '-', lw=0.5, alpha=0.25, color=colour)
            ax.plot(steps, moving_average(values), style, lw=1.2, color=colour, label=side)
        ax.set_title(f'seed {first["seed"]}: {key} (avg of {smoothing_window(len(steps))} it)')
        ax.set_xlabel('iteration')
        ax.set_yscale('log')
        ax.grid(alpha=0.3)
        ax.legend()
    ax = axes[-1]
    for i, run in enumerate(runs):
        pairs = zip(run['plugin']['losses'], run['upstream']['losses'])
        diffs = [max(stats.relative_difference(a['loss'], b['loss']), 1e-12) for a, b in pairs]
        ax.plot(range(1, len(diffs) + 1), diffs, lw=0.8, color=f'C{i}', label=f'seed {run["seed"]}')
    for tol in stats.PARTING_TOLERANCES:
        ax.axhline(tol, color='grey', ls=':', lw=1)
    ax.set_title('|plugin - upstream| / upstream, total loss (0 at 1e-12)')
    ax.set_xlabel('iteration')
    ax.set_yscale('log')
    ax.set_xscale('log')
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_file, dpi=100)
    plt.close(fig)
