"""The Triton kernels against the torch kernels and upstream.

On a CUDA machine they run on the GPU. Without one, they run on CPU tensors through Triton's
interpreter (``TRITON_INTERPRET=1``), which checks their numbers, not their speed. The
interpreter has to be on before triton is first imported, so on CPU this file runs itself
again in a fresh process with it set (``test_kernels_in_interpreter_process``). Triton is
optional (``pip install -e .[triton]``); without it these tests skip.
"""

import os
import subprocess
import sys
from typing import NamedTuple

import pytest
import torch
from helpers import (
    anchor_head_cfg,
    assert_fp16_results_match,
    assert_grads_match,
    assert_losses_match,
    build,
    loss_and_grads,
    make_batch,
    retina_cfg,
    rpn_cfg,
    ssd_cfg,
    to_plugin,
)

from mmdet_anchorloss.kernels import backends
from mmdet_anchorloss.kernels import sigmoid as sigmoid_kernels

pytest.importorskip('triton')

CUDA = torch.cuda.is_available()
DEVICE = 'cuda' if CUDA else 'cpu'
IN_INTERPRETER = os.environ.get('TRITON_INTERPRET') == '1'
HERE = os.path.dirname(os.path.abspath(__file__))
# on a GPU machine these are CUDA tests: ``pytest -m gpu`` runs them
pytestmark = [pytest.mark.gpu] if CUDA else []


@pytest.mark.skipif(CUDA or IN_INTERPRETER, reason='runs the kernels directly')
def test_kernels_in_interpreter_process():
    """Every test below, on CPU tensors, in a process started with TRITON_INTERPRET=1."""
    env = dict(os.environ, TRITON_INTERPRET='1')
    proc = subprocess.run(
        [sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', os.path.abspath(__file__)],
        cwd=os.path.dirname(os.path.dirname(HERE)),
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    summary = proc.stdout.strip().splitlines()[-1]
    # everything ran but this test itself (skipped in the child)
    assert ' passed' in summary and '1 skipped' in summary and 'failed' not in summary, summary


needs_kernels = pytest.mark.skipif(
    not (CUDA or IN_INTERPRETER), reason='on CPU: run by test_kernels_in_interpreter_process'
)


@pytest.fixture()
def tk():
    """``triton_kernels`` (interpreted on CPU, compiled on CUDA)."""
    from mmdet_anchorloss.kernels import triton_kernels

    assert triton_kernels.usable(torch.zeros(1, device=DEVICE))
    return triton_kernels


class _Call(NamedTuple):
    """The map a kernel entry point was given: shape, dtype, address of its first element."""

    shape: tuple
    dtype: torch.dtype
    data_ptr: int


def _spy(module, monkeypatch, *names):
    """Record the map of every call to ``module.<name>`` (its first argument)."""
    calls = []
    for name in names:
        real = getattr(module, name)

        def spy(*args, _real=real, **kwargs):
            calls.append(_Call(tuple(args[0].shape), args[0].dtype, args[0].data_ptr()))
            return _real(*args, **kwargs)

        monkeypatch.setattr(module, name, spy)
    return calls


def _reference(maps, num_base, labels, weights, scale, params, monkeypatch):
    """The torch kernels' (L,) totals and gradients (Triton switched off)."""
    monkeypatch.setenv('MMDET_ANCHORLOSS_TRITON', '0')
    leaves = [m.detach().clone().requires_grad_() for m in maps]
    totals = sigmoid_kernels.sigmoid_level_losses(leaves, num_base, labels, weights, scale, *params)
    (totals * torch.arange(1.0, len(maps) + 1, device=DEVICE)).sum().backward()
    monkeypatch.delenv('MMDET_ANCHORLOSS_TRITON')
    return totals.detach(), [x.grad for x in leaves]


@needs_kernels
@pytest.mark.parametrize('params', [(2.0, 0.25, 0.75), (0.0, 1.0, 1.0), (1.5, 0.4, 0.6)])
@pytest.mark.parametrize('dtype', [torch.float32, torch.float16])
@pytest.mark.parametrize('C', [7, 20])
def test_sigmoid_level_kernel_matches_torch_kernels(tk, monkeypatch, params, dtype, C):
    """Two levels (the second starts mid-N), ragged tiles: 7 classes in one tile of 8 rows
    and 256 locations, 20 in two steps of 16 rows (the second one 4 rows short) and 128
    locations; the second level's 33 x 16 locations span 3 tiles of 256 and 5 of 128. Both
    targets, weighted sum; logits at the functions' tails (-90: exp(x) flushed to zero)."""
    gen = torch.Generator().manual_seed(0)
    B, num_base, sizes = 2, [3, 2], [(5, 9), (33, 16)]
    maps = [
        (torch.randn(B, a * C, h, w, generator=gen) * 6).to(DEVICE, dtype)
        for a, (h, w) in zip(num_base, sizes)
    ]
    maps[0].view(-1)[:4] = torch.tensor([-30.0, 30.0, 0.0, -90.0])  # the functions' tails
    assert [tk._sigmoid_tile(c) for c in (1, 7, 20)] == [(1, 1024, 1), (8, 256, 1), (16, 128, 2)]
    N = sum(a * h * w for a, (h, w) in zip(num_base, sizes))
    labels = torch.randint(0, C + 1, (B, N), generator=gen).to(DEVICE)
    weights = torch.rand(B, N, generator=gen).to(DEVICE)
    ref, ref_g = _reference(maps, num_base, labels, weights, 0.3, params, monkeypatch)
    coef = (weights * 0.3).float().contiguous()
    start = 0
    for lvl, (x, a) in enumerate(zip(maps, num_base)):
        total, grad = tk.sigmoid_level_loss(x, coef, labels, start, a, *params)
        assert grad.dtype == dtype and grad.shape == x.shape
        torch.testing.assert_close(total, ref[lvl], rtol=1e-5, atol=1e-6)
        scale = float(ref_g[lvl].float().abs().max())  # half: 3 digits of the largest
        tol = (1e-5, 1e-6) if dtype == torch.float32 else (1e-3, 1e-3 * scale)
        torch.testing.assert_close(
            grad.float() * (lvl + 1), ref_g[lvl].float(), rtol=tol[0], atol=tol[1]
        )
        only, none = tk.sigmoid_level_loss(x, coef, labels, start, a, *params, want_grad=False)
        assert none is None
        torch.testing.assert_close(only, ref[lvl], rtol=1e-5, atol=1e-6)
        # the backward's call: the gradient alone, the same bits; the scale read in the kernel
        none, grad_only = tk.sigmoid_level_loss(x, coef, labels, start, a, *params, want_loss=False)
        assert none is None and torch.equal(grad_only, grad)
        scale = torch.tensor(0.3, device=DEVICE)
        scaled, _ = tk.sigmoid_level_loss(x, weights, labels, start, a, *params, coef_scale=scale)
        assert torch.equal(scaled, total)  # weights * 0.3 formed in the kernel: same float32
        start += a * x.size(2) * x.size(3)


@needs_kernels
@pytest.mark.parametrize('weights', [(1.0, 3.0), (65536.0, 65536.0), (1.0, 0.0)])
def test_triton_backward_takes_the_incoming_gradient(tk, monkeypatch, weights):
    """Per-level incoming gradients other than 1 (a weighted sum, AMP's loss scale, a level
    left out) scale the Triton gradient exactly as they scale the torch kernels'."""
    gen = torch.Generator().manual_seed(3)
    B, C, num_base = 2, 5, [3, 2]
    maps = [
        (torch.randn(B, a * C, h, w, generator=gen) * 3).to(DEVICE)
        for a, (h, w) in zip(num_base, [(4, 6), (2, 3)])
    ]
    N = 3 * 24 + 2 * 6
    labels = torch.randint(0, C + 1, (B, N), generator=gen).to(DEVICE)
    lw = torch.rand(B, N, generator=gen).to(DEVICE)
    w = torch.tensor(weights, device=DEVICE)

    def run():
        leaves = [m.detach().clone().requires_grad_() for m in maps]
        totals = sigmoid_kernels.sigmoid_level_losses(
            leaves, num_base, labels, lw, 0.5, 2, 0.25, 0.75
        )
        (totals * w).sum().backward()
        return totals.detach(), [x.grad for x in leaves]

    got, got_g = run()
    monkeypatch.setenv('MMDET_ANCHORLOSS_TRITON', '0')
    ref, ref_g = run()
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(ref_g, got_g):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6 * max(weights))
    if weights[1] == 0:
        assert float(got_g[1].abs().sum()) == 0.0


@needs_kernels
def test_sigmoid_kernel_softplus_tail_is_not_rounded_to_zero(tk):
    """BCE of a very negative logit is exp(x), not 0 (log1p without libdevice)."""
    x = torch.full((1, 1, 1, 4), -20.0, device=DEVICE)
    coef = torch.ones(1, 4, device=DEVICE)
    labels = torch.ones(1, 4, dtype=torch.long, device=DEVICE)  # background (C = 1)
    total, _ = tk.sigmoid_level_loss(x, coef, labels, 0, 1, 0.0, 1.0, 1.0)
    expect = 4 * torch.nn.functional.softplus(torch.tensor(-20.0, dtype=torch.float64))
    assert abs(float(total) - float(expect)) <= 1e-6 * float(expect)


@needs_kernels
@pytest.mark.parametrize('steps', [1, 2])
def test_sigmoid_kernel_split_over_class_groups_gives_the_same_numbers(tk, monkeypatch, steps):
    """``SIGMOID_CLASS_STEPS`` (the sweep's other program shapes) splits a program's classes
    over the grid's third axis: 40 classes are 3 tiles of 16 rows, all in one program by
    default, 3 or 2 class groups here. Each group leaves partial sums of its own; the total
    and the gradient are the default's."""
    gen = torch.Generator().manual_seed(5)
    B, A, C, H, W = 2, 3, 40, 6, 7
    x = (torch.randn(B, A * C, H, W, generator=gen) * 4).to(DEVICE)
    labels = torch.randint(0, C + 1, (B, A * H * W), generator=gen).to(DEVICE)
    coef = torch.rand(B, A * H * W, generator=gen).to(DEVICE)
    params = (2.0, 0.25, 0.75)
    total, grad = tk.sigmoid_level_loss(x, coef, labels, 0, A, *params)
    tiles = tk.sigmoid_tiles(x, A)
    monkeypatch.setattr(tk, 'SIGMOID_CLASS_STEPS', steps)
    assert tk.sigmoid_tiles(x, A) == tiles * (3 if steps == 1 else 2)
    split_total, split_grad = tk.sigmoid_level_loss(x, coef, labels, 0, A, *params)
    torch.testing.assert_close(split_total, total, rtol=1e-6, atol=0)
    assert torch.equal(split_grad, grad)  # each logit's gradient is computed the same way


@needs_kernels
@pytest.mark.parametrize('dtype', [torch.float32, torch.float16])
def test_softmax_kernels_match_torch(tk, dtype):
    gen = torch.Generator().manual_seed(1)
    B, A, C1, S = 2, 3, 21, 37
    x = (torch.randn(B, A, C1, S, generator=gen) * 4).to(DEVICE, dtype)
    labels = torch.randint(0, C1, (B, A, S), generator=gen).to(DEVICE)
    coef = torch.rand(B, A, S, generator=gen).to(DEVICE)
    lse, ce = tk.softmax_ce_forward(x, labels)
    xf = x.float()
    ref_ce = torch.nn.functional.cross_entropy(
        xf.permute(0, 1, 3, 2).reshape(-1, C1), labels.reshape(-1), reduction='none'
    ).view(B, A, S)
    torch.testing.assert_close(ce, ref_ce, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, torch.logsumexp(xf, dim=2), rtol=1e-5, atol=1e-5)
    grad = tk.softmax_ce_backward(x, labels, lse, coef)
    xr = xf.detach().requires_grad_()
    ce_r = torch.nn.functional.cross_entropy(
        xr.permute(0, 1, 3, 2).reshape(-1, C1), labels.reshape(-1), reduction='none'
    )
    (ce_r * coef.reshape(-1)).sum().backward()
    assert grad.dtype == dtype
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(grad.float(), xr.grad, **tol)


@needs_kernels
@pytest.mark.parametrize(
    'make_cfg',
    [
        retina_cfg,
        rpn_cfg,
        lambda: anchor_head_cfg(
            loss_cls=dict(_replace_=1, type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0)
        ),
    ],
    ids=['focal', 'sigmoid_ce', 'softmax_ce'],
)
def test_head_through_triton_matches_upstream(tk, monkeypatch, make_cfg):
    """The whole loss, with every level's classification pass in Triton."""
    sigmoid = _spy(tk, monkeypatch, 'sigmoid_level_loss')
    softmax = _spy(tk, monkeypatch, 'softmax_ce_forward')
    cfg = make_cfg()
    upstream, plugin = build(cfg).to(DEVICE), build(to_plugin(cfg)).to(DEVICE)
    batch = make_batch(upstream, 5, (4, 2), [(100, 120), (64, 90)], device=DEVICE)
    ref, ref_g = loss_and_grads(upstream, *batch)
    got, got_g = loss_and_grads(plugin, *batch)
    # one kernel per level: sigmoid forward (loss) and backward (gradient), or softmax
    assert (len(sigmoid), len(softmax)) in ((10, 0), (0, 5)), (len(sigmoid), len(softmax))
    assert_losses_match(ref, got)
    assert_grads_match(ref_g, got_g)


@needs_kernels
def test_ssd_through_triton_matches_upstream(tk, monkeypatch):
    calls = _spy(tk, monkeypatch, 'softmax_ce_forward')
    cfg = ssd_cfg()
    upstream, plugin = build(cfg).to(DEVICE), build(to_plugin(cfg)).to(DEVICE)
    batch = make_batch(upstream, 2, (4, 1), [(300, 300), (300, 280)], pad_divisor=1, device=DEVICE)
    ref, ref_g = loss_and_grads(upstream, *batch)
    got, got_g = loss_and_grads(plugin, *batch)
    assert len(calls) == 6
    assert_losses_match(ref, got)
    assert_grads_match(ref_g, got_g)


def _cuda_topk(self, k, dim=-1, largest=True, sorted=True):
    """``Tensor.topk`` choosing among values equal to the k-th as CUDA's does: the first in
    index order (``gatherTopK`` in ATen's TensorTopK.cu); on CPU the choice is unspecified.
    So the test holds the plugin to upstream's mining as it runs on a GPU, without one;
    ``test_fused_losses`` compares with CUDA's own topk where there is one."""
    values, order = self.sort(dim=dim, descending=largest, stable=True)
    return torch.return_types.topk((values.narrow(dim, 0, k), order.narrow(dim, 0, k)))


@needs_kernels
@pytest.mark.parametrize(
    'make_cfg,shapes,pad',
    [
        (retina_cfg, [(100, 120), (64, 90)], 32),
        (rpn_cfg, [(100, 120), (64, 90)], 32),
        (ssd_cfg, [(300, 300), (300, 280)], 1),
    ],
    ids=['retina', 'rpn', 'ssd'],
)
def test_half_maps_through_triton_match_upstream_on_their_values(
    tk, monkeypatch, make_cfg, shapes, pad
):
    """AMP's case without a GPU: float16 maps read as they are by the kernels, held to the
    criteria of ``test_amp.py``'s CUDA test against upstream on the same values in float32
    (what autocast gives the focal losses). SSD's against upstream on the half maps
    themselves: its ``F.cross_entropy`` returns half values, as under CUDA autocast (an H200
    run), and its hard negatives are the top-k of those; the plugin must keep the same
    anchors, ties included."""
    cfg = make_cfg()
    upstream, plugin = build(cfg).to(DEVICE), build(to_plugin(cfg)).to(DEVICE)
    batch = make_batch(upstream, 0, (3, 1), shapes, pad_divisor=pad, device=DEVICE)
    cls, reg, gts, metas, ignore = batch
    half = [x.detach().half() for x in cls + reg]
    values = [x.float() for x in half]
    L = len(cls)
    ref_maps = half if make_cfg is ssd_cfg else values
    with monkeypatch.context() as m:
        m.setattr(torch.Tensor, 'topk', _cuda_topk)  # ties as upstream breaks them on CUDA
        ref, ref_g = loss_and_grads(upstream, ref_maps[:L], ref_maps[L:], gts, metas, ignore)
    calls = _spy(tk, monkeypatch, 'sigmoid_level_loss', 'softmax_ce_forward')
    leaves = []
    got, got_g = loss_and_grads(plugin, half[:L], half[L:], gts, metas, ignore, leaves=leaves)
    assert len(calls) in (L, 2 * L)  # softmax: forward; sigmoid: forward and backward
    # the kernels read the half maps themselves: no float32 copy, no copy at all
    assert {c.dtype for c in calls} == {torch.float16}
    assert {c.data_ptr for c in calls} == {m.data_ptr() for m in leaves[:L]}
    assert_fp16_results_match(ref, ref_g, got, got_g)


@needs_kernels
def test_switch_off(tk, monkeypatch):
    x = torch.zeros(1, 1, 1, 1, device=DEVICE)
    assert backends.use_triton(x)
    monkeypatch.setenv('MMDET_ANCHORLOSS_TRITON', '0')
    assert not backends.use_triton(x)


@needs_kernels
@pytest.mark.parametrize(
    'options',
    [
        {},
        dict(gt_max_assign_all=False),
        dict(min_pos_iou=0.3, neg_iou_thr=(0.1, 0.4)),
        dict(min_pos_iou=0.8, pos_iou_thr=0.9),
        dict(ignore_iof_thr=0.5),
        dict(match_low_quality=False),
    ],
    ids=['default', 'first_anchor_only', 'min_pos_iou', 'some_gts_below', 'ignore', 'no_low'],
)
def test_assigner_kernels_equal_the_torch_path_bit_for_bit(tk, monkeypatch, options):
    """Same gt_inds, labels and max_overlaps (bitwise) with duplicates, an empty image and
    ties at every gt's best IoU; the torch path is the one the parity tests pin."""
    from mmdet.registry import TASK_UTILS

    from mmdet_anchorloss.core.anchors import batch_anchors
    from mmdet_anchorloss.core.structures import pad_instances

    head = build(to_plugin(retina_cfg()))
    batch = make_batch(
        head, 4, (5, 0, 3), [(100, 120), (64, 90), (96, 96)], duplicate=True, num_ignore=(1, 0, 2)
    )
    _, _, gts, metas, ignore = batch
    sizes = [tuple(c.shape[-2:]) for c in batch[0]]
    anchors = batch_anchors(head.prior_generator, sizes, metas, -1, DEVICE)
    gts[0].bboxes[2] = anchors.anchors[700]  # an exact IoU of 1
    padded = pad_instances(gts, DEVICE)
    ign = pad_instances(ignore, DEVICE, with_labels=False) if 'ignore_iof_thr' in options else None
    cfg = dict(type='BatchMaxIoUAssigner', pos_iou_thr=0.5, neg_iou_thr=0.4, min_pos_iou=0)
    assigner = TASK_UTILS.build({**cfg, **options})
    got = assigner.assign_batch(anchors.anchors, anchors.inside, padded, ign)
    monkeypatch.setenv('MMDET_ANCHORLOSS_TRITON', '0')
    ref = assigner.assign_batch(anchors.anchors, anchors.inside, padded, ign)
    assert torch.equal(got.gt_inds, ref.gt_inds)
    assert torch.equal(got.labels, ref.labels)
    assert torch.equal(got.max_overlaps, ref.max_overlaps)
    assert (ref.gt_inds > 0).any() and (ref.gt_inds == 0).any()
    if options.get('min_pos_iou', 0) > 0.4:  # low-quality matches for some gts, not all
        from mmdet.structures.bbox import bbox_overlaps

        best = [
            bbox_overlaps(g.bboxes.to(DEVICE), anchors.anchors[anchors.inside[i]]).amax(dim=1)
            for i, g in enumerate(gts)
            if len(g)
        ]
        best = torch.cat(best)
        assert (best < options['min_pos_iou']).any() and (best >= options['min_pos_iou']).any()


@needs_kernels
@pytest.mark.parametrize('match_low_quality', [False, True])
def test_triton_assignment_at_the_thresholds_is_upstreams(tk, match_low_quality):
    """IoUs exactly at pos_iou_thr (0.5), at the upper negative bound (0.4: not negative)
    and at the lower one (0.1: negative), and at min_pos_iou for the low-quality matches:
    the Triton kernels' compares give upstream ``MaxIoUAssigner``'s gt_inds and labels."""
    from mmdet.models.task_modules.assigners import MaxIoUAssigner
    from mmdet.registry import TASK_UTILS
    from mmengine.structures import InstanceData

    from mmdet_anchorloss.core.structures import pad_instances

    anchors = torch.tensor(
        [[0, 0, 10, 10], [100, 100, 110, 110], [200, 200, 210, 210], [300, 300, 310, 310.0]]
    )
    gts = torch.tensor(  # IoU with anchor i: 100 / 200, 100 / 250, 100 / 1000, 100 / 400
        [[0, 0, 10, 20], [100, 100, 110, 125], [200, 200, 210, 300], [300, 300, 310, 340.0]]
    )
    labels = torch.tensor([3, 1, 2, 0])
    cfg = dict(
        pos_iou_thr=0.5,
        neg_iou_thr=(0.1, 0.4),
        min_pos_iou=0.25,  # gt 3's best IoU, exactly
        match_low_quality=match_low_quality,
    )
    ref = MaxIoUAssigner(**cfg).assign(
        InstanceData(priors=anchors), InstanceData(bboxes=gts, labels=labels)
    )
    assigner = TASK_UTILS.build(dict(type='BatchMaxIoUAssigner', **cfg))
    padded = pad_instances([InstanceData(bboxes=gts, labels=labels)], DEVICE)
    got = assigner.assign_batch(
        anchors.to(DEVICE), torch.ones(1, 4, dtype=torch.bool, device=DEVICE), padded
    )
    # low quality: gts 1 (0.4) and 3 (0.25, at min_pos_iou) claim their best anchor; gt 2 (0.1)
    # is below min_pos_iou and does not
    expected = [1, 2, 0, 4] if match_low_quality else [1, -1, 0, 0]
    assert ref.gt_inds.tolist() == expected  # the boundaries are where this test says
    assert got.gt_inds[0].tolist() == expected
    assert got.labels[0].tolist() == ref.labels.tolist()
    assert torch.equal(got.max_overlaps[0].cpu(), ref.max_overlaps)


@needs_kernels
def test_cuda_path_ops_do_not_grow_with_batch_or_gts(tk, monkeypatch):
    """Aten ops around the Triton launches of one RetinaNet step, with CUDA's choices: the
    same count for B=2, G=3 and B=6, G=12 (no loop over images, gts or anchor chunks),
    within a budget, and 2 host syncs. Each launch runs with the counter paused, as a CUDA
    launch dispatches no aten op."""
    from torch.utils._python_dispatch import _disable_current_modes

    from mmdet_anchorloss.kernels.sync_policy import cuda_sync_policy
    from mmdet_anchorloss.profiling import count_ops

    launches = []

    class Launch:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            run = self.kernel[grid]

            def launch(*args, **kwargs):
                launches.append(grid)
                with _disable_current_modes():
                    return run(*args, **kwargs)

            return launch

    names = [
        '_sigmoid_level_kernel',
        '_assign_max_kernel',
        '_assign_ties_kernel',
        '_assign_finalize_kernel',
    ]
    for name in names:
        monkeypatch.setattr(tk, name, Launch(getattr(tk, name)))
    monkeypatch.setattr(tk, 'usable', lambda x: True)
    head = build(to_plugin(retina_cfg(num_classes=3)))
    counts = []
    for B, G in [(2, 3), (6, 12)]:
        cls, reg, gts, metas, _ = make_batch(head, 0, [G] * B, [(64, 96)] * B, device=DEVICE)
        for _ in range(2):  # the second step: anchor grids cached, as in training
            c = [x.detach().clone().requires_grad_() for x in cls]
            r = [x.detach().clone().requires_grad_() for x in reg]
            launches.clear()
            with cuda_sync_policy(), count_ops() as counter:
                losses = head.loss_by_feat(c, r, gts, metas, None)
                total = sum(sum(v) for v in losses.values())
                # the gradients of the maps, as a network's backward hands them on to its
                # convolutions (the maps are no leaves there: nothing is accumulated)
                torch.autograd.grad(total, c + r)
        got = counter.result()
        # per level loss and gradient; assignment maxima, ties, finalize
        assert len(launches) == 5 + 5 + 3
        assert got.syncs <= 2, dict(got.sync_sites)
        counts.append(got.ops)
    assert counts[0] == counts[1], counts
    assert counts[0] <= OPS_BUDGET, counts


# Aten ops of a RetinaNet step on the CUDA path (issue 10 asks for at most 150). Counted
# here: 365 at first; 277 after the regression rows came in one gather, the encoding read
# its columns with one unbind and the sigmoid kernels shared their buffers; 141 (2026-11-26)
# once the assignment's finalize step became a Triton kernel (it was some 25 ops eagerly),
# the kernels read bool masks as they are, the encoding worked on (x, y) pairs, the
# regression rows' index and the inside flags were kept with the anchor grid (per map
# shapes and per batch of image shapes), the log counts came back with the positives'
# count, and the step's gradients were taken as a network takes them (the maps are no
# leaves there: 10 fewer ops than ``.backward()`` on leaf maps). On a GPU each host upload
# adds a pin and a copy (the pad slots and mask: about 4 ops) that the CPU does not
# dispatch. The H100 run of 52d07ff counted 355; the H200 run of d553a43 counted 151, its
# two uploads a step going through ``pin_memory()`` (a copy of its own): ``upload`` now
# makes host lists in pinned memory at once (the H200 run of 1c5bb4d passed).
OPS_BUDGET = 150


@needs_kernels
def test_assigner_iou_is_bbox_overlaps_bit_for_bit(tk):
    """Each anchor's best IoU from the Triton kernel equals ``bbox_overlaps``'s bit for bit,
    on random boxes and on exact quotients (1.0, 0.5): the division rounds as torch's (on an
    H100, Triton's ``/`` was up to 2 ulp off, and moved IoUs across the thresholds)."""
    from mmdet.structures.bbox import bbox_overlaps

    gen = torch.Generator().manual_seed(5)
    xy = torch.rand(3, 40, 2, generator=gen) * 300
    gts = torch.cat([xy, xy + 1 + torch.rand(3, 40, 2, generator=gen) * 200], dim=-1)
    xy = torch.rand(2000, 2, generator=gen) * 300
    anchors = torch.cat([xy, xy + 1 + torch.rand(2000, 2, generator=gen) * 200], dim=-1)
    anchors[:2] = torch.tensor([[0.0, 0.0, 4.0, 4.0], [10.0, 10.0, 14.0, 14.0]])
    gts[0, :2] = torch.tensor([[0.0, 0.0, 4.0, 4.0], [10.0, 10.0, 18.0, 14.0]])  # IoU 1, 0.5
    gts, anchors = gts.to(DEVICE), anchors.to(DEVICE)
    mask = torch.ones(3, 40, dtype=torch.bool, device=DEVICE)
    inside = torch.ones(3, 2000, dtype=torch.bool, device=DEVICE)
    max_ov, _, gt_max, _ = tk.assign_overlaps(gts, mask, anchors, inside, None)
    ref = torch.stack([bbox_overlaps(g, anchors) for g in gts])  # (B, G, N)
    assert torch.equal(max_ov, ref.max(dim=1).values)
    assert torch.equal(gt_max, ref.max(dim=2).values)
    assert max_ov[0, 0] == 1.0 and max_ov[0, 1] == 0.5
