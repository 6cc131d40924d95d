"""See the assignment: which anchors each gt gets, per level and per size, with pictures.

Builds the config's dataset (with its pipeline) and the data preprocessor, and only the
anchor head's prior generator and assigner (no backbone), then assigns every image's gts to
anchors exactly as the head's ``get_targets`` does. Writes into ``--out``::

    summary.md, summary.json       the numbers (see docs/diagnostics.md)
    assignments_<k>.png            image, gts and their positive anchors coloured by level
    best_iou_hist.png              each gt's best anchor IoU, with the assigner's thresholds
    positives_per_level.png        positives per image on each level, by gt size

Example::

    python tools/analyze_assignments.py configs/shapes/retinanet_r18_fpn_shapes.py \
        --num-images 50
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))

from mmdet_anchorloss.diagnostics import per_image_stats, summarize  # noqa: E402
from mmdet_anchorloss.diagnostics.head_assign import (  # noqa: E402
    assign_like_head,
    build_head_parts,
)
from mmdet_anchorloss.diagnostics.plots import (  # noqa: E402
    plot_assignments,
    plot_best_iou_hist,
    plot_positives_per_level,
)
from mmdet_anchorloss.diagnostics.report import summary_to_markdown  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    from mmengine.config import DictAction

    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('config', help='mmdet config with an anchor head (bbox_head or rpn_head)')
    parser.add_argument('--num-images', type=int, default=50, help='images to analyse')
    parser.add_argument('--num-show', type=int, default=4, help='assignments_<k>.png to draw')
    parser.add_argument('--out', help='output folder (default work_dirs/analyze/<config name>)')
    parser.add_argument('--split', choices=('train', 'val'), default='train')
    parser.add_argument('--seed', type=int, default=0, help='seed of the random augmentations')
    parser.add_argument(
        '--cfg-options', nargs='+', action=DictAction, help='override config keys, key=value'
    )
    return parser.parse_args(argv)


def _thresholds(assigner) -> dict:
    out = {}
    for name in ('neg_iou_thr', 'pos_iou_thr', 'min_pos_iou'):
        value = getattr(assigner, name, None)
        if isinstance(value, (tuple, list)):
            value = value[-1]
        if isinstance(value, (int, float)) and 0 <= value <= 1:
            out[name] = float(value)
    return out


def _display_image(inputs: torch.Tensor) -> np.ndarray:
    """(C, H, W) uint8 BGR as the pipeline packs it -> (H, W, 3) uint8 RGB."""
    img = inputs.detach().cpu()
    img = img.expand(3, -1, -1) if img.shape[0] == 1 else img[[2, 1, 0]]
    return img.permute(1, 2, 0).clamp(0, 255).to(torch.uint8).numpy()


def main(argv=None) -> dict:
    args = parse_args(argv)
    from mmdet.registry import DATASETS, MODELS
    from mmdet.utils import register_all_modules
    from mmengine.config import Config
    from mmengine.dataset import pseudo_collate
    from mmengine.utils import import_modules_from_strings
    from tqdm import tqdm

    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    register_all_modules(init_default_scope=True)
    if cfg.get('custom_imports'):
        import_modules_from_strings(**cfg.custom_imports)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)

    out_dir = Path(args.out or Path('work_dirs/analyze') / Path(args.config).stem)
    out_dir.mkdir(parents=True, exist_ok=True)

    loader_key = f'{args.split}_dataloader'
    if cfg.get(loader_key) is None:
        raise SystemExit(f'{args.config}: no {loader_key} in the config')
    dataset = DATASETS.build(cfg[loader_key]['dataset'])
    preprocessor = MODELS.build(
        cfg.model.get('data_preprocessor') or dict(type='DetDataPreprocessor')
    )
    parts = build_head_parts(cfg.model)
    num_images = min(args.num_images, len(dataset))
    if num_images <= 0:
        raise SystemExit(f'{args.config}: the {args.split} dataset is empty')

    started = time.perf_counter()
    stats, images, first_sizes = [], [], None
    for k in tqdm(range(num_images), desc='assigning', unit='img'):
        data = dataset[k]
        sample = preprocessor(pseudo_collate([data]), training=False)['data_samples'][0]
        if 'gt_instances' not in sample or 'bboxes' not in sample.gt_instances:
            raise SystemExit(f'{args.split} pipeline packs no gt boxes (add LoadAnnotations)')
        assignment = assign_like_head(parts, sample)
        first_sizes = first_sizes or assignment.featmap_sizes
        st = per_image_stats(
            assignment.anchors_per_level,
            assignment.inside_flags,
            assignment.assign_result.gt_inds,
            assignment.gt_bboxes,
        )
        stats.append(st)
        images.append(
            {
                'img_path': str(sample.metainfo.get('img_path', '')),
                'img_shape': list(sample.metainfo['img_shape'][:2]),
                'num_gts': int(st.pos_per_gt.numel()),
                'positives': int(st.pos_per_level.sum()),
                'gts_without_pos': int((st.pos_per_gt == 0).sum()),
            }
        )
        if k < args.num_show:
            plot_assignments(
                _display_image(data['inputs']),
                assignment.gt_bboxes,
                st.pos_anchors,
                st.pos_levels,
                st.pos_per_gt,
                parts.level_names,
                out_dir / f'assignments_{k}.png',
                title=f'{Path(images[-1]["img_path"]).name}  {tuple(images[-1]["img_shape"])}',
            )
    elapsed = time.perf_counter() - started

    thresholds = _thresholds(parts.assigner)
    summary = summarize(
        stats, level_names=parts.level_names, pos_iou_thr=thresholds.get('pos_iou_thr')
    )
    summary['setup'] = {
        'config': str(args.config),
        'split': args.split,
        'head': f'model.{parts.head_key} ({parts.head_type})',
        'assigner': parts.assigner_cfg,
        'allowed_border': parts.allowed_border,
        'strides': [list(s) for s in parts.strides],
        'featmap_sizes_first_image': [list(s) for s in first_sizes],
        'seconds': round(elapsed, 2),
    }
    summary['images'] = images
    (out_dir / 'summary.json').write_text(json.dumps(summary, indent=2, default=str))
    info = {
        'config': f'`{args.config}` ({args.split} split)',
        'head': summary['setup']['head'],
        'assigner': f'{type(parts.assigner).__name__} '
        + ', '.join(f'{k}={v:g}' for k, v in thresholds.items()),
        'allowed_border': str(parts.allowed_border),
        'feature maps (first image)': ', '.join(
            f'{n}: {h}x{w}' for n, (h, w) in zip(parts.level_names, first_sizes)
        ),
    }
    (out_dir / 'summary.md').write_text(summary_to_markdown(summary, info))
    plot_best_iou_hist(
        torch.cat([s.best_iou for s in stats]),
        out_dir / 'best_iou_hist.png',
        thresholds,
        buckets=torch.cat([s.gt_buckets for s in stats]),
    )
    plot_positives_per_level(summary, out_dir / 'positives_per_level.png')
    unmatched = summary['gts_without_pos']
    print(
        f'{num_images} images, {summary["num_gts"]} gts, '
        f'{summary["anchors"]["positives_per_image"]:.1f} positives/image, '
        f'{unmatched["total"]} gts without positive ({100 * unmatched["share"]:.1f}%); '
        f'wrote {out_dir}/summary.md'
    )
    return summary


if __name__ == '__main__':
    main()
