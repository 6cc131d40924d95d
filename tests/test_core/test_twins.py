"""The head layer: twins made by ``batched_twin``, the fused-loss protocol, the coder's
batch API, and the explicit compile mode."""

import pytest
import torch
from helpers import (
    assert_grads_match,
    assert_losses_match,
    build,
    loss_and_grads,
    make_batch,
    retina_cfg,
    to_plugin,
)
from mmdet.models.dense_heads import AnchorHead, GARetinaHead, RetinaHead
from mmdet.registry import MODELS

import mmdet_anchorloss
from mmdet_anchorloss.coders import BatchDeltaXYWHBBoxCoder
from mmdet_anchorloss.heads import BatchedAnchorLossMixin, batched_twin
from mmdet_anchorloss.kernels import compile as compile_mode
from mmdet_anchorloss.losses import FusedFocalLoss

SHAPES = [(100, 120), (64, 90)]


def sepbn_cfg(**overrides):
    cfg = retina_cfg(type='RetinaSepBNHead', num_ins=5, norm_cfg=dict(type='BN'), **overrides)
    return cfg


@pytest.mark.parametrize('seed', [0, 1])
def test_retina_sepbn_twin_matches_upstream(seed, device):
    cfg = sepbn_cfg()
    upstream = build(cfg).to(device)
    plugin = build(to_plugin(cfg)).to(device)
    assert type(plugin).__name__ == 'AnchorLossRetinaSepBNHead'
    plugin.load_state_dict(upstream.state_dict())  # same keys: the twin is a subclass
    batch = make_batch(upstream, seed, (3, 0), SHAPES, device=device)
    ref, ref_g = loss_and_grads(upstream, *batch, seed=seed)
    got, got_g = loss_and_grads(plugin, *batch, seed=seed)
    assert_losses_match(ref, got)
    assert_grads_match(ref_g, got_g)
    assert float(sum(ref['loss_bbox'])) > 0  # the batch has positives


@pytest.fixture()
def scratch_registry():
    """Undo the registrations a test makes (the package's lists and mmdet's MODELS)."""
    from mmdet_anchorloss import registry

    saved = (
        dict(registry.PLUGIN_TWINS),
        {k: list(v) for k, v in registry.REGISTERED.items()},
        dict(registry.CLASSES),
        dict(MODELS._module_dict),
    )
    yield
    registry.PLUGIN_TWINS.clear()
    registry.PLUGIN_TWINS.update(saved[0])
    registry.REGISTERED.clear()
    registry.REGISTERED.update(saved[1])
    registry.CLASSES.clear()
    registry.CLASSES.update(saved[2])
    MODELS._module_dict.clear()
    MODELS._module_dict.update(saved[3])


def test_batched_twin_of_a_new_head_in_one_line(scratch_registry):
    class MyRetinaHead(RetinaHead):
        pass

    twin = batched_twin(MyRetinaHead)
    assert twin.__name__ == 'AnchorLossMyRetinaHead'
    assert MODELS.get('AnchorLossMyRetinaHead') is twin
    assert mmdet_anchorloss.PLUGIN_TWINS['MyRetinaHead'] == 'AnchorLossMyRetinaHead'
    assert issubclass(twin, BatchedAnchorLossMixin) and issubclass(twin, MyRetinaHead)
    upstream = build(retina_cfg())
    plugin = twin(**{k: v for k, v in retina_cfg().items() if k != 'type'})
    batch = make_batch(upstream, 2, (2, 1), SHAPES)
    assert_losses_match(loss_and_grads(upstream, *batch)[0], loss_and_grads(plugin, *batch)[0])


def test_batched_twin_refuses_a_head_with_its_own_loss():
    assert GARetinaHead.loss_by_feat is not AnchorHead.loss_by_feat
    with pytest.raises(TypeError, match='own loss_by_feat'):
        batched_twin(GARetinaHead)


def test_a_loss_joins_the_fused_path_through_level_losses(monkeypatch):
    """The head asks any loss for ``level_losses``; None sends it to the generic path."""
    cfg = to_plugin(retina_cfg())
    head = build(cfg)
    batch = make_batch(head, 0, (2, 1), SHAPES)
    ref, ref_g = loss_and_grads(head, *batch)
    calls = []

    def declines(self, *args, **kwargs):
        calls.append(len(args[0]))
        return None

    monkeypatch.setattr(FusedFocalLoss, 'level_losses', declines)
    generic, generic_g = loss_and_grads(head, *batch)
    assert calls == [5]  # asked once, with the 5 level maps
    assert_losses_match(ref, generic)
    assert_grads_match(ref_g, generic_g)


def test_targets_are_encoded_through_the_coder_batch_api(monkeypatch):
    """A coder whose per-row ``encode`` raises still trains: encode_batch does the work."""
    cfg = to_plugin(retina_cfg(reg_decoded_bbox=False))
    head = build(cfg)
    batch = make_batch(head, 1, (3, 2), SHAPES)
    ref, ref_g = loss_and_grads(head, *batch)
    used = []
    real = BatchDeltaXYWHBBoxCoder.encode_batch

    def spy(self, *args):
        used.append(len(args[0]))
        return real(self, *args)

    def broken(*args, **kwargs):
        raise AssertionError('per-row encode must not be called')

    monkeypatch.setattr(BatchDeltaXYWHBBoxCoder, 'encode', broken)
    monkeypatch.setattr(BatchDeltaXYWHBBoxCoder, 'encode_batch', spy)
    got, got_g = loss_and_grads(head, *batch)
    assert used and used[0] > 0
    assert_losses_match(ref, got, rtol=0, atol=0)
    assert_grads_match(ref_g, got_g, tol=0)


def test_compile_mode_is_read_at_call_time(monkeypatch):
    monkeypatch.delenv('MMDET_ANCHORLOSS_COMPILE', raising=False)
    assert compile_mode.compile_mode() == 'auto'
    monkeypatch.setenv('MMDET_ANCHORLOSS_COMPILE', '0')
    assert compile_mode.compile_mode() == '0'
    compile_mode.set_compile_mode('on')
    try:
        assert compile_mode.compile_mode() == 'on'
        with pytest.raises(ValueError, match='compile mode'):
            compile_mode.set_compile_mode('sometimes')
    finally:
        compile_mode.set_compile_mode(None)
    assert compile_mode.compile_mode() == '0'


def test_only_compiler_errors_fall_back(monkeypatch):
    """A compiler failure falls back with a warning; a bug in the kernel propagates."""
    from torch._dynamo.exc import BackendCompilerFailed

    def kernel_fn(x):
        return x * 2

    k = compile_mode.MaybeCompiled(kernel_fn)
    k.mode = 'auto'

    def compiler_fails():
        def run(*args):
            raise BackendCompilerFailed(kernel_fn, RuntimeError('no C compiler'), None)

        return run

    monkeypatch.setattr(k, 'compiled', compiler_fails)
    x = torch.arange(3.0)
    with pytest.warns(UserWarning, match='using eager kernels'):
        assert torch.equal(k(x), x * 2)
    assert k.failed

    bug = compile_mode.MaybeCompiled(kernel_fn)
    bug.mode = 'auto'

    def buggy():
        def run(*args):
            raise IndexError('a real bug')

        return run

    monkeypatch.setattr(bug, 'compiled', buggy)
    with pytest.raises(IndexError, match='a real bug'):
        bug(x)
    assert not bug.failed
