"""Distributed training on CPU (gloo): dist_train.sh end to end, and sync_avg_factor.

With ``sync_avg_factor=True`` the loss is normalised by the avg_factor averaged over the
processes, so after DDP's gradient averaging 2 processes x 2 images give the gradients of
1 process x 4 images. Upstream normalises per process, which differs as soon as the
positives are split unevenly.
"""

import os
import socket
from pathlib import Path
from typing import Dict, List, Tuple

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from engine_utils import run_train, tiny_run_options
from mmdet.registry import MODELS
from mmdet.utils import register_all_modules
from mmengine.structures import InstanceData

import mmdet_anchorloss  # noqa: F401  (registers the plugin types)
from mmdet_anchorloss.engine.checkpoint import load_from_local_safe

WORLD_SIZE = 2
IMG = 64
STRIDES = (8, 16, 32, 64, 128)
IN_CHANNELS = 4
# images 0, 1 (rank 0) hold many objects, images 2, 3 (rank 1) one small object each
GT_BOXES = (
    [[2, 2, 30, 30], [34, 2, 62, 30], [2, 34, 30, 62], [34, 34, 62, 62], [10, 10, 54, 54]],
    [[0, 0, 40, 40], [24, 24, 64, 64], [4, 30, 28, 60], [30, 4, 60, 28]],
    [[20, 20, 36, 36]],
    [[40, 8, 56, 24]],
)


def free_port() -> int:
    """A TCP port that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def head_cfg(sync_avg_factor: bool) -> dict:
    """A small AnchorLossRetinaHead (mmdet's RetinaNet settings, 4 channels, 3 classes)."""
    return dict(
        type='AnchorLossRetinaHead',
        num_classes=3,
        in_channels=IN_CHANNELS,
        stacked_convs=1,
        feat_channels=IN_CHANNELS,
        sync_avg_factor=sync_avg_factor,
        anchor_generator=dict(
            type='AnchorGenerator',
            octave_base_scale=2,
            scales_per_octave=3,
            ratios=[0.5, 1.0, 2.0],
            strides=list(STRIDES),
        ),
        bbox_coder=dict(
            type='BatchDeltaXYWHBBoxCoder', target_means=[0.0] * 4, target_stds=[1.0] * 4
        ),
        loss_cls=dict(
            type='FusedFocalLoss', use_sigmoid=True, gamma=2.0, alpha=0.25, loss_weight=1.0
        ),
        loss_bbox=dict(type='L1Loss', loss_weight=1.0),
        train_cfg=dict(
            assigner=dict(
                type='BatchMaxIoUAssigner',
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


def batch(images: List[int]) -> Tuple[List[torch.Tensor], List[InstanceData], List[dict]]:
    """Fixed features, ground truth and metas of the listed images (0-3)."""
    gen = torch.Generator().manual_seed(1234)
    feats_all = [
        torch.randn(4, IN_CHANNELS, IMG // s or 1, IMG // s or 1, generator=gen) for s in STRIDES
    ]
    feats = [f[images] for f in feats_all]
    gts, metas = [], []
    for i in images:
        gt = InstanceData()
        gt.bboxes = torch.tensor(GT_BOXES[i], dtype=torch.float32)
        gt.labels = torch.arange(len(GT_BOXES[i])) % 3
        gts.append(gt)
        metas.append(
            dict(img_shape=(IMG, IMG), pad_shape=(IMG, IMG), batch_input_shape=(IMG, IMG), img_id=i)
        )
    return feats, gts, metas


def head_grads(head: torch.nn.Module, images: List[int]) -> Dict[str, torch.Tensor]:
    """Gradients of the summed head loss on ``images`` w.r.t. the head parameters."""
    head.zero_grad()
    feats, gts, metas = batch(images)
    cls_scores, bbox_preds = head(feats)
    losses = head.loss_by_feat(cls_scores, bbox_preds, gts, metas)
    total = sum(sum(v) if isinstance(v, (list, tuple)) else v for v in losses.values())
    total.backward()
    return {n: p.grad.detach().clone() for n, p in head.named_parameters()}


def build_head(sync_avg_factor: bool, state_file: Path) -> torch.nn.Module:
    """The test head with the weights saved in ``state_file``."""
    register_all_modules()
    head = MODELS.build(head_cfg(sync_avg_factor))
    head.load_state_dict(torch.load(state_file, weights_only=True))
    return head


def _worker(rank: int, port: int, state_file: str, out_dir: str) -> None:
    """One gloo process: its 2 images, backward, then DDP's mean of the gradients.

    Rank 0 first computes the single-process reference on all 4 images, before the process
    group exists (so ``sync_avg_factor`` has nothing to reduce over).
    """
    torch.set_num_threads(1)
    out = Path(out_dir)
    if rank == 0:
        for sync in (True, False):
            grads = head_grads(build_head(sync, Path(state_file)), [0, 1, 2, 3])
            torch.save(grads, out / f'single_sync{int(sync)}.pth')
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    dist.init_process_group('gloo', rank=rank, world_size=WORLD_SIZE)
    try:
        images = [2 * rank, 2 * rank + 1]
        for sync in (True, False):
            grads = head_grads(build_head(sync, Path(state_file)), images)
            for grad in grads.values():
                dist.all_reduce(grad)
                grad.div_(WORLD_SIZE)
            if rank == 0:
                torch.save(grads, out / f'ddp_sync{int(sync)}.pth')
    finally:
        dist.destroy_process_group()


Grads = Dict[str, torch.Tensor]


@pytest.fixture(scope='module')
def grads(tmp_path_factory) -> Dict[Tuple[str, bool], Grads]:
    """Head gradients keyed by (``'single'`` 1 x 4 images | ``'ddp'`` 2 x 2, sync_avg_factor).

    The processes use the eager focal-loss kernels (``MMDET_ANCHORLOSS_COMPILE=0``): the
    point is the normalisation, and a first compile per process costs more than the test.
    """
    tmp = tmp_path_factory.mktemp('ddp_grads')
    register_all_modules()
    torch.manual_seed(0)
    state_file = tmp / 'head.pth'
    torch.save(MODELS.build(head_cfg(False)).state_dict(), state_file)
    saved = os.environ.get('MMDET_ANCHORLOSS_COMPILE')
    os.environ['MMDET_ANCHORLOSS_COMPILE'] = '0'
    try:
        mp.spawn(_worker, args=(free_port(), str(state_file), str(tmp)), nprocs=WORLD_SIZE)
    finally:
        if saved is None:
            del os.environ['MMDET_ANCHORLOSS_COMPILE']
        else:
            os.environ['MMDET_ANCHORLOSS_COMPILE'] = saved
    return {
        (kind, sync): torch.load(tmp / f'{kind}_sync{int(sync)}.pth', weights_only=True)
        for kind in ('single', 'ddp')
        for sync in (True, False)
    }


def test_sync_avg_factor_matches_single_process(grads):
    """sync_avg_factor=True: 2 x 2 images averaged == 1 x 4 images."""
    reference, ddp = grads['single', True], grads['ddp', True]
    assert reference.keys() == ddp.keys()
    for name, ref in reference.items():
        assert ref.abs().sum() > 0, name
        torch.testing.assert_close(ddp[name], ref, rtol=1e-5, atol=1e-7, msg=name)
    # without processes to reduce over, the option changes nothing
    for name, ref in reference.items():
        torch.testing.assert_close(grads['single', False][name], ref, rtol=0, atol=0)


def test_per_process_avg_factor_differs(grads):
    """sync_avg_factor=False (upstream): the uneven split changes the gradients."""
    reference, ddp = grads['single', False], grads['ddp', False]
    rel = max(float((ddp[n] - ref).norm() / ref.norm()) for n, ref in reference.items())
    assert rel > 1e-2


def test_dist_train_two_gloo_processes(shapes_root, tmp_path):
    """tools/dist_train.sh with 2 CPU processes finishes; its checkpoint loads.

    torchrun exits 0 only when every rank does, and a rank that stopped early would leave
    the other waiting in DDP's gradient all-reduce.
    """
    work_dir = tmp_path / 'dist'
    result = run_train(
        work_dir,
        tiny_run_options(shapes_root, max_iters=2, ckpt_interval=2),
        nproc=WORLD_SIZE,
        env=dict(PORT=str(free_port())),
    )
    log = result.stdout + result.stderr
    assert 'Distributed training: True' in log
    assert f'GPU number: {WORLD_SIZE}' in log  # mmengine's name for the world size
    assert "dist_cfg: {'backend': 'gloo'}" in log
    assert 'Iter(train) [2/2]' in log
    checkpoint = load_from_local_safe(str(work_dir / 'iter_2.pth'))
    assert checkpoint['meta']['iter'] == 2
    # saved without DDP's ``module.`` prefix, so it loads into a plain model
    assert any(key.startswith('bbox_head.') for key in checkpoint['state_dict'])
