"""Benchmark cases: shipped mmdet head configs, their plugin twins, and random inputs.

A case names one of mmdet's shipped configs (RetinaNet R-50 FPN, Faster R-CNN's RPN,
SSD300, with their ``train_cfg``), a batch size, gts per image and the dtype of the
prediction maps. Both sides of a case get the same inputs: predictions at the real
feature-map sizes of the input, and random boxes, generated on the CPU from one seed.
"""

import contextlib
import copy
import math
from pathlib import Path
from typing import ContextManager, Dict, List, NamedTuple, Optional, Sequence, Tuple

import mmdet
import torch
from mmdet.registry import MODELS
from mmdet.utils import register_all_modules
from mmengine.config import Config
from mmengine.structures import InstanceData

from .. import PLUGIN_TWINS

SIDES = ('upstream', 'plugin')


class Case(NamedTuple):
    """One benchmark case: a shipped mmdet config, a batch size and gts per image.

    ``dtype='float16'`` gives the prediction maps in half precision and runs ``loss_by_feat``
    under ``torch.autocast`` on both sides, as mmengine's ``AmpOptimWrapper`` does.
    ``plugin_sampler`` swaps the plugin side's sampler for an opt-in one (other draws than
    upstream's: the losses are not compared).
    """

    name: str
    config: str  # relative to mmdet's shipped configs (mmdet/.mim/configs)
    head_key: str  # the head's key in ``model``
    train_cfg_key: Optional[str]  # ``model.train_cfg[key]`` (two-stage), None: ``train_cfg``
    batch_size: int
    num_gts: int
    img_shape: Tuple[int, int]  # (h, w) of every image before padding
    pad_divisor: int
    dtype: str = 'float32'  # of the prediction maps; 'float16' also turns autocast on
    plugin_sampler: Optional[str] = None  # e.g. 'DeviceRandomSampler' on the plugin side

    @property
    def amp(self) -> bool:
        """Whether the case runs under autocast (half-precision maps)."""
        return self.dtype != 'float32'


RETINA = 'retinanet/retinanet_r50_fpn_1x_coco.py'
FASTER = 'faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py'
SSD300 = 'ssd/ssd300_coco.py'
PRIOR_LOGIT = math.log(99.0)  # -logit(0.01): RetinaNet's classification bias at init
_FULL = (800, 1333)


def _retina(batch: int, gts: int, dtype: str = 'float32') -> Case:
    name = f'retina-b{batch}-g{gts}' + ('-fp16' if dtype == 'float16' else '')
    return Case(name, RETINA, 'bbox_head', None, batch, gts, _FULL, 32, dtype)


CASES: Dict[str, Case] = {
    c.name: c
    for c in (
        _retina(2, 10),
        _retina(2, 100),
        _retina(8, 10),
        _retina(8, 100),
        _retina(8, 1000),
        Case('rpn-b8-g10', FASTER, 'rpn_head', 'rpn', 8, 10, _FULL, 32),
        Case('ssd-b32-g10', SSD300, 'bbox_head', None, 32, 10, (300, 300), 1),
        _retina(8, 10, 'float16'),
        _retina(8, 100, 'float16'),
        Case('rpn-b8-g10-fp16', FASTER, 'rpn_head', 'rpn', 8, 10, _FULL, 32, 'float16'),
        Case('ssd-b32-g10-fp16', SSD300, 'bbox_head', None, 32, 10, (300, 300), 1, 'float16'),
        Case(
            'rpn-b8-g10-device-sampler',
            FASTER,
            'rpn_head',
            'rpn',
            8,
            10,
            _FULL,
            32,
            plugin_sampler='DeviceRandomSampler',
        ),
    )
}
# On CPU, upstream takes minutes per call at G=1000, and half precision is not what CPU
# training uses: those cases run there only when asked for.
CPU_DEFAULT_CASES = tuple(
    n for n, c in CASES.items() if not c.amp and c.num_gts <= 100 and not c.plugin_sampler
)

# --quick: images a quarter of the size on each side (SSD300's feature maps are fixed by its
# anchor generator, so its batch shrinks instead), for tests and smoke runs.
QUICK_SCALE = 4
QUICK_SSD_BATCH = 4


def default_cases(device: str) -> List[str]:
    """Every case on CUDA; on CPU the float32 cases with at most 100 gts per image."""
    return list(CASES) if device == 'cuda' else list(CPU_DEFAULT_CASES)


def mmdet_config_dir() -> Path:
    """mmdet's shipped configs (``mmdet/.mim/configs``)."""
    path = Path(mmdet.__file__).parent / '.mim' / 'configs'
    if not path.is_dir():
        raise FileNotFoundError(f'mmdet ships no configs at {path}; reinstall mmdet with pip.')
    return path


def head_config(case: Case) -> dict:
    """The upstream head config of ``case``, its ``train_cfg`` merged in (as detectors do)."""
    model = Config.fromfile(str(mmdet_config_dir() / case.config)).model
    head = copy.deepcopy(model[case.head_key].to_dict())
    train_cfg = model.train_cfg[case.train_cfg_key] if case.train_cfg_key else model.train_cfg
    head['train_cfg'] = copy.deepcopy(train_cfg.to_dict())
    return head


def plugin_config(cfg: dict) -> dict:
    """The plugin twin of an upstream head config: head, losses, assigner and coder swapped."""
    cfg = copy.deepcopy(cfg)
    parts = [cfg, cfg.get('loss_cls'), cfg.get('loss_bbox'), cfg['train_cfg']['assigner']]
    parts.append(cfg['bbox_coder'])
    for part in parts:
        if part is not None and part['type'] in PLUGIN_TWINS:
            part['type'] = PLUGIN_TWINS[part['type']]
    return cfg


def build_head(case: Case, side: str, device: str) -> torch.nn.Module:
    """The upstream head of ``case`` or its plugin twin, on ``device``."""
    register_all_modules()
    cfg = head_config(case)
    if side == 'plugin':
        cfg = plugin_config(cfg)
        if case.plugin_sampler:
            cfg['train_cfg']['sampler']['type'] = case.plugin_sampler
    return MODELS.build(cfg).to(device)


def autocast(case: Case, device: str) -> ContextManager:
    """``torch.autocast`` to the case's half dtype, or nothing for a float32 case."""
    if not case.amp:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device, dtype=getattr(torch, case.dtype))


class Inputs(NamedTuple):
    """``loss_by_feat``'s arguments; the prediction maps are leaf tensors."""

    cls_scores: list  # L tensors (B, A_l * C, H_l, W_l) of the case's dtype, requires_grad
    bbox_preds: list  # L tensors (B, A_l * 4, H_l, W_l) of the case's dtype, requires_grad
    gts: list  # B InstanceData, bboxes (G, 4) float32, labels (G,) int64
    metas: list  # B dicts
    featmap_sizes: list  # L (H_l, W_l)


def case_geometry(case: Case, quick: bool) -> Tuple[int, Tuple[int, int], Tuple[int, int]]:
    """(batch size, img_shape, padded batch shape) of ``case``."""
    batch, (h, w) = case.batch_size, case.img_shape
    if quick and case.pad_divisor == 1:  # SSD300: fixed input size, so a smaller batch
        batch = min(batch, QUICK_SSD_BATCH)
    elif quick:
        h, w = h // QUICK_SCALE, w // QUICK_SCALE
    d = case.pad_divisor
    return batch, (h, w), (-(-h // d) * d, -(-w // d) * d)


def random_boxes(n: int, h: int, w: int, gen: torch.Generator) -> torch.Tensor:
    """(n, 4) boxes inside an h x w image; sides log-uniform in [8, 0.8 min(h, w)]."""
    lo, hi = torch.log(torch.tensor(8.0)), torch.log(torch.tensor(0.8 * min(h, w)))
    wh = torch.exp(lo + torch.rand(n, 2, generator=gen) * (hi - lo))
    x1 = torch.rand(n, generator=gen) * (w - wh[:, 0])
    y1 = torch.rand(n, generator=gen) * (h - wh[:, 1])
    return torch.stack([x1, y1, x1 + wh[:, 0], y1 + wh[:, 1]], dim=1)


def featmap_sizes(strides: Sequence[Tuple[int, int]], pad_shape: Tuple[int, int]) -> list:
    """(H_l, W_l) per level for a padded (h, w) input: ceil(h / stride), as the backbones give.

    Args:
        strides (Sequence[tuple]): (stride_w, stride_h) per level, as the anchor generators
            store them.
        pad_shape (tuple): (h, w) of the padded batch.
    """
    h, w = pad_shape
    return [(-(-h // sh), -(-w // sw)) for sw, sh in strides]


def make_inputs(head, case: Case, quick: bool, seed: int, device: str) -> Inputs:
    """Random predictions (at the real feature-map sizes) and ground truth for ``case``.

    Generated in float32 on the CPU from ``seed``, so both sides (and both devices) see the
    same values; the maps are then cast to the case's dtype. The classification logits are
    N(-2, 2); in a float16 case N(-PRIOR_LOGIT, 1), around a RetinaNet head at its start
    (``bias_prob=0.01``): upstream sums each level's focal loss in float16 (mmcv's op returns
    the map's dtype), and at N(-2, 2) the largest levels' sums overflow to inf.
    """
    gen = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, case.dtype)
    batch, img_shape, pad_shape = case_geometry(case, quick)
    metas = [
        dict(
            img_id=i,
            img_shape=img_shape,
            ori_shape=img_shape,
            pad_shape=pad_shape,
            batch_input_shape=pad_shape,
            scale_factor=(1.0, 1.0),
        )
        for i in range(batch)
    ]
    gts = []
    for _ in range(batch):
        boxes = random_boxes(case.num_gts, *img_shape, gen)
        labels = torch.randint(0, head.num_classes, (case.num_gts,), generator=gen)
        gts.append(InstanceData(bboxes=boxes.to(device), labels=labels.to(device)))
    sizes = featmap_sizes(head.prior_generator.strides, pad_shape)
    cls_scores, bbox_preds = [], []
    for (fh, fw), a in zip(sizes, head.prior_generator.num_base_anchors):
        cls = torch.randn(batch, a * head.cls_out_channels, fh, fw, generator=gen)
        cls = cls - PRIOR_LOGIT if case.amp else cls * 2 - 2
        reg = torch.randn(batch, a * 4, fh, fw, generator=gen) * 0.5
        cls_scores.append(cls.to(device, dtype).requires_grad_())
        bbox_preds.append(reg.to(device, dtype).requires_grad_())
    return Inputs(cls_scores, bbox_preds, gts, metas, sizes)
