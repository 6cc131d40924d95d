"""tools/analyze_assignments.py on a tiny COCO-format dataset written by the test."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip('mmdet')
Image = pytest.importorskip('PIL.Image')

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / 'tools' / 'analyze_assignments.py'

# (image size, boxes x, y, w, h): one tiny box (no anchor of RetinaNet's sizes reaches IoU
# 0.5 with it), medium and large boxes, a 64x64 and a 128x128 image.
IMAGES = [
    (128, [(10, 12, 40, 30), (70, 60, 50, 60), (100, 10, 6, 6)]),
    (64, [(4, 4, 30, 24), (40, 36, 20, 24)]),
    (128, [(0, 0, 127, 127)]),
    (128, [(30, 30, 20, 20), (60, 80, 12, 40)]),
]
NUM_GTS = sum(len(boxes) for _, boxes in IMAGES)

CONFIG = """
default_scope = 'mmdet'
classes = ('box', 'bar')
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='Resize', scale=(128, 128), keep_ratio=True),
    dict(type='PackDetInputs'),
]
train_dataloader = dict(
    batch_size=2,
    dataset=dict(
        type='CocoDataset',
        data_root={root!r},
        ann_file='annotations/train.json',
        data_prefix=dict(img='images/'),
        metainfo=dict(classes=classes),
        filter_cfg=dict(filter_empty_gt=True, min_size=8),
        pipeline=train_pipeline,
    ),
)
model = dict(
    type='RetinaNet',
    data_preprocessor=dict(
        type='DetDataPreprocessor', mean=[0, 0, 0], std=[1, 1, 1], bgr_to_rgb=True,
        pad_size_divisor=32),
    bbox_head=dict(
        type='RetinaHead',
        num_classes=2,
        in_channels=8,
        anchor_generator=dict(
            type='AnchorGenerator', octave_base_scale=4, scales_per_octave=3,
            ratios=[0.5, 1.0, 2.0], strides=[8, 16, 32, 64, 128]),
    ),
    train_cfg=dict(
        assigner=dict(type='MaxIoUAssigner', pos_iou_thr=0.5, neg_iou_thr=0.4, min_pos_iou=0.3,
                      ignore_iof_thr=-1),
        sampler=dict(type='PseudoSampler'),
        allowed_border=-1,
        pos_weight=-1,
        debug=False,
    ),
)
"""


def write_dataset(root: Path) -> None:
    (root / 'images').mkdir(parents=True)
    (root / 'annotations').mkdir()
    rng = np.random.default_rng(0)
    images, annotations = [], []
    for i, (size, boxes) in enumerate(IMAGES):
        pixels = rng.integers(40, 90, (size, size, 3), dtype=np.uint8)
        for x, y, w, h in boxes:
            pixels[y : y + h, x : x + w] = (200, 180, 60)
        name = f'{i:03d}.png'
        Image.fromarray(pixels).save(root / 'images' / name)
        images.append(dict(id=i + 1, file_name=name, width=size, height=size))
        for j, (x, y, w, h) in enumerate(boxes):
            annotations.append(
                dict(
                    id=len(annotations) + 1,
                    image_id=i + 1,
                    category_id=1 + j % 2,
                    bbox=[x, y, w, h],
                    area=w * h,
                    iscrowd=0,
                )
            )
    categories = [dict(id=1, name='box'), dict(id=2, name='bar')]
    coco = dict(images=images, annotations=annotations, categories=categories)
    (root / 'annotations' / 'train.json').write_text(json.dumps(coco))


def load_tool():
    spec = importlib.util.spec_from_file_location('analyze_assignments', TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def has_color(png: Path, rgb, tol: int = 40) -> bool:
    pixels = np.asarray(Image.open(png).convert('RGB')).astype(int)
    return bool((np.abs(pixels - np.array(rgb)).max(axis=-1) <= tol).any())


def test_tool_writes_every_file(tmp_path):
    data_root = tmp_path / 'data'
    write_dataset(data_root)
    config = tmp_path / 'tiny_retina.py'
    config.write_text(CONFIG.format(root=str(data_root)))
    out = tmp_path / 'out'

    summary = load_tool().main(
        [str(config), '--num-images', '10', '--num-show', '2', '--out', str(out)]
    )

    expected = [
        'summary.md',
        'summary.json',
        'assignments_0.png',
        'assignments_1.png',
        'best_iou_hist.png',
        'positives_per_level.png',
    ]
    for name in expected:
        assert (out / name).is_file(), name
    assert not (out / 'assignments_2.png').exists()
    on_disk = json.loads((out / 'summary.json').read_text())
    assert on_disk['num_images'] == 4 and on_disk['num_gts'] == NUM_GTS
    assert on_disk['anchors']['positives'] == summary['anchors']['positives'] > 0
    assert len(on_disk['levels']) == 5
    assert on_disk['levels'][0]['name'] == 'L0 (stride 8)'
    # 128x128 input, pad 32: 16x16, 8x8, 4x4, 2x2, 1x1 locations, 9 anchors each.
    assert on_disk['setup']['featmap_sizes_first_image'] == [
        [16, 16],
        [8, 8],
        [4, 4],
        [2, 2],
        [1, 1],
    ]
    assert on_disk['anchors']['total_per_image'] == 9 * (256 + 64 + 16 + 4 + 1)
    # The 6x6 box of image 0 gets no positive with min_pos_iou=0.3: the smallest anchor
    # (32 px) has IoU <= 36 / 1024 with it. Image 1 is resized 64 -> 128, boxes doubled.
    small = on_disk['gts_without_pos']['by_size']['small']
    assert small['without_pos'] >= 1 and on_disk['images'][0]['gts_without_pos'] == 1
    assert sum(on_disk['pos_per_gt']['histogram'].values()) == NUM_GTS
    assert sum(on_disk['best_iou']['histogram']['counts']) == NUM_GTS
    assert sum(lv['positives'] for lv in on_disk['levels']) == on_disk['anchors']['positives']

    md = (out / 'summary.md').read_text()
    for heading in ('Positives per level', 'Positives per gt', 'no positive anchor', 'best anchor'):
        assert heading in md
    assert 'L4 (stride 128)' in md

    for name in expected[2:]:
        pixels = np.asarray(Image.open(out / name).convert('RGB')).astype(float)
        assert pixels.shape[0] > 100 and pixels.shape[1] > 100
        assert pixels.var() > 0, name
    assert has_color(out / 'assignments_0.png', (0, 255, 0))  # matched gts
    assert has_color(out / 'assignments_0.png', (255, 0, 0))  # the unmatched 6x6 box


def test_tool_runs_on_the_shapes_config(tmp_path):
    """The demo's RetinaNet shapes config (plugin assigner) on a tiny generated dataset."""
    import subprocess
    import sys

    data = tmp_path / 'shapes'
    subprocess.run(
        [
            sys.executable,
            str(ROOT / 'tools' / 'make_shapes_dataset.py'),
            '--out',
            str(data),
            '--num-train',
            '6',
            '--num-val',
            '2',
        ],
        check=True,
        capture_output=True,
        cwd=ROOT,
    )
    out = tmp_path / 'out'
    summary = load_tool().main(
        [
            str(ROOT / 'configs/shapes/retinanet_r18_fpn_shapes.py'),
            '--num-images',
            '6',
            '--num-show',
            '1',
            '--out',
            str(out),
            '--cfg-options',
            f'train_dataloader.dataset.data_root={data}/',
        ]
    )
    for name in (
        'summary.md',
        'summary.json',
        'assignments_0.png',
        'best_iou_hist.png',
        'positives_per_level.png',
    ):
        assert (out / name).is_file(), name
    on_disk = json.loads((out / 'summary.json').read_text())
    assert on_disk['num_images'] == 6 and on_disk['num_gts'] >= 6
    assert 'BatchMaxIoUAssigner' in json.dumps(on_disk['setup'])
    assert summary['anchors']['positives'] > 0
    pixels = np.asarray(Image.open(out / 'assignments_0.png').convert('RGB')).astype(float)
    assert pixels.var() > 0
