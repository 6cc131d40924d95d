"""Pictures of an anchor assignment (matplotlib, Agg canvas; pyplot's global state untouched)."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Sequence, Union

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator

from .assignment_stats import SIZE_BUCKETS

#: Colour of gts that have at least one positive anchor (pure green, easy to find in a PNG).
GT_COLOR = '#00ff00'
#: Colour of gts that have no positive anchor (drawn dashed and thicker).
UNMATCHED_COLOR = '#ff0000'
#: Colours of positive anchors by level (no green, no red: those are the gts').
LEVEL_COLORS = (
    '#1f77b4',
    '#ff7f0e',
    '#9467bd',
    '#17becf',
    '#e377c2',
    '#bcbd22',
    '#8c564b',
    '#7f7f7f',
)
SIZE_COLORS = ('#4c72b0', '#dd8452', '#55a868')

PathLike = Union[str, Path]


def level_color(level: int) -> str:
    """Colour of a level's positive anchors."""
    return LEVEL_COLORS[level % len(LEVEL_COLORS)]


def _new_figure(width: float, height: float, dpi: int = 100) -> Figure:
    fig = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def _numpy(t: Union[torch.Tensor, np.ndarray]) -> np.ndarray:
    return t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)


def plot_assignments(
    image: np.ndarray,
    gt_bboxes: torch.Tensor,
    pos_anchors: torch.Tensor,
    pos_levels: torch.Tensor,
    pos_per_gt: torch.Tensor,
    level_names: Sequence[str],
    out_path: PathLike,
    title: Optional[str] = None,
) -> None:
    """Draw an image, its gts and their positive anchors coloured by level.

    Gts with positives are solid green with their positive count; gts without any positive
    anchor are red and dashed.

    Args:
        image (np.ndarray): (H, W, 3) uint8 RGB, the network input before normalisation.
        gt_bboxes (Tensor): (G, 4) float, gts (x1, y1, x2, y2) in image pixels.
        pos_anchors (Tensor): (P, 4) float, positive anchors.
        pos_levels (Tensor): (P,) long, level of each positive anchor.
        pos_per_gt (Tensor): (G,) long, positives of each gt.
        level_names (Sequence[str]): L level names for the legend.
        out_path (str | Path): PNG to write.
        title (str, optional): figure title.
    """
    img_h, img_w = image.shape[:2]
    scale = min(max(1.0, 512.0 / max(img_h, img_w)), 4.0)
    fig = _new_figure(img_w * scale / 100 + 2.8, img_h * scale / 100 + 0.6)
    ax = fig.add_axes((0.02, 0.02, 0.96, 0.9))
    ax.imshow(image, interpolation='nearest')
    ax.set_xlim(-0.5, img_w - 0.5)
    ax.set_ylim(img_h - 0.5, -0.5)
    ax.set_axis_off()

    boxes = _numpy(pos_anchors).reshape(-1, 4)
    levels = _numpy(pos_levels).reshape(-1)
    for (x1, y1, x2, y2), lvl in zip(boxes, levels):
        ax.add_patch(
            Rectangle(
                (x1, y1),
                x2 - x1,
                y2 - y1,
                fill=False,
                edgecolor=level_color(int(lvl)),
                linewidth=0.8,
                alpha=0.8,
                zorder=2,
            )
        )
    counts = _numpy(pos_per_gt).reshape(-1)
    for (x1, y1, x2, y2), n in zip(_numpy(gt_bboxes).reshape(-1, 4), counts):
        matched = n > 0
        ax.add_patch(
            Rectangle(
                (x1, y1),
                x2 - x1,
                y2 - y1,
                fill=False,
                edgecolor=GT_COLOR if matched else UNMATCHED_COLOR,
                linewidth=2.0 if matched else 2.5,
                linestyle='-' if matched else '--',
                zorder=3,
            )
        )
        ax.text(
            x1,
            y1,
            str(int(n)),
            color='black',
            fontsize=7,
            va='bottom',
            ha='left',
            zorder=4,
            bbox=dict(
                facecolor=GT_COLOR if matched else UNMATCHED_COLOR, edgecolor='none', pad=0.5
            ),
        )

    num_unmatched = int((counts == 0).sum())
    handles = [
        Line2D(
            [], [], color=GT_COLOR, lw=2, label=f'gt with positives ({len(counts) - num_unmatched})'
        ),
        Line2D(
            [],
            [],
            color=UNMATCHED_COLOR,
            lw=2.5,
            ls='--',
            label=f'gt, no positive ({num_unmatched})',
        ),
    ]
    for i, name in enumerate(level_names):
        n = int((levels == i).sum())
        handles.append(Line2D([], [], color=level_color(i), lw=1.5, label=f'{name}: {n} pos'))
    ax.legend(
        handles=handles,
        loc='upper left',
        bbox_to_anchor=(1.01, 1.0),
        fontsize=8,
        title='number = positives of the gt',
        title_fontsize=7,
        frameon=False,
    )
    if title:
        ax.set_title(title, fontsize=9)
    fig.savefig(out_path, bbox_inches='tight', dpi=100)


def plot_best_iou_hist(
    best_iou: torch.Tensor,
    out_path: PathLike,
    thresholds: Optional[Dict[str, float]] = None,
    buckets: Optional[torch.Tensor] = None,
    title: Optional[str] = None,
) -> None:
    """Histogram of each gt's best anchor IoU, with the assigner's thresholds as lines.

    Args:
        best_iou (Tensor): (G,) float.
        out_path (str | Path): PNG to write.
        thresholds (dict[str, float], optional): name -> IoU, e.g. ``{'pos_iou_thr': 0.5}``.
        buckets (Tensor, optional): (G,) long size bucket of each gt; bars are then stacked by
            size (small, medium, large).
        title (str, optional): axes title.
    """
    fig = _new_figure(6.4, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    values = _numpy(best_iou).reshape(-1)
    bins = np.linspace(0, 1, 21)
    if buckets is None:
        ax.hist(values, bins=bins, color=SIZE_COLORS[0], edgecolor='white')
    else:
        size = _numpy(buckets).reshape(-1)
        ax.hist(
            [values[size == j] for j in range(len(SIZE_BUCKETS))],
            bins=bins,
            stacked=True,
            color=list(SIZE_COLORS),
            edgecolor='white',
            label=[f'{b} gts' for b in SIZE_BUCKETS],
        )
    styles = ('--', ':', '-.', '-')
    for i, (name, thr) in enumerate((thresholds or {}).items()):
        ax.axvline(
            thr, color='#c44e52', ls=styles[i % len(styles)], lw=1.5, label=f'{name}={thr:g}'
        )
    if thresholds or buckets is not None:
        ax.legend(fontsize=8)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlim(0, 1)
    ax.set_xlabel("gt's best IoU with any anchor the assigner sees")
    ax.set_ylabel('number of gts')
    ax.set_title(title or f'Best anchor IoU per gt ({len(values)} gts)', fontsize=10)
    fig.savefig(out_path, bbox_inches='tight')


def plot_positives_per_level(
    summary: dict, out_path: PathLike, title: Optional[str] = None
) -> None:
    """Bars of positives per image on each level, stacked by the size bucket of their gt.

    Args:
        summary (dict): output of :func:`~.assignment_stats.summarize`.
        out_path (str | Path): PNG to write.
        title (str, optional): axes title.
    """
    levels = summary['levels']
    num_images = max(summary['num_images'], 1)
    fig = _new_figure(max(4.0, 1.0 + 0.9 * len(levels)), 4.0)
    ax = fig.add_subplot(1, 1, 1)
    x = np.arange(len(levels))
    bottom = np.zeros(len(levels))
    for bucket, color in zip(SIZE_BUCKETS, SIZE_COLORS):
        heights = np.array([lv['positives_by_size'][bucket] / num_images for lv in levels])
        ax.bar(x, heights, bottom=bottom, color=color, label=f'{bucket} gts')
        bottom += heights
    for xi, total, lv in zip(x, bottom, levels):
        ax.text(
            xi,
            total,
            f'{total:.1f}\n{100 * lv["positive_share"]:.0f}%',
            ha='center',
            va='bottom',
            fontsize=7,
        )
    ax.set_xticks(x)
    ax.set_xticklabels([lv['name'] for lv in levels], rotation=30, ha='right', fontsize=8)
    ax.set_ylabel('positive anchors per image')
    ax.set_ylim(0, max(float(bottom.max()) * 1.25, 1.0))
    ax.legend(fontsize=8)
    ax.set_title(title or f'Positives per level ({summary["num_images"]} images)', fontsize=10)
    fig.savefig(out_path, bbox_inches='tight')
