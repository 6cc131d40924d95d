"""Builders shared by the parity tests: upstream / plugin head pairs and random batches."""

import copy
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from mmdet.registry import MODELS
from mmdet.utils import register_all_modules
from mmengine.structures import InstanceData

import mmdet_anchorloss  # registers the plugin classes

register_all_modules()

PLUGIN_TYPES = mmdet_anchorloss.PLUGIN_TWINS


def retina_cfg(num_classes: int = 5, **overrides) -> dict:
    """A small RetinaNet head config (mmdet's retinanet_r50_fpn values, 8 channels)."""
    cfg = dict(
        type='RetinaHead',
        num_classes=num_classes,
        in_channels=8,
        stacked_convs=1,
        feat_channels=8,
        anchor_generator=dict(
            type='AnchorGenerator',
            octave_base_scale=4,
            scales_per_octave=3,
            ratios=[0.5, 1.0, 2.0],
            strides=[8, 16, 32, 64, 128],
        ),
        bbox_coder=dict(
            type='DeltaXYWHBBoxCoder',
            target_means=[0.0, 0.0, 0.0, 0.0],
            target_stds=[1.0, 1.0, 1.0, 1.0],
        ),
        loss_cls=dict(type='FocalLoss', use_sigmoid=True, gamma=2.0, alpha=0.25, loss_weight=1.0),
        loss_bbox=dict(type='L1Loss', loss_weight=1.0),
        train_cfg=dict(
            assigner=dict(
                type='MaxIoUAssigner',
                pos_iou_thr=0.5,
                neg_iou_thr=0.4,
                min_pos_iou=0,
                ignore_iof_thr=-1,
            ),
            sampler=dict(type='PseudoSampler'),
            allowed_border=-1,
            pos_weight=-1,
            debug=False,
        ),
    )
    return merge(cfg, overrides)


def anchor_head_cfg(**overrides) -> dict:
    """A plain ``AnchorHead`` config (retina anchors, no stacked convs)."""
    cfg = retina_cfg(type='AnchorHead', **overrides)
    cfg.pop('stacked_convs')
    return cfg


def rpn_cfg(**overrides) -> dict:
    """mmdet's Faster R-CNN RPN head config, small channels."""
    cfg = dict(
        type='RPNHead',
        in_channels=8,
        feat_channels=8,
        anchor_generator=dict(
            type='AnchorGenerator', scales=[8], ratios=[0.5, 1.0, 2.0], strides=[4, 8, 16, 32, 64]
        ),
        bbox_coder=dict(
            type='DeltaXYWHBBoxCoder',
            target_means=[0.0, 0.0, 0.0, 0.0],
            target_stds=[1.0, 1.0, 1.0, 1.0],
        ),
        loss_cls=dict(type='CrossEntropyLoss', use_sigmoid=True, loss_weight=1.0),
        loss_bbox=dict(type='L1Loss', loss_weight=1.0),
        train_cfg=dict(
            assigner=dict(
                type='MaxIoUAssigner',
                pos_iou_thr=0.7,
                neg_iou_thr=0.3,
                min_pos_iou=0.3,
                match_low_quality=True,
                ignore_iof_thr=-1,
            ),
            sampler=dict(
                type='RandomSampler',
                num=256,
                pos_fraction=0.5,
                neg_pos_ub=-1,
                add_gt_as_proposals=False,
            ),
            allowed_border=-1,
            pos_weight=-1,
            debug=False,
        ),
    )
    return merge(cfg, overrides)


def ssd_cfg(num_classes: int = 4, **overrides) -> dict:
    """mmdet's SSD300 head config (anchor generator for a 300 input)."""
    cfg = dict(
        type='SSDHead',
        num_classes=num_classes,
        in_channels=(8, 8, 8, 8, 8, 8),
        anchor_generator=dict(
            type='SSDAnchorGenerator',
            scale_major=False,
            input_size=300,
            basesize_ratio_range=(0.15, 0.9),
            strides=[8, 16, 32, 64, 100, 300],
            ratios=[[2], [2, 3], [2, 3], [2, 3], [2], [2]],
        ),
        bbox_coder=dict(
            type='DeltaXYWHBBoxCoder',
            target_means=[0.0, 0.0, 0.0, 0.0],
            target_stds=[0.1, 0.1, 0.2, 0.2],
        ),
        train_cfg=dict(
            assigner=dict(
                type='MaxIoUAssigner',
                pos_iou_thr=0.5,
                neg_iou_thr=0.5,
                min_pos_iou=0.0,
                ignore_iof_thr=-1,
                gt_max_assign_all=False,
            ),
            sampler=dict(type='PseudoSampler'),
            smoothl1_beta=1.0,
            allowed_border=-1,
            pos_weight=-1,
            neg_pos_ratio=3,
            debug=False,
        ),
    )
    return merge(cfg, overrides)


def merge(cfg: dict, overrides: dict) -> dict:
    """Recursive dict update (``train_cfg=dict(assigner=dict(...))`` merges)."""
    out = copy.deepcopy(cfg)
    for k, v in overrides.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and '_replace_' not in v:
            out[k] = merge(out[k], v)
        else:
            out[k] = {a: b for a, b in v.items() if a != '_replace_'} if isinstance(v, dict) else v
    return out


def to_plugin(cfg: dict, parts: Sequence[str] = ('head', 'loss', 'assigner', 'coder')) -> dict:
    """Swap types for the plugin's: ``parts`` picks which (head / loss / assigner / coder)."""
    cfg = copy.deepcopy(cfg)
    if 'head' in parts:
        cfg['type'] = PLUGIN_TYPES[cfg['type']]
    if 'loss' in parts:
        for key in ('loss_cls', 'loss_bbox'):
            if key in cfg and cfg[key]['type'] in PLUGIN_TYPES:
                cfg[key]['type'] = PLUGIN_TYPES[cfg[key]['type']]
    if 'assigner' in parts:
        cfg['train_cfg']['assigner']['type'] = 'BatchMaxIoUAssigner'
    if 'coder' in parts:
        cfg['bbox_coder']['type'] = 'BatchDeltaXYWHBBoxCoder'
    return cfg


def build(cfg: dict):
    return MODELS.build(copy.deepcopy(cfg))


def random_boxes(
    n: int,
    h: int,
    w: int,
    gen: torch.Generator,
    min_size: float = 4.0,
    max_size: Optional[float] = None,
) -> torch.Tensor:
    """(n, 4) random boxes inside an h x w image."""
    max_size = max_size or min(h, w) * 0.8
    wh = min_size + torch.rand(n, 2, generator=gen) * (max_size - min_size)
    x1 = torch.rand(n, generator=gen) * (w - wh[:, 0])
    y1 = torch.rand(n, generator=gen) * (h - wh[:, 1])
    return torch.stack([x1, y1, x1 + wh[:, 0], y1 + wh[:, 1]], dim=1)


def make_batch(
    head,
    seed: int,
    num_gts: Sequence[int],
    img_shapes: Sequence[Tuple[int, int]],
    pad_divisor: int = 32,
    num_ignore: Sequence[int] = (),
    device: str = 'cpu',
    duplicate: bool = False,
):
    """Random predictions and ground truth for ``head``.

    Returns:
        tuple: cls_scores, bbox_preds (lists of leaf tensors requiring grad), gts, metas,
        ignore (list or None).
    """
    gen = torch.Generator().manual_seed(seed)
    pads = [
        (-(-h // pad_divisor) * pad_divisor, -(-w // pad_divisor) * pad_divisor)
        for h, w in img_shapes
    ]
    batch_h = max(p[0] for p in pads)
    batch_w = max(p[1] for p in pads)
    metas = [
        dict(
            img_shape=s,
            pad_shape=p,
            batch_input_shape=(batch_h, batch_w),
            img_id=i,
            scale_factor=(1.0, 1.0),
        )
        for i, (s, p) in enumerate(zip(img_shapes, pads))
    ]
    gts = []
    for (h, w), n in zip(img_shapes, num_gts):
        boxes = random_boxes(n, h, w, gen)
        if duplicate and n >= 2:
            boxes[1] = boxes[0]  # exact duplicate: ties across gts
        labels = torch.randint(0, head.num_classes, (n,), generator=gen)
        gts.append(InstanceData(bboxes=boxes.to(device), labels=labels.to(device)))
    ignore = None
    if num_ignore:
        ignore = [
            InstanceData(bboxes=random_boxes(k, h, w, gen).to(device))
            for (h, w), k in zip(img_shapes, num_ignore)
        ]
    strides = [s[0] for s in head.prior_generator.strides]
    B = len(img_shapes)
    cls_scores, bbox_preds = [], []
    for lvl, s in enumerate(strides):
        fh, fw = -(-batch_h // s), -(-batch_w // s)
        a = head.prior_generator.num_base_anchors[lvl]
        cls_scores.append(
            (torch.randn(B, a * head.cls_out_channels, fh, fw, generator=gen) * 2 - 2)
            .to(device)
            .requires_grad_()
        )
        bbox_preds.append(
            (torch.randn(B, a * 4, fh, fw, generator=gen) * 0.5).to(device).requires_grad_()
        )
    return cls_scores, bbox_preds, gts, metas, ignore


def loss_and_grads(
    head, cls_scores, bbox_preds, gts, metas, ignore, seed: int = 0, leaves: Optional[list] = None
) -> Tuple[Dict[str, List[torch.Tensor]], List[torch.Tensor]]:
    """Loss dict and gradients w.r.t. every prediction map (fresh leaves per call; a list
    passed as ``leaves`` receives them, classification maps first)."""
    cls = [c.detach().clone().requires_grad_() for c in cls_scores]
    reg = [b.detach().clone().requires_grad_() for b in bbox_preds]
    if leaves is not None:
        leaves.extend(cls + reg)
    torch.manual_seed(seed)
    losses = head.loss_by_feat(cls, reg, gts, metas, ignore)
    total = sum(sum(v) if isinstance(v, list) else v for v in losses.values())
    total = total.sum()
    total.backward()
    grads = [x.grad if x.grad is not None else torch.zeros_like(x) for x in cls + reg]
    return {k: [t.detach() for t in v] for k, v in losses.items()}, grads


def assert_losses_match(
    ref: Dict[str, List[torch.Tensor]],
    got: Dict[str, List[torch.Tensor]],
    rtol: float = 1e-5,
    atol: float = 1e-7,
) -> None:
    assert set(ref) == set(got), (set(ref), set(got))
    for key in ref:
        assert len(ref[key]) == len(got[key]), key
        for i, (a, b) in enumerate(zip(ref[key], got[key])):
            assert a.shape == b.shape, (key, i, a.shape, b.shape)
            torch.testing.assert_close(
                b.float(),
                a.float(),
                rtol=rtol,
                atol=atol,
                msg=lambda m, k=key, j=i: f'{k}[{j}]: {m}',
            )


def assert_grads_match(ref: List[torch.Tensor], got: List[torch.Tensor], tol: float = 1e-5) -> None:
    for i, (a, b) in enumerate(zip(ref, got)):
        scale = a.abs().max().item()
        err = (a - b).abs().max().item()
        assert (
            err <= tol * max(scale, 1e-12) + 1e-12
        ), f'grad of map {i}: max abs diff {err:.3g} > {tol} x max {scale:.3g}'


def assert_fp16_results_match(ref, ref_g, got, got_g) -> None:
    """Losses and half gradients of a float16 run against upstream, within float16's
    tolerance: losses to 1e-2 relative (1e-3 absolute), each map's gradient to 2% of its
    largest entry, and the gradient back in float16."""
    for key in ref:
        for a, b in zip(ref[key], got[key]):
            torch.testing.assert_close(b.float(), a.float(), rtol=1e-2, atol=1e-3)
    for i, (a, b) in enumerate(zip(ref_g, got_g)):
        assert b.dtype == torch.float16
        scale = a.float().abs().max().clamp(min=1e-6)
        diff = (a.float() - b.float()).abs()
        worst = diff.argmax()
        where = tuple(int(k) for k in torch.unravel_index(worst, diff.shape))
        assert float(diff.flatten()[worst] / scale) < 2e-2, (
            f'grad of map {i} {tuple(a.shape)}: at {where} upstream {a.flatten()[worst].item():.4g}'
            f', plugin {b.flatten()[worst].item():.4g} (largest {scale.item():.4g}); '
            f'{int((diff > 2e-2 * scale).sum())} entries off by more than 2% of it'
        )


def upstream_assign_stats(head, cls_scores, bbox_preds, gts, metas, ignore) -> List[Dict[str, int]]:
    """Per image, what upstream's own assigner does with this batch (test guards).

    Keys: ``inside`` / ``outside`` anchors, ``pos`` / ``neg`` assigned, ``ignored_by_box``
    (IoU set to -1 by an ignore box), ``low_quality`` (positive below ``pos_iou_thr``),
    ``not_argmax`` (positive whose gt is not its best-IoU gt: a later gt overwrote it),
    ``below_lo`` (IoU under the lower end of a ``neg_iou_thr`` tuple), ``pos_wanted``.
    """
    from mmdet.models.task_modules.prior_generators import anchor_inside_flags

    sizes = [c.shape[-2:] for c in cls_scores]
    anchors, valid = head.get_anchors(sizes, metas, device=cls_scores[0].device)
    assigner = head.assigner
    pos_thr = assigner.pos_iou_thr
    lo = assigner.neg_iou_thr[0] if isinstance(assigner.neg_iou_thr, tuple) else 0.0
    sampler_cfg = head.train_cfg.get('sampler', {})
    wanted = int(sampler_cfg.get('num', 0) * sampler_cfg.get('pos_fraction', 0))
    out = []
    for i, gt in enumerate(gts):
        flat, flags = torch.cat(anchors[i]), torch.cat(valid[i])
        inside = anchor_inside_flags(
            flat, flags, metas[i]['img_shape'][:2], head.train_cfg['allowed_border']
        )
        priors = flat[inside]
        res = assigner.assign(
            InstanceData(priors=priors), gt, ignore[i] if ignore is not None else None
        )
        pos = res.gt_inds > 0
        argmax = torch.zeros_like(res.gt_inds)
        if len(gt) > 0:
            argmax = assigner.iou_calculator(gt.bboxes, priors).argmax(dim=0) + 1
        out.append(
            dict(
                inside=int(inside.sum()),
                outside=int((~inside).sum()),
                pos=int(pos.sum()),
                neg=int((res.gt_inds == 0).sum()),
                ignored_by_box=int((res.max_overlaps == -1).sum()),
                low_quality=int((pos & (res.max_overlaps < pos_thr)).sum()),
                not_argmax=int((pos & (res.gt_inds != argmax)).sum()),
                below_lo=int(((res.max_overlaps >= 0) & (res.max_overlaps < lo)).sum()),
                pos_wanted=wanted,
            )
        )
    return out
