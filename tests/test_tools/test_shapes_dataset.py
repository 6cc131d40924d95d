"""tools/make_shapes_dataset.py: deterministic bytes, valid COCO, tight boxes inside images."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / 'tools' / 'make_shapes_dataset.py'


def generate(out: Path, *extra: str, num_train: int = 6, num_val: int = 3) -> Path:
    """Run the generator as a user would and return the output directory."""
    cmd = [sys.executable, str(SCRIPT), '--out', str(out), '--num-train', str(num_train)]
    cmd += ['--num-val', str(num_val), *extra]
    subprocess.run(cmd, check=True, capture_output=True)
    return out


def tree_digest(root: Path) -> str:
    """SHA-256 over every file's relative path and bytes, in sorted order."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob('*') if p.is_file()):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope='module')
def dataset(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp('shapes') / 'a')


def test_same_seed_same_bytes(dataset, tmp_path):
    again = generate(tmp_path / 'b')
    assert tree_digest(again) == tree_digest(dataset)


def test_other_seed_other_bytes(dataset, tmp_path):
    other = generate(tmp_path / 'c', '--seed', '1')
    assert tree_digest(other) != tree_digest(dataset)


def test_val_split_independent_of_train_size(dataset, tmp_path):
    bigger = generate(tmp_path / 'd', num_train=9)
    assert tree_digest(bigger / 'val') == tree_digest(dataset / 'val')
    for name in ('000000.png', '000005.png'):
        assert (bigger / 'train' / name).read_bytes() == (dataset / 'train' / name).read_bytes()


@pytest.mark.parametrize('split, num', [('train', 6), ('val', 3)])
def test_coco_layout_and_boxes(dataset, split, num):
    coco = json.loads((dataset / 'annotations' / f'{split}.json').read_text())
    assert [c['name'] for c in coco['categories']] == ['circle', 'square', 'triangle']
    assert [c['id'] for c in coco['categories']] == [1, 2, 3]
    assert len(coco['images']) == num
    assert min(img['id'] for img in coco['images']) >= 1
    ann_ids = [ann['id'] for ann in coco['annotations']]
    assert min(ann_ids) >= 1 and len(set(ann_ids)) == len(ann_ids)
    per_image = {img['id']: 0 for img in coco['images']}
    for ann in coco['annotations']:
        per_image[ann['image_id']] += 1
    assert all(1 <= count <= 6 for count in per_image.values())
    for img in coco['images']:
        pixels = cv2.imread(str(dataset / split / img['file_name']), cv2.IMREAD_UNCHANGED)
        assert pixels.shape == (256, 256, 3) and pixels.dtype == np.uint8
        assert (img['height'], img['width']) == (256, 256)
    for ann in coco['annotations']:
        x, y, w, h = ann['bbox']
        assert x >= 0 and y >= 0 and x + w <= 256 and y + h <= 256, ann
        assert 6 <= max(w, h) <= 140, ann  # 8..96 px shapes, rotation grows the box
        assert 0 < ann['area'] <= w * h and ann['iscrowd'] == 0


def test_boxes_are_tight(tmp_path):
    """A lone shape's box edges touch its pixels: redraw one image's mask and compare."""
    tools = str(ROOT / 'tools')
    sys.path.insert(0, tools)
    try:
        import make_shapes_dataset as shapes
    finally:
        sys.path.remove(tools)
    rng = np.random.default_rng(3)
    for label in range(3):
        mask = shapes.shape_mask(rng, label, 40.0, 128)
        x, y, w, h = shapes.tight_box(mask)
        ys, xs = np.nonzero(mask)
        assert (x, y, x + w - 1, y + h - 1) == (xs.min(), ys.min(), xs.max(), ys.max())
        assert 30 <= max(w, h) <= 60


def test_small_image_option(tmp_path):
    out = generate(tmp_path / 'small', '--img-size', '64', num_train=4, num_val=2)
    coco = json.loads((out / 'annotations' / 'train.json').read_text())
    assert {(img['width'], img['height']) for img in coco['images']} == {(64, 64)}
    assert cv2.imread(str(out / 'train' / '000000.png')).shape == (64, 64, 3)
    for ann in coco['annotations']:
        x, y, w, h = ann['bbox']
        assert x >= 0 and y >= 0 and x + w <= 64 and y + h <= 64
