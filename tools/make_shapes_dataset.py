"""Write the synthetic "shapes" detection dataset in COCO format.

Three classes (circle, square, triangle) of varied size and colour on textured, noisy
backgrounds; 1 to 6 objects per image, overlaps allowed. Every image has its own random
generator seeded from ``(seed, split, index)``, so the same arguments always give the same
bytes, and the val split does not depend on ``--num-train``.

Layout written under ``--out``::

    train/000000.png ...        val/000000.png ...
    annotations/train.json      annotations/val.json

Boxes are tight around each shape's own pixels (``[x, y, w, h]`` in pixel-edge coordinates,
so ``x + w <= width``) even when a later shape covers part of it.

Example::

    python tools/make_shapes_dataset.py --out data/shapes --num-train 1000 --num-val 200
"""

import argparse
import json
import time
from pathlib import Path
from typing import Dict, List, Tuple

import cv2
import numpy as np
from tqdm import tqdm

CLASSES = ('circle', 'square', 'triangle')
SPLIT_IDS = {'train': 0, 'val': 1}
PNG_PARAMS = [cv2.IMWRITE_PNG_COMPRESSION, 3]
# Object sizes for a 256 px image; scaled with --img-size.
BASE_IMG_SIZE = 256
BASE_MIN_OBJ, BASE_MAX_OBJ = 8, 96
MIN_CONTRAST = 60.0


def parse_args() -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description='Write the synthetic shapes dataset (COCO).')
    parser.add_argument('--out', default='data/shapes', help='output directory')
    parser.add_argument('--num-train', type=int, default=1000, help='number of train images')
    parser.add_argument('--num-val', type=int, default=200, help='number of val images')
    parser.add_argument('--seed', type=int, default=0, help='random seed')
    parser.add_argument(
        '--img-size',
        type=int,
        default=BASE_IMG_SIZE,
        help='image side in pixels (small values for quick tests); object sizes scale with it',
    )
    parser.add_argument('--max-objects', type=int, default=6, help='most objects per image')
    return parser.parse_args()


def object_size_range(img_size: int) -> Tuple[int, int]:
    """Smallest and largest object side for an image side, scaled from 8..96 at 256 px."""
    scale = img_size / BASE_IMG_SIZE
    lo = max(6, round(BASE_MIN_OBJ * scale))
    hi = max(lo + 1, round(BASE_MAX_OBJ * scale))
    return lo, hi


def make_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A textured background: colour gradient + low-frequency blobs + pixel noise.

    Returns:
        np.ndarray: (size, size, 3) float32 image in [0, 255] (not yet clipped).
    """
    base = rng.uniform(40, 215, size=3)
    ramp = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    grad = np.cos(angle) * ramp[None, :] + np.sin(angle) * ramp[:, None]
    img = base[None, None, :] + grad[..., None] * rng.uniform(-40, 40, size=3)
    cells = int(rng.integers(3, 9))
    blobs = rng.normal(0.0, rng.uniform(5, 30), size=(cells, cells, 3)).astype(np.float32)
    img = img + cv2.resize(blobs, (size, size), interpolation=cv2.INTER_CUBIC)
    img = img + rng.normal(0.0, rng.uniform(3, 15), size=(size, size, 3))
    return img.astype(np.float32)


def shape_mask(rng: np.random.Generator, label: int, side: int, img_size: int) -> np.ndarray:
    """Draw one filled shape of about ``side`` pixels somewhere inside the image.

    Args:
        rng: the image's generator.
        label: class index into ``CLASSES``.
        side: box side in pixels before rotation.
        img_size: image side.

    Returns:
        np.ndarray: (img_size, img_size) uint8 mask, 1 inside the shape.
    """
    half = side / 2.0
    # Rotated squares and triangles stay inside a circle of radius half * sqrt(2).
    reach = half if label == 0 else half * 1.42
    cx = rng.uniform(reach, img_size - reach)
    cy = rng.uniform(reach, img_size - reach)
    mask = np.zeros((img_size, img_size), np.uint8)
    if label == 0:
        cv2.circle(mask, (round(cx), round(cy)), max(2, round(half)), 1, thickness=-1)
        return mask
    theta = np.deg2rad(rng.uniform(-30, 30))
    if label == 1:
        corners = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], np.float64) * half
    else:
        corners = np.array([[0, -1], [0.866, 0.5], [-0.866, 0.5]], np.float64) * half * 1.15
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    pts = corners @ rot.T + np.array([cx, cy])
    pts = np.clip(np.round(pts), 0, img_size - 1).astype(np.int32)
    cv2.fillPoly(mask, [pts], 1)
    return mask


def tight_box(mask: np.ndarray) -> List[float]:
    """COCO ``[x, y, w, h]`` of the nonzero pixels of a (H, W) mask."""
    ys = np.flatnonzero(mask.any(axis=1))
    xs = np.flatnonzero(mask.any(axis=0))
    x0, y0 = int(xs[0]), int(ys[0])
    return [float(x0), float(y0), float(xs[-1] + 1 - x0), float(ys[-1] + 1 - y0)]


def object_colour(rng: np.random.Generator, background: np.ndarray) -> np.ndarray:
    """A colour that stands out from the mean of the pixels it covers."""
    colour = rng.uniform(0, 255, size=3)
    for _ in range(20):
        if np.abs(colour - background).sum() >= MIN_CONTRAST:
            break
        colour = rng.uniform(0, 255, size=3)
    return colour


def make_image(
    rng: np.random.Generator, img_size: int, max_objects: int
) -> Tuple[np.ndarray, List[Dict]]:
    """Render one image and its objects.

    Returns:
        tuple: (img_size, img_size, 3) uint8 BGR image, and a list of
        ``dict(label=int, bbox=[x, y, w, h], area=float)``.
    """
    img = make_background(rng, img_size)
    lo, hi = object_size_range(img_size)
    objects = []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        label = int(rng.integers(len(CLASSES)))
        side = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
        mask = shape_mask(rng, label, side, img_size).astype(bool)
        colour = object_colour(rng, img[mask].mean(axis=0))
        noise = rng.normal(0.0, rng.uniform(2, 12), size=(int(mask.sum()), 3))
        img[mask] = colour + noise
        objects.append(dict(label=label, bbox=tight_box(mask), area=float(mask.sum())))
    return np.clip(np.round(img), 0, 255).astype(np.uint8), objects


def write_split(args: argparse.Namespace, split: str, num: int) -> Dict:
    """Write the images of one split and return its COCO annotation dict."""
    img_dir = Path(args.out) / split
    img_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for idx in tqdm(range(num), desc=f'shapes {split}', unit='img'):
        rng = np.random.default_rng([args.seed, SPLIT_IDS[split], idx])
        img, objects = make_image(rng, args.img_size, args.max_objects)
        file_name = f'{idx:06d}.png'
        ok, png = cv2.imencode('.png', img, PNG_PARAMS)
        assert ok, f'PNG encoding failed for {split}/{file_name}'
        (img_dir / file_name).write_bytes(png.tobytes())
        # COCO ids start at 1: pycocotools' matcher treats id 0 as "unmatched".
        img_id = idx + 1
        images.append(
            dict(id=img_id, file_name=file_name, width=args.img_size, height=args.img_size)
        )
        for obj in objects:
            annotations.append(
                dict(
                    id=len(annotations) + 1,
                    image_id=img_id,
                    category_id=obj['label'] + 1,
                    bbox=obj['bbox'],
                    area=obj['area'],
                    iscrowd=0,
                )
            )
    categories = [dict(id=i + 1, name=name) for i, name in enumerate(CLASSES)]
    return dict(images=images, annotations=annotations, categories=categories)


def main() -> None:
    """Write both splits and their annotation files."""
    args = parse_args()
    start = time.perf_counter()
    ann_dir = Path(args.out) / 'annotations'
    ann_dir.mkdir(parents=True, exist_ok=True)
    for split, num in (('train', args.num_train), ('val', args.num_val)):
        coco = write_split(args, split, num)
        (ann_dir / f'{split}.json').write_text(json.dumps(coco, sort_keys=True))
        print(f'{split}: {len(coco["images"])} images, {len(coco["annotations"])} objects')
    print(f'wrote {args.out} in {time.perf_counter() - start:.1f} s')


if __name__ == '__main__':
    main()
