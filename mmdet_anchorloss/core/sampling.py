"""Sampling for a batch: PseudoSampler batched, RandomSampler with upstream's random stream,
and the opt-in ``DeviceRandomSampler`` drawn on the device."""

from typing import Sequence, Tuple

import numpy as np
import torch
from mmdet.models.task_modules.samplers import PseudoSampler, RandomSampler
from mmengine.structures import InstanceData
from torch import Tensor

from ..kernels.sync_policy import upload
from ..profiling import stage
from .anchors import BatchAnchors
from .assign import assign_result_of
from .randperm_replay import randperm_prefixes
from .structures import BatchAssignResult


def sample_batch(
    sampler,
    assign: BatchAssignResult,
    anchors: BatchAnchors,
    batch_gt_instances: Sequence[InstanceData],
):
    """Sampled positive / negative masks (B, N) and the avg_factor (0-d tensor).

    ``PseudoSampler`` is batched (every positive and negative; avg_factor counts
    max(#pos, 1) per image), as is ``RandomSampler`` (its draws replayed). A sampler that
    offers ``sample_masks(pos, neg)`` (the plugin's ``DeviceRandomSampler``) samples the
    batch itself, unless that returns None. Other samplers run per image with upstream's
    own ``sample``.
    """
    if isinstance(sampler, PseudoSampler):
        pos = assign.gt_inds > 0
        neg = assign.gt_inds == 0
        avg_factor = pos.sum(dim=1).clamp(min=1).sum(dtype=torch.float32)
        return pos, neg, avg_factor
    batched = getattr(sampler, 'sample_masks', None)  # a sampler's own batched form
    if batched is not None:
        out = batched(assign.gt_inds > 0, assign.gt_inds == 0)
        if out is not None:
            return out
    if type(sampler) is RandomSampler and not sampler.add_gt_as_proposals:
        return _sample_random(sampler, assign)
    B, N = assign.gt_inds.shape
    pos = torch.zeros(B, N, dtype=torch.bool, device=assign.gt_inds.device)
    neg = torch.zeros_like(pos)
    total = 0
    for i in range(B):  # RandomSampler draws per image, in upstream's order
        res, keep = assign_result_of(assign, i, anchors.inside)
        sampling = sampler.sample(
            res, InstanceData(priors=anchors.anchors[keep]), batch_gt_instances[i]
        )
        pos[i, keep[sampling.pos_inds]] = True
        neg[i, keep[sampling.neg_inds]] = True
        total += sampling.avg_factor
    return pos, neg, torch.full((), float(total), device=pos.device)


def _sample_random(sampler, assign: BatchAssignResult):
    """``RandomSampler`` for the batch, with upstream's random stream.

    Upstream draws, image by image, a ``randperm`` for the positives and then one for the
    negatives, each only when there are more candidates than wanted. The counts come back
    in one host sync; the draws are replayed in the same order with the same sizes
    (``randperm_prefixes``: the same ranks and generator state, without shuffling all the
    candidates); the selection itself is batched.
    """
    pos = assign.gt_inds > 0
    neg = assign.gt_inds == 0
    num_pos, num_neg = torch.stack([pos.count_nonzero(dim=1), neg.count_nonzero(dim=1)]).tolist()
    want_pos = max(int(sampler.num * sampler.pos_fraction), 0)
    picks, total = [], 0  # (image, 0 pos / 1 neg, candidates, wanted), in upstream's order
    for b in range(pos.size(0)):  # the draws must follow upstream's order: pos, neg, next image
        got_pos = min(num_pos[b], want_pos)
        want_neg = sampler.num - got_pos
        if sampler.neg_pos_ub >= 0:
            want_neg = min(want_neg, int(sampler.neg_pos_ub * max(1, got_pos)))
        want_neg = max(want_neg, 0)
        picks += [(b, 0, num_pos[b], want_pos), (b, 1, num_neg[b], want_neg)]
        total += max(got_pos, 1) + max(min(num_neg[b], want_neg), 1)
    with stage('draws'):  # host time, apart in a profile: the CPU generator's draws
        # upstream's random_choice, only where there are more candidates than wanted:
        # randperm(candidates)[:wanted]
        ranks = iter(randperm_prefixes([(n, k) for _, _, n, k in picks if n > k]))
        # chosen[kind][b, r + 1]: whether the candidate of rank r is kept; column 0 is what a
        # non-candidate (cumsum 0 before the first candidate) reads, and the mask drops it
        chosen = [np.zeros((len(c), max(c, default=0) + 1), dtype=bool) for c in (num_pos, num_neg)]
        for b, kind, n, k in picks:
            chosen[kind][b, next(ranks) + 1 if n > k else slice(1, n + 1)] = True
    # the draws go to the device without a host sync (pinned, non-blocking on CUDA); each
    # candidate reads its rank's entry: the count of candidates up to it (rank + 1)
    pos = pos & upload(torch.from_numpy(chosen[0]), pos.device).gather(1, pos.cumsum(dim=1))
    neg = neg & upload(torch.from_numpy(chosen[1]), neg.device).gather(1, neg.cumsum(dim=1))
    return pos, neg, torch.full((), float(total), device=pos.device)


def sample_on_device(
    pos: Tensor, neg: Tensor, num: int, pos_fraction: float, neg_pos_ub: float = -1
) -> Tuple[Tensor, Tensor, Tensor]:
    """``RandomSampler``'s counts for the batch, drawn on the masks' device: no host sync.

    Per image, as upstream: ``int(num * pos_fraction)`` positives (all of them when there
    are fewer), then ``num`` minus that many negatives, at most ``int(neg_pos_ub * max(1,
    positives))`` when ``neg_pos_ub >= 0``. Which ones: a uniformly random subset of that
    size, the candidates with the smallest of uniform keys (one ``torch.rand`` from the
    device's generator, shared by the positives and the negatives: they never overlap).
    Not upstream's random stream: its CPU ``randperm`` draws give other anchors, so the
    losses differ from upstream's by the choice of samples.

    Args:
        pos, neg (Tensor): (B, N) bool candidates (assigned positive / negative).
        num, pos_fraction, neg_pos_ub: the sampler's settings.

    Returns:
        tuple[Tensor, Tensor, Tensor]: sampled pos and neg masks (B, N) and the avg_factor,
        0-d float32: the sum over images of max(#pos, 1) + max(#neg, 1), as upstream's
        ``SamplingResult``.
    """
    B, N = pos.shape
    keys = torch.rand(B, N, device=pos.device)
    want_pos = int(num * pos_fraction)
    got_pos = pos.count_nonzero(dim=1).clamp(max=max(want_pos, 0))
    want_neg = num - got_pos
    if neg_pos_ub >= 0:  # int() of a non-negative double: truncation, as upstream
        want_neg = torch.minimum(want_neg, (got_pos.clamp(min=1).double() * neg_pos_ub).long())
    got_neg = torch.minimum(neg.count_nonzero(dim=1), want_neg.clamp(min=0))
    pos = _smallest_keys(keys, pos, got_pos, min(max(want_pos, 0), N))
    neg = _smallest_keys(keys, neg, got_neg, min(num, N))
    avg_factor = (got_pos.clamp(min=1) + got_neg.clamp(min=1)).sum(dtype=torch.float32)
    return pos, neg, avg_factor


def _smallest_keys(keys: Tensor, candidates: Tensor, count: Tensor, k_max: int) -> Tensor:
    """(B, N) bool: per image, the ``count`` candidates with the smallest keys (count <=
    candidates of that image, <= k_max)."""
    chosen = torch.zeros_like(candidates)
    if k_max == 0:
        return chosen
    keys = torch.where(candidates, keys, 2.0)  # keys are in [0, 1): others come last
    _, order = keys.topk(k_max, dim=1, largest=False, sorted=True)
    keep = torch.arange(k_max, device=keys.device) < count[:, None]
    return chosen.scatter_(1, order, keep)
