"""Half-precision maps (AMP): read as half, computed in float32, gradients in half.

On CPU the plugin's loss on float16 maps must equal its loss on the same values in float32
(the kernels upcast on read). On CUDA, under ``torch.autocast``, it must agree with upstream
within float16 tolerance.
"""

import pytest
import torch
from helpers import (
    assert_fp16_results_match,
    build,
    loss_and_grads,
    make_batch,
    retina_cfg,
    rpn_cfg,
    ssd_cfg,
    to_plugin,
)

SHAPES = [(100, 120), (64, 90)]


def _half(batch):
    cls, reg, gts, metas, ignore = batch
    half = [x.detach().half() for x in cls], [x.detach().half() for x in reg]
    return (*half, gts, metas, ignore)


def _as_float(batch):
    cls, reg, gts, metas, ignore = batch
    return [x.float() for x in cls], [x.float() for x in reg], gts, metas, ignore


@pytest.mark.parametrize(
    'make_cfg,shapes,pad',
    [(retina_cfg, SHAPES, 32), (rpn_cfg, SHAPES, 32), (ssd_cfg, [(300, 300), (300, 280)], 1)],
    ids=['focal', 'sigmoid_ce', 'ssd'],
)
def test_half_maps_equal_their_float_values(make_cfg, shapes, pad):
    head = build(to_plugin(make_cfg()))
    half = _half(make_batch(head, 0, (3, 1), shapes, pad_divisor=pad))
    got, got_g = loss_and_grads(head, *half)
    ref, ref_g = loss_and_grads(head, *_as_float(half))
    for key in ref:
        for a, b in zip(ref[key], got[key]):
            assert b.dtype == torch.float32
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
    for a, b in zip(ref_g, got_g):
        assert b.dtype == torch.float16  # the gradient comes back in the map's dtype
        # float16 rounding: 3 digits, and subnormals below 6e-5 of the largest entries
        tol = 1e-3 * float(a.abs().max())
        torch.testing.assert_close(b.float(), a, rtol=1e-3, atol=tol)


@pytest.mark.gpu
@pytest.mark.parametrize(
    'make_cfg,shapes,pad',
    [
        (retina_cfg, SHAPES, 32),
        (rpn_cfg, SHAPES, 32),
        (ssd_cfg, [(300, 300), (300, 280)], 1),
    ],
    ids=['retina', 'rpn', 'ssd'],
)
def test_autocast_matches_upstream_within_fp16_tolerance(make_cfg, shapes, pad):
    cfg = make_cfg()
    upstream, plugin = build(cfg).cuda(), build(to_plugin(cfg)).cuda()
    batch = _half(make_batch(upstream, 0, (3, 1), shapes, pad_divisor=pad, device='cuda'))
    with torch.autocast('cuda', dtype=torch.float16):
        ref, ref_g = loss_and_grads(upstream, *batch)
        got, got_g = loss_and_grads(plugin, *batch)
    assert_fp16_results_match(ref, ref_g, got, got_g)
