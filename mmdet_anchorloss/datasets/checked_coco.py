"""``CheckedCocoDataset``: mmdet's CocoDataset, reporting the annotations it drops silently.

mmdet 3.3's ``CocoDataset.parse_data_info`` skips, without a word, every annotation whose box
is narrower or lower than 1 px, has no overlap with the image (which includes any NaN
coordinate: the overlap then computes as 0), has ``area <= 0``, or whose ``category_id`` is
not one of the dataset's classes. A corrupt annotation file therefore trains on fewer
objects than it holds and nobody notices. This subclass keeps mmdet's result exactly and
reports each dropped annotation with its image id, file name, annotation id, box and the
reason, once, when the dataset is built, before any training step:

* ``invalid_annotations='warn'`` (default): one warning with the count per reason and the
  first few cases;
* ``'error'``: a ``ValueError`` naming the first case (and how many more there are);
* ``'ignore'``: mmdet's silent behaviour.

A ``category_id`` that the file declares but the config's ``metainfo.classes`` leaves out is
a deliberate class subset and is not reported; one the file does not declare at all is.
Boxes partly outside the image are not reported either: mmdet keeps them and ``Resize``
clips them to the image.

Config::

    train_dataloader = dict(dataset=dict(type='CheckedCocoDataset', invalid_annotations='error'))
"""

import logging
import math
from typing import List, NamedTuple, Optional, Union

from mmdet.datasets import CocoDataset
from mmengine.logging import print_log

from ..registry import register_twin

__all__ = ['CheckedCocoDataset', 'DroppedAnnotation']

MODES = ('warn', 'error', 'ignore')
MAX_LISTED = 5


class DroppedAnnotation(NamedTuple):
    """One annotation mmdet's ``parse_data_info`` leaves out, and why."""

    img_id: int
    file_name: str
    ann_id: Optional[int]
    bbox: list
    problem: str

    def describe(self) -> str:
        """``image id 4 (000004.png), annotation id 7, bbox [x, y, w, h] [...] <problem>``."""
        return (
            f'image id {self.img_id} ({self.file_name}), annotation id {self.ann_id}, '
            f'bbox [x, y, w, h] {self.bbox} {self.problem}'
        )


@register_twin('CocoDataset', 'DATASETS')
class CheckedCocoDataset(CocoDataset):
    """mmdet's ``CocoDataset`` that reports the annotations it drops (see module docstring).

    Args:
        *args: as :class:`mmdet.datasets.CocoDataset`.
        invalid_annotations (str): ``'warn'``, ``'error'`` or ``'ignore'``. Defaults to
            ``'warn'``.
        **kwargs: as :class:`mmdet.datasets.CocoDataset`.
    """

    def __init__(self, *args, invalid_annotations: str = 'warn', **kwargs) -> None:
        if invalid_annotations not in MODES:
            raise ValueError(
                f'invalid_annotations must be one of {MODES}, got {invalid_annotations!r}'
            )
        self.invalid_annotations = invalid_annotations
        self.dropped_annotations: List[DroppedAnnotation] = []
        super().__init__(*args, **kwargs)

    def load_data_list(self) -> List[dict]:
        """mmdet's data list, then the report of what it dropped."""
        self.dropped_annotations = []
        data_list = super().load_data_list()
        self._report()
        return data_list

    def parse_data_info(self, raw_data_info: dict) -> Union[dict, List[dict]]:
        """Note why mmdet drops any of this image's annotations, then parse as mmdet does."""
        img_info = raw_data_info['raw_img_info']
        for ann in raw_data_info['raw_ann_info']:
            problem = self._drop_reason(ann, img_info)
            if problem is not None:
                self.dropped_annotations.append(
                    DroppedAnnotation(
                        img_id=img_info['img_id'],
                        file_name=img_info.get('file_name', ''),
                        ann_id=ann.get('id'),
                        bbox=list(ann.get('bbox', [])),
                        problem=problem,
                    )
                )
        return super().parse_data_info(raw_data_info)

    def _drop_reason(self, ann: dict, img_info: dict) -> Optional[str]:
        """Why ``parse_data_info`` (mmdet 3.3) drops ``ann``, or None when it keeps it.

        Applies mmdet's own test (so exactly the annotations it drops are reported), then
        names the first problem. Annotations of a class the file declares but the config
        leaves out (a class subset) and ``ignore`` annotations return None.
        """
        if ann.get('ignore', False):
            return None
        category = ann.get('category_id')
        if category not in self.cat_ids and category in self.coco.cats:
            return None
        x1, y1, w, h = ann['bbox']
        width, height = img_info['width'], img_info['height']
        inter_w = max(0, min(x1 + w, width) - max(x1, 0))
        inter_h = max(0, min(y1 + h, height) - max(y1, 0))
        area = ann.get('area', 1)
        if not (inter_w * inter_h == 0 or area <= 0 or w < 1 or h < 1):
            if category in self.cat_ids:
                return None
            return (
                f'has category_id {category}, which the file does not declare '
                f'(declared: {sorted(self.coco.cats)})'
            )
        if not all(math.isfinite(v) for v in ann['bbox']):
            return 'has a NaN or infinite coordinate'
        if w < 1 or h < 1:
            return f'is degenerate: width {w} or height {h} is below 1 px'
        if inter_w * inter_h == 0:
            return f'lies outside the {width}x{height} image'
        return f'has area {area} <= 0'

    def _report(self) -> None:
        """Warn about, or refuse, the dropped annotations (per ``invalid_annotations``)."""
        dropped = self.dropped_annotations
        if not dropped or self.invalid_annotations == 'ignore':
            return
        source = self.ann_file
        if self.invalid_annotations == 'error':
            more = f'; {len(dropped) - 1} more invalid annotation(s)' if len(dropped) > 1 else ''
            raise ValueError(
                f"invalid annotation in {source}: {dropped[0].describe()}{more}. mmdet's "
                'CocoDataset would drop it silently; fix the file, or set '
                "invalid_annotations='warn' to train without it."
            )
        listed = '\n  '.join(d.describe() for d in dropped[:MAX_LISTED])
        rest = f'\n  ... and {len(dropped) - MAX_LISTED} more' if len(dropped) > MAX_LISTED else ''
        print_log(
            f'{source}: {len(dropped)} annotation(s) dropped by CocoDataset (they are not '
            f'trained on):\n  {listed}{rest}',
            logger='current',
            level=logging.WARNING,
        )
