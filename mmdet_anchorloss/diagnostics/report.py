"""Markdown rendering of an assignment summary (the dict of ``assignment_stats.summarize``)."""

from __future__ import annotations

from typing import Dict, List, Optional

from .assignment_stats import SIZE_BUCKETS


def _table(header: List[str], rows: List[List[str]]) -> List[str]:
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '|'.join('---' for _ in header) + '|']
    lines += ['| ' + ' | '.join(row) + ' |' for row in rows]
    return lines


def summary_to_markdown(summary: dict, info: Optional[Dict[str, str]] = None) -> str:
    """Render a summary as Markdown.

    Args:
        summary (dict): output of :func:`~.assignment_stats.summarize`.
        info (dict[str, str], optional): key -> value lines for the header (config, assigner).

    Returns:
        str: the Markdown text, ending with a newline.
    """
    out = ['# Anchor assignment summary', '']
    for key, value in (info or {}).items():
        out.append(f'- **{key}**: {value}')
    anchors = summary['anchors']
    out += [
        f'- **images**: {summary["num_images"]}, **gts**: {summary["num_gts"]} '
        f'({summary["gts_per_image"]:.2f} per image)',
        f'- **anchors per image**: {anchors["total_per_image"]:.0f} in total, '
        f'{anchors["inside_per_image"]:.0f} seen by the assigner, '
        f'{anchors["outside_per_image"]:.0f} outside (invalid or beyond allowed_border)',
        f'- **per image**: {anchors["positives_per_image"]:.2f} positive, '
        f'{anchors["negatives_per_image"]:.1f} negative, '
        f'{anchors["ignored_per_image"]:.1f} ignored (neither)',
        f'- **totals**: {anchors["positives"]} positive, {anchors["negatives"]} negative, '
        f'{anchors["ignored"]} ignored',
        '',
        '## Positives per level',
        '',
    ]
    rows = []
    for lv in summary['levels']:
        by = lv['positives_by_size']
        rows.append(
            [
                lv['name'],
                f'{lv["inside_per_image"]:.0f}',
                str(lv['positives']),
                f'{lv["positives_per_image"]:.2f}',
                f'{100 * lv["positive_share"]:.1f}%',
                ' / '.join(str(by[b]) for b in SIZE_BUCKETS),
                str(lv['gts_best_here']),
            ]
        )
    out += _table(
        [
            'level',
            'anchors seen / img',
            'positives',
            'pos / img',
            'share',
            'pos of small / medium / large gts',
            'gts whose best anchor is here',
        ],
        rows,
    )

    ppg = summary['pos_per_gt']
    out += [
        '',
        '## Positives per gt',
        '',
        f'mean {ppg["mean"]:.2f}, min {ppg["min"]}, max {ppg["max"]}',
        '',
    ]
    hist = ppg['histogram']
    out += _table(['positives'] + list(hist), [['gts'] + [str(v) for v in hist.values()]])

    unmatched = summary['gts_without_pos']
    out += [
        '',
        '## Gts with no positive anchor',
        '',
        f'{unmatched["total"]} of {summary["num_gts"]} ({100 * unmatched["share"]:.1f}%). '
        'Size buckets by box area in the network input (COCO: small < 32², medium < 96²).',
        '',
    ]
    rows = []
    for bucket in SIZE_BUCKETS:
        b = unmatched['by_size'][bucket]
        rows.append(
            [
                bucket,
                str(b['num_gts']),
                str(b['without_pos']),
                f'{100 * b["share_without_pos"]:.1f}%',
                f'{b["mean_pos_per_gt"]:.2f}',
                f'{b["mean_best_iou"]:.3f}',
            ]
        )
    out += _table(['size', 'gts', 'no positive', 'share', 'mean pos / gt', 'mean best IoU'], rows)

    best = summary['best_iou']
    line = f'mean {best["mean"]:.3f}'
    if 'pos_iou_thr' in best:
        line += (
            f'; {best["below_pos_iou_thr"]} gts ({100 * best["share_below_pos_iou_thr"]:.1f}%) '
            f'have no anchor with IoU >= pos_iou_thr={best["pos_iou_thr"]:g} (positive only '
            'through low-quality matching, if at all)'
        )
    out += ['', "## Each gt's best anchor IoU", '', line]
    q = best['quantiles']
    if q:
        out += ['', 'Quantiles:', ''] + _table(list(q), [[f'{v:.3f}' for v in q.values()]])
    edges, counts = best['histogram']['edges'], best['histogram']['counts']
    out += ['', 'Histogram (gts per IoU bin, bins [lo, hi), the last one closed):', '']
    out += _table([f'{lo:.2f}' for lo in edges[:-1]], [[str(c) for c in counts]])
    return '\n'.join(out) + '\n'
