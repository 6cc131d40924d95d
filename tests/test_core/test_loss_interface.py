"""``FusedCrossEntropyLoss`` and ``FusedFocalLoss`` through upstream's ``forward``.

Every combination of ignored labels, ``avg_non_ignore``, ``class_weight``, ``weight``,
``avg_factor`` and ``reduction`` against mmdet's own ``CrossEntropyLoss`` / ``FocalLoss``:
value, and gradient of a weighted sum of the output.
"""

import itertools

import pytest
import torch
from helpers import assert_grads_match
from mmdet.models.losses import CrossEntropyLoss, FocalLoss

from mmdet_anchorloss.losses import FusedCrossEntropyLoss, FusedFocalLoss

R, C = 60, 4
pytestmark = pytest.mark.filterwarnings('ignore:Default ``avg_non_ignore`` is False')


def _rows(seed, ignored=True, labels_above=False):
    gen = torch.Generator().manual_seed(seed)
    pred = torch.randn(R, C, generator=gen) * 2.5
    labels = torch.randint(0, C + 1, (R,), generator=gen)  # C: background
    if ignored:
        labels[torch.randperm(R, generator=gen)[:12]] = -1
    if labels_above:
        labels[:3] = C + 2  # above the background index: an all-zero row upstream
    weight = torch.rand(R, generator=gen) * 2
    weight[::7] = 0
    return pred, labels, weight


def _call(loss, pred, *args, **kwargs):
    """(value, gradient of a weighted sum of the value) or the exception's type."""
    x = pred.clone().requires_grad_()
    try:
        out = loss(x, *args, **kwargs)
    except (ValueError, RuntimeError, AssertionError) as err:
        return type(err), None
    w = torch.linspace(0.5, 2.0, out.numel()).view(out.shape)
    (out * w * 3.0).sum().backward()
    return out.detach(), x.grad


def _assert_same(ref, got):
    if isinstance(ref[0], type):
        assert got[0] is ref[0], f'upstream raised {ref[0].__name__}, got {got[0]}'
        return
    assert not isinstance(got[0], type), f'upstream gave a value, the plugin raised {got[0]}'
    assert got[0].shape == ref[0].shape
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-7)
    assert_grads_match([ref[1]], [got[1]])


REDUCTIONS = ['mean', 'sum', 'none']


@pytest.mark.parametrize(
    'avg_non_ignore, class_weight, use_weight, avg_factor, reduction',
    list(itertools.product([False, True], [None, 'w'], [False, True], [None, 23.0], REDUCTIONS)),
)
def test_sigmoid_cross_entropy_every_option(
    avg_non_ignore, class_weight, use_weight, avg_factor, reduction
):
    pred, labels, weight = _rows(0)
    cw = [0.5, 1.0, 2.0, 1.5] if class_weight else None
    kw = dict(use_sigmoid=True, avg_non_ignore=avg_non_ignore, class_weight=cw, loss_weight=1.3)
    args = (labels, weight if use_weight else None)
    call = dict(avg_factor=avg_factor, reduction_override=reduction)
    ref = _call(CrossEntropyLoss(**kw), pred, *args, **call)
    got = _call(FusedCrossEntropyLoss(**kw), pred, *args, **call)
    _assert_same(ref, got)


@pytest.mark.parametrize('reduction', ['mean', 'sum'])
def test_sigmoid_cross_entropy_avg_non_ignore_value(reduction):
    """The issue-15 divergence: labels -1, no avg_factor, avg_non_ignore (was 0.5917)."""
    pred, labels, weight = _rows(0)
    assert (labels < 0).sum() == 12
    kw = dict(use_sigmoid=True, avg_non_ignore=True, reduction=reduction)
    ref = CrossEntropyLoss(**kw)(pred, labels, weight)
    got = FusedCrossEntropyLoss(**kw)(pred, labels, weight)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=0)
    if reduction == 'mean':  # the average over the 48 non-ignored rows' C entries
        full = CrossEntropyLoss(use_sigmoid=True, reduction='sum')(pred, labels, weight)
        torch.testing.assert_close(ref, full / (48 * C), rtol=1e-6, atol=0)


@pytest.mark.parametrize('labels_above', [False, True])
@pytest.mark.parametrize('ignore_index', [None, 2])
@pytest.mark.parametrize('where', ['constructor', 'forward'])
def test_sigmoid_cross_entropy_ignore_index(labels_above, ignore_index, where):
    pred, labels, weight = _rows(1, labels_above=labels_above)
    kw = dict(use_sigmoid=True, avg_non_ignore=True)
    call = {}
    if where == 'constructor':
        kw['ignore_index'] = ignore_index
    else:
        call['ignore_index'] = ignore_index
    ref = _call(CrossEntropyLoss(**kw), pred, labels, weight, **call)
    got = _call(FusedCrossEntropyLoss(**kw), pred, labels, weight, **call)
    _assert_same(ref, got)


@pytest.mark.parametrize(
    'avg_non_ignore, class_weight, ignore_index, avg_factor, reduction',
    list(itertools.product([False, True], [None, 'w'], [None, 1], [None, 23.0], REDUCTIONS)),
)
def test_softmax_cross_entropy_every_option(
    avg_non_ignore, class_weight, ignore_index, avg_factor, reduction
):
    pred, labels, weight = _rows(2, ignored=False)
    pred = torch.cat([pred, pred[:, :1] * 0.5], dim=1)  # C + 1 columns
    cw = [0.5, 1.0, 2.0, 1.5, 0.7] if class_weight else None
    kw = dict(
        use_sigmoid=False, avg_non_ignore=avg_non_ignore, class_weight=cw, ignore_index=ignore_index
    )
    call = dict(avg_factor=avg_factor, reduction_override=reduction)
    ref = _call(CrossEntropyLoss(**kw), pred, labels, weight, **call)
    got = _call(FusedCrossEntropyLoss(**kw), pred, labels, weight, **call)
    _assert_same(ref, got)


@pytest.mark.parametrize(
    'params, weight_kind, avg_factor, reduction',
    list(
        itertools.product(
            [dict(), dict(gamma=1.5, alpha=0.4, loss_weight=2.0), dict(gamma=0.0, alpha=0.5)],
            [None, 'rows', 'entries'],
            [None, 23.0],
            REDUCTIONS,
        )
    ),
)
def test_focal_every_option(params, weight_kind, avg_factor, reduction):
    pred, labels, weight = _rows(3, ignored=False)  # upstream's CPU path cannot take -1
    weight = {None: None, 'rows': weight, 'entries': weight[:, None].expand(R, C) * 0.5}[
        weight_kind
    ]
    call = dict(avg_factor=avg_factor, reduction_override=reduction)
    ref = _call(FocalLoss(**params), pred, labels, weight, **call)
    got = _call(FusedFocalLoss(**params), pred, labels, weight, **call)
    _assert_same(ref, got)


def test_focal_reduction_from_the_constructor():
    pred, labels, weight = _rows(4, ignored=False)
    for reduction in REDUCTIONS:
        ref = _call(FocalLoss(reduction=reduction), pred, labels, weight)
        got = _call(FusedFocalLoss(reduction=reduction), pred, labels, weight)
        _assert_same(ref, got)


@pytest.mark.parametrize('avg_factor', [1.0, 3.0, torch.tensor(1.0), torch.tensor(7.0)])
def test_normalise_is_upstreams_mean_reduction_bitwise(avg_factor):
    """``sum / (avg_factor + eps)`` exactly as mmdet's ``weight_reduce_loss`` computes it."""
    from mmdet.models.losses.utils import weight_reduce_loss

    from mmdet_anchorloss.core.reduce import normalise

    loss = torch.rand(50, generator=torch.Generator().manual_seed(0)) + 0.5
    ref = weight_reduce_loss(loss, reduction='mean', avg_factor=avg_factor)
    assert torch.equal(normalise(loss.sum(), avg_factor), ref)
    assert normalise(loss.sum(), None) is not None
    torch.testing.assert_close(normalise(loss.sum(), None), loss.sum(), rtol=0, atol=0)


@pytest.mark.parametrize('reduction', REDUCTIONS)
def test_focal_activated_and_single_entry(reduction):
    """``activated=True`` takes probabilities, not logits; one row of one class."""
    pred, labels, weight = _rows(5, ignored=False)
    probs = pred.sigmoid().clamp(0.01, 0.99)
    ref = _call(FocalLoss(activated=True, reduction=reduction), probs, labels, weight)
    got = _call(FusedFocalLoss(activated=True, reduction=reduction), probs, labels, weight)
    _assert_same(ref, got)
    # a moderate logit: at |x| >> 1 a confident, correct positive's loss (~1e-7) is the
    # difference of two O(1) terms in the fused kernel, exact only to ~1e-8 absolute
    one = torch.tensor([[0.7]])
    for label in ([0], [1]):
        target = torch.tensor(label)
        ref = _call(FocalLoss(reduction=reduction), one, target)
        got = _call(FusedFocalLoss(reduction=reduction), one, target)
        _assert_same(ref, got)
        ref = _call(CrossEntropyLoss(use_sigmoid=True, reduction=reduction), one, target)
        got = _call(FusedCrossEntropyLoss(use_sigmoid=True, reduction=reduction), one, target)
        _assert_same(ref, got)
