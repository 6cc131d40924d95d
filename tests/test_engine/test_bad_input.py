"""Bad annotations end to end: training goes on correctly, or stops with a clear message.

Each test writes a 4-image COCO dataset whose last image carries one problem, checks what
mmdet's ``CocoDataset.parse_data_info`` makes of it, and trains the shapes config two
iterations through ``tools/train.py`` (batch 2, no shuffle: images 3 and 4 form iteration
2). What reaches the plugin head:

* zero-width box, NaN coordinate, unknown category id: dropped by mmdet's own filters
  (``w < 1``, zero intersection with the image, ``category_id not in cat_ids``), silently;
* box partly outside the image: kept, then clipped by ``Resize`` (``clip_object_border``);
* image without annotations: dropped by ``filter_empty_gt=True``; with False, it trains as
  background only (box loss exactly 0);
* label >= num_classes (dataset classes and head disagree): the head's input check stops
  training with a ``ValueError`` naming the image id, the box and the label, and the
  checkpoint of iteration 1, the logs and ``last_checkpoint`` stay valid.
"""

import json
import math
import shutil
from pathlib import Path
from typing import List, Sequence, Tuple

import numpy as np
import pytest
from engine_utils import CONFIG, read_scalars, run_train, tiny_run_options
from mmdet.datasets import CocoDataset
from mmdet.datasets.transforms import LoadAnnotations, Resize

from mmdet_anchorloss.engine.checkpoint import load_from_local_safe

CLASSES = ('circle', 'square', 'triangle')
GOOD = [[([4, 4, 20, 20], 1)], [([30, 30, 16, 24], 2)], [([8, 36, 24, 20], 3)]]
Ann = Tuple[List[float], int]


def write_dataset(
    shapes_root: Path,
    out: Path,
    last_image: Sequence[Ann],
    categories: Sequence[str] = CLASSES,
) -> Path:
    """Images 1-3 with one good box each, image 4 with ``last_image``'s (bbox, category_id).

    Images are copied from ``shapes_root``; boxes are COCO ``[x, y, w, h]``; NaN is written as
    JSON ``NaN``, which Python's json (and so pycocotools) reads back.
    """
    (out / 'train').mkdir(parents=True)
    (out / 'annotations').mkdir()
    images, annotations = [], []
    for img_id, anns in enumerate([*GOOD, list(last_image)], start=1):
        name = f'{img_id:06d}.png'
        shutil.copy(shapes_root / 'train' / f'{img_id - 1:06d}.png', out / 'train' / name)
        images.append(dict(id=img_id, file_name=name, width=64, height=64))
        for bbox, cat in anns:
            area = bbox[2] * bbox[3]
            annotations.append(
                dict(
                    id=len(annotations) + 1,
                    image_id=img_id,
                    category_id=cat,
                    bbox=bbox,
                    area=area if math.isfinite(area) else 1.0,
                    iscrowd=0,
                )
            )
    cats = [dict(id=i, name=n) for i, n in enumerate(categories, start=1)]
    coco = dict(images=images, annotations=annotations, categories=cats)
    (out / 'annotations' / 'train.json').write_text(json.dumps(coco))
    return out


def parsed(root: Path, classes: Sequence[str] = CLASSES, filter_empty_gt: bool = True) -> dict:
    """mmdet's parsed data infos of ``root``, by img_id (after ``filter_data``)."""
    dataset = CocoDataset(
        data_root=str(root),
        ann_file='annotations/train.json',
        data_prefix=dict(img='train/'),
        metainfo=dict(classes=tuple(classes)),
        filter_cfg=dict(filter_empty_gt=filter_empty_gt, min_size=1),
        pipeline=[],
    )
    return {
        info['img_id']: info for info in (dataset.get_data_info(i) for i in range(len(dataset)))
    }


def train(root: Path, work_dir: Path, *extra: str, config: str = CONFIG, check: bool = True):
    """Two iterations, batch 2, no shuffle, a checkpoint every iteration."""
    options = tiny_run_options(root, max_iters=2, ckpt_interval=1, shuffle=False)
    return run_train(work_dir, [*options, *extra], config=config, check=check)


def assert_trained(work_dir: Path) -> dict:
    """Both iterations logged with finite losses; the last checkpoint loads. Returns scalars."""
    scalars = read_scalars(work_dir)
    assert sorted(scalars) == [1, 2]
    for rec in scalars.values():
        for key in ('loss', 'loss_cls', 'loss_bbox'):
            assert math.isfinite(rec[key]), (key, rec)
    last = Path((work_dir / 'last_checkpoint').read_text().strip())
    assert last.name == 'iter_2.pth'
    assert load_from_local_safe(str(last))['meta']['iter'] == 2
    return scalars


def boxes_of(info: dict) -> List[List[float]]:
    return [inst['bbox'] for inst in info['instances']]


def test_zero_width_box_is_dropped(shapes_root, tmp_path):
    root = write_dataset(
        shapes_root, tmp_path / 'data', [([10, 10, 0, 20], 1), ([30, 8, 20, 20], 2)]
    )
    assert boxes_of(parsed(root)[4]) == [[30, 8, 50, 28]]
    train(root, tmp_path / 'work')
    assert_trained(tmp_path / 'work')


def test_box_partly_outside_is_clipped(shapes_root, tmp_path):
    root = write_dataset(shapes_root, tmp_path / 'data', [([50, 40, 30, 20], 1)])
    # mmdet keeps it unclipped ...
    assert boxes_of(parsed(root)[4]) == [[50, 40, 80, 60]]
    # ... and the Resize of the training pipeline clips it to the image
    info = parsed(root)[4]
    image = np.zeros((64, 64, 3), np.uint8)
    results = LoadAnnotations(with_bbox=True)(dict(info, img_shape=(64, 64), img=image))
    results = Resize(scale=(64, 64), keep_ratio=True)(results)
    assert results['gt_bboxes'].tensor.tolist() == [[50.0, 40.0, 64.0, 60.0]]
    train(root, tmp_path / 'work')
    assert_trained(tmp_path / 'work')


def test_nan_coordinate_is_dropped(shapes_root, tmp_path):
    root = write_dataset(
        shapes_root, tmp_path / 'data', [([float('nan'), 10, 20, 20], 1), ([30, 8, 20, 20], 2)]
    )
    assert 'NaN' in (root / 'annotations' / 'train.json').read_text()
    assert boxes_of(parsed(root)[4]) == [[30, 8, 50, 28]]
    train(root, tmp_path / 'work')
    assert_trained(tmp_path / 'work')


def test_unknown_category_is_dropped(shapes_root, tmp_path):
    root = write_dataset(
        shapes_root, tmp_path / 'data', [([10, 10, 20, 20], 99), ([30, 8, 20, 20], 2)]
    )
    info = parsed(root)[4]
    assert boxes_of(info) == [[30, 8, 50, 28]]
    assert [inst['bbox_label'] for inst in info['instances']] == [1]
    train(root, tmp_path / 'work')
    assert_trained(tmp_path / 'work')


def test_label_beyond_num_classes_stops_with_clear_message(shapes_root, tmp_path):
    """Dataset with 4 classes, head with 3: label 3 reaches the head, which names it."""
    classes = (*CLASSES, 'hexagon')
    root = write_dataset(shapes_root, tmp_path / 'data', [([12, 14, 20, 22], 4)], classes)
    assert [inst['bbox_label'] for inst in parsed(root, classes)[4]['instances']] == [3]
    work_dir = tmp_path / 'work'
    result = train(
        root,
        work_dir,
        f'train_dataloader.dataset.metainfo.classes=({",".join(classes)})',
        check=False,
    )
    assert result.returncode != 0
    err = result.stderr
    assert 'ValueError' in err
    message = err[err.rindex('ValueError') :]
    assert 'img_id=4' in message
    assert '[12.0, 14.0, 32.0, 36.0]' in message  # the box, as x1, y1, x2, y2
    assert 'label 3' in message and 'num_classes=3' in message
    # what was done before the bad batch is intact
    assert sorted(read_scalars(work_dir)) == [1]
    assert (work_dir / 'last_checkpoint').read_text().strip().endswith('iter_1.pth')
    assert load_from_local_safe(str(work_dir / 'iter_1.pth'))['meta']['iter'] == 1
    assert list(work_dir.glob('*/*.log'))


@pytest.mark.parametrize('filter_empty_gt', [True, False])
def test_image_without_annotations(shapes_root, tmp_path, filter_empty_gt):
    root = write_dataset(shapes_root, tmp_path / 'data', [])
    infos = parsed(root, filter_empty_gt=filter_empty_gt)
    if filter_empty_gt:
        assert sorted(infos) == [1, 2, 3]  # dropped by mmdet
        return
    assert infos[4]['instances'] == []
    # images 3 (one box) and 4 (none) form iteration 2; make image 3 empty as well
    coco = json.loads((root / 'annotations' / 'train.json').read_text())
    coco['annotations'] = [a for a in coco['annotations'] if a['image_id'] != 3]
    (root / 'annotations' / 'train.json').write_text(json.dumps(coco))
    work_dir = tmp_path / 'work'
    train(root, work_dir, 'train_dataloader.dataset.filter_cfg.filter_empty_gt=False')
    scalars = assert_trained(work_dir)
    assert scalars[1]['loss_bbox'] > 0
    assert scalars[2]['loss_bbox'] == 0  # no object in the batch: background only
    assert scalars[2]['loss_cls'] > 0


# ----------------------------------------------------------------- CheckedCocoDataset
MIXED = [
    ([10, 10, 0, 20], 1),  # zero width: dropped
    ([float('nan'), 10, 20, 20], 2),  # NaN: dropped
    ([10, 10, 20, 20], 99),  # undeclared category: dropped
    ([100, 100, 10, 10], 1),  # outside the 64x64 image: dropped
    ([50, 40, 30, 20], 2),  # partly outside: kept (Resize clips it)
    ([30, 8, 20, 20], 4),  # declared class left out by the config: a subset, kept out quietly
]


def checked(root: Path, mode: str):
    from mmdet_anchorloss.datasets import CheckedCocoDataset

    return CheckedCocoDataset(
        data_root=str(root),
        ann_file='annotations/train.json',
        data_prefix=dict(img='train/'),
        metainfo=dict(classes=CLASSES),
        filter_cfg=dict(filter_empty_gt=True, min_size=1),
        pipeline=[],
        invalid_annotations=mode,
    )


def test_checked_dataset_names_what_mmdet_drops(shapes_root, tmp_path):
    root = write_dataset(shapes_root, tmp_path / 'data', MIXED, (*CLASSES, 'hexagon'))
    dataset = checked(root, 'warn')
    # same data as mmdet's own CocoDataset
    plain = parsed(root)
    assert [dataset.get_data_info(i) for i in range(len(dataset))] == list(plain.values())
    dropped = dataset.dropped_annotations
    assert [(d.img_id, d.ann_id) for d in dropped] == [(4, 4), (4, 5), (4, 6), (4, 7)]
    problems = [d.problem for d in dropped]
    assert 'width 0' in problems[0]
    assert 'NaN' in problems[1]
    assert 'category_id 99' in problems[2]
    assert 'outside the 64x64 image' in problems[3]
    assert '000004.png' in dropped[1].describe() and 'nan' in dropped[1].describe()


def test_checked_dataset_error_mode_stops_before_training(shapes_root, tmp_path):
    root = write_dataset(shapes_root, tmp_path / 'data', MIXED, (*CLASSES, 'hexagon'))
    with pytest.raises(ValueError, match=r'image id 4 \(000004\.png\), annotation id 4'):
        checked(root, 'error')
    # the shapes config with the dataset swapped (custom_imports cannot come from
    # --cfg-options: mmengine imports them while it reads the file)
    config = tmp_path / 'checked.py'
    config.write_text(
        f'_base_ = {CONFIG!r}\n'
        "custom_imports = dict(imports=['mmdet_anchorloss', 'mmdet_anchorloss.datasets'],\n"
        '                      allow_failed_imports=False)\n'
        "train_dataloader = dict(dataset=dict(type='CheckedCocoDataset',\n"
        "                                     invalid_annotations='error'))\n"
    )
    work_dir = tmp_path / 'work'
    result = train(root, work_dir, config=str(config), check=False)
    assert result.returncode != 0
    message = result.stderr[result.stderr.rindex('ValueError') :]
    assert 'image id 4 (000004.png)' in message
    assert '[10, 10, 0, 20]' in message and '3 more invalid annotation(s)' in message
    assert not list(work_dir.glob('*.pth'))
