"""mmdet_anchorloss.engine.launch: CPU distributed setup, --amp check, SSDHead predict fix."""

import pytest
import torch
import torch.distributed as dist
from mmengine.config import Config, ConfigDict

from mmdet_anchorloss.engine import launch

needs_cpu_only = pytest.mark.skipif(
    torch.cuda.is_available(), reason='CPU-only behaviour: with CUDA mmengine does the setup'
)


def small_cfg(**extra) -> Config:
    return Config(dict(model=dict(type='RetinaNet'), **extra))


def test_no_launcher_leaves_config_alone():
    cfg = small_cfg()
    assert launch.setup_cpu_distributed(cfg, 'none') is False
    assert 'model_wrapper_cfg' not in cfg and 'env_cfg' not in cfg


@needs_cpu_only
def test_other_launchers_without_cuda_are_refused():
    with pytest.raises(RuntimeError, match='--launcher pytorch'):
        launch.setup_cpu_distributed(small_cfg(), 'slurm')


@needs_cpu_only
def test_missing_torchrun_environment_is_named(monkeypatch):
    for name in launch.TORCHRUN_ENV:
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(RuntimeError, match='MASTER_ADDR.*torchrun'):
        launch.setup_cpu_distributed(small_cfg(), 'pytorch')


@needs_cpu_only
@pytest.mark.parametrize('with_env_cfg', [True, False], ids=['env_cfg', 'no_env_cfg'])
def test_single_process_gloo_group(monkeypatch, with_env_cfg):
    env = dict(RANK='0', WORLD_SIZE='1', LOCAL_RANK='0', MASTER_ADDR='127.0.0.1')
    env['MASTER_PORT'] = '29731' if with_env_cfg else '29732'
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    extra = dict(env_cfg=dict(cudnn_benchmark=False, dist_cfg=dict(backend='nccl')))
    cfg = small_cfg(**(extra if with_env_cfg else {}), find_unused_parameters=True)
    assert not dist.is_initialized()
    try:
        assert launch.setup_cpu_distributed(cfg, 'pytorch') is True
        assert dist.is_initialized() and dist.get_backend() == 'gloo'
        assert dist.get_world_size() == 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert cfg.env_cfg.dist_cfg.backend == 'gloo'  # also where the config had no env_cfg
    if with_env_cfg:
        assert cfg.env_cfg.cudnn_benchmark is False
    assert cfg.model_wrapper_cfg == dict(
        type='MMDistributedDataParallel',
        device_ids=None,
        broadcast_buffers=False,
        find_unused_parameters=True,
    )


def test_user_wrapper_kept_with_device_ids_cleared():
    cfg = small_cfg(model_wrapper_cfg=dict(type='MyWrapper', device_ids=[0], static_graph=True))
    wrapper = launch._cpu_model_wrapper_cfg(cfg)
    assert wrapper == dict(type='MyWrapper', device_ids=None, static_graph=True)


@needs_cpu_only
def test_amp_check_names_cuda():
    with pytest.raises(RuntimeError, match='--amp.*CUDA'):
        launch.check_amp_available()


def test_ssd_head_predicts_after_fix():
    from mmdet.models.dense_heads import SSDHead

    launch.fix_ssd_head_predict()
    launch.fix_ssd_head_predict()  # idempotent
    head = SSDHead(
        num_classes=3,
        in_channels=(8, 8, 8, 8, 8, 8),
        anchor_generator=dict(
            type='SSDAnchorGenerator',
            scale_major=False,
            input_size=300,
            basesize_ratio_range=(0.15, 0.9),
            strides=[8, 16, 32, 64, 100, 300],
            ratios=[[2], [2, 3], [2, 3], [2, 3], [2], [2]],
        ),
        test_cfg=ConfigDict(
            nms=dict(type='nms', iou_threshold=0.45), score_thr=0.0, max_per_img=20
        ),
    ).eval()
    feats = [torch.rand(1, 8, s, s) for s in (38, 19, 10, 5, 3, 1)]
    meta = dict(img_shape=(300, 300), scale_factor=(1.0, 1.0), ori_shape=(300, 300))
    with torch.no_grad():
        cls_scores, bbox_preds = head(feats)
        results = head.predict_by_feat(cls_scores, bbox_preds, batch_img_metas=[meta])
    assert results[0].bboxes.shape[1] == 4
    assert results[0].scores.numel() == results[0].labels.numel() > 0
    assert int(results[0].labels.max()) < 3
