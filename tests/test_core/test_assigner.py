"""BatchMaxIoUAssigner: hand-made cases, upstream quirks, chunking and memory."""

import subprocess
import sys
import textwrap

import pytest
import torch
from mmdet.models.task_modules.assigners import BboxOverlaps2D, MaxIoUAssigner
from mmengine.structures import InstanceData

from mmdet_anchorloss.assigners import BatchMaxIoUAssigner
from mmdet_anchorloss.core.structures import BatchAssignResult, PaddedBoxes, pad_instances
from mmdet_anchorloss.kernels import iou as iou_kernels


def boxes(*rows):
    return torch.tensor(rows, dtype=torch.float32)


def test_hand_made_assignment():
    # anchors: 0 matches gt0 exactly, 1 overlaps gt0 by 1/2, 2 overlaps nothing,
    # 3 is gt1's best anchor with IoU 0.25 (low-quality match).
    anchors = boxes([0, 0, 10, 10], [5, 0, 15, 10], [50, 50, 60, 60], [20, 20, 40, 40])
    gts = PaddedBoxes(
        boxes([0, 0, 10, 10], [20, 20, 30, 30])[None],
        torch.tensor([[2, 4]]),
        torch.tensor([[True, True]]),
    )
    res = BatchMaxIoUAssigner(pos_iou_thr=0.5, neg_iou_thr=0.4).assign_batch(
        anchors, torch.ones(1, 4, dtype=torch.bool), gts
    )
    assert isinstance(res, BatchAssignResult)
    assert res.gt_inds.shape == res.max_overlaps.shape == res.labels.shape == (1, 4)
    # anchor 1: IoU 50/150 = 1/3 < 0.4 -> negative
    assert res.gt_inds.tolist() == [[1, 0, 0, 2]]
    assert res.labels.tolist() == [[2, -1, -1, 4]]
    torch.testing.assert_close(res.max_overlaps, torch.tensor([[1.0, 1 / 3, 0.0, 0.25]]))


def test_outside_and_padding_and_empty_image():
    anchors = boxes([0, 0, 10, 10], [0, 0, 12, 12], [30, 30, 40, 40])
    gts = pad_instances(
        [
            InstanceData(bboxes=boxes([0, 0, 10, 10]), labels=torch.tensor([1])),
            InstanceData(bboxes=torch.zeros(0, 4), labels=torch.zeros(0, dtype=torch.long)),
        ],
        'cpu',
    )
    inside = torch.tensor([[False, True, True], [True, True, False]])
    res = BatchMaxIoUAssigner(pos_iou_thr=0.5, neg_iou_thr=0.4).assign_batch(anchors, inside, gts)
    # image 0: anchor 0 is outside (-1); anchor 1 is the best left (IoU 100/144) -> gt 1
    assert res.gt_inds[0].tolist() == [-1, 1, 0]
    # image 1 has no gt: every inside anchor negative with IoU 0, outside ignored
    assert res.gt_inds[1].tolist() == [0, 0, -1]
    assert res.max_overlaps[1, :2].tolist() == [0.0, 0.0]
    assert res.num_gts.tolist() == [1, 0]


def test_zero_iou_gt_claims_every_zero_iou_anchor_like_upstream():
    """mmdet issue 8289: with min_pos_iou=0 a gt whose best IoU is 0 claims all IoU-0 anchors."""
    anchors = boxes([0, 0, 10, 10], [100, 100, 110, 110], [200, 200, 210, 210])
    gt = boxes([500, 500, 510, 510])
    kw = dict(pos_iou_thr=0.5, neg_iou_thr=0.4, min_pos_iou=0.0)
    ref = MaxIoUAssigner(**kw).assign(
        InstanceData(priors=anchors), InstanceData(bboxes=gt, labels=torch.tensor([0]))
    )
    got = BatchMaxIoUAssigner(**kw).assign(
        InstanceData(priors=anchors), InstanceData(bboxes=gt, labels=torch.tensor([0]))
    )
    assert ref.gt_inds.tolist() == got.gt_inds.tolist() == [1, 1, 1]


def _random_case(G, N, B=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    a = torch.rand(N, 4, generator=gen) * 200
    a[:, 2:] = a[:, :2] + 4 + torch.rand(N, 2, generator=gen) * 60
    g = torch.rand(B, G, 4, generator=gen) * 200
    g[..., 2:] = g[..., :2] + 2 + torch.rand(B, G, 2, generator=gen) * 40
    g[:, 1] = g[:, 0]  # duplicates: ties across gts
    mask = torch.ones(B, G, dtype=torch.bool)
    mask[1, G // 2 :] = False
    inside = torch.rand(B, N, generator=gen) > 0.1
    return a, inside, PaddedBoxes(g, torch.randint(0, 3, (B, G), generator=gen), mask)


class _GenericIoU(BboxOverlaps2D):
    """Not the default calculator: the assigner takes its generic (unfused) path."""


@pytest.mark.parametrize('assign_all', [True, False])
def test_chunked_compiled_and_generic_paths_agree(assign_all, monkeypatch):
    a, inside, gts = _random_case(G=40, N=3000)
    kw = dict(pos_iou_thr=0.5, neg_iou_thr=0.4, min_pos_iou=0.1, gt_max_assign_all=assign_all)
    whole = BatchMaxIoUAssigner(**kw).assign_batch(a, inside, gts)
    chunked = BatchMaxIoUAssigner(max_chunk_elems=1000, **kw).assign_batch(a, inside, gts)
    generic = BatchMaxIoUAssigner(**kw)
    generic.iou_calculator = _GenericIoU()
    generic = generic.assign_batch(a, inside, gts)
    for kernel in (
        iou_kernels.overlap_max_kernel,
        iou_kernels.low_quality_ties_kernel,
        iou_kernels.finalize_kernel,
    ):
        monkeypatch.setattr(kernel, 'mode', '1')
    compiled = BatchMaxIoUAssigner(max_chunk_elems=1 << 14, **kw).assign_batch(a, inside, gts)
    assert iou_kernels.overlap_max_kernel._compiled is not None
    for res in (chunked, generic, compiled):
        assert torch.equal(whole.gt_inds, res.gt_inds)
        assert torch.equal(whole.max_overlaps, res.max_overlaps)
        assert torch.equal(whole.labels, res.labels)
    assert (whole.gt_inds > 0).sum() > 0


MEMORY_SCRIPT = textwrap.dedent("""
    import resource, sys, torch
    from mmdet_anchorloss.assigners import BatchMaxIoUAssigner
    from mmdet_anchorloss.kernels import iou as iou_kernels
    from mmdet_anchorloss.core.structures import PaddedBoxes
    G, N = int(sys.argv[1]), int(sys.argv[2])
    gen = torch.Generator().manual_seed(0)
    a = torch.rand(N, 4, generator=gen) * 1000
    a[:, 2:] = a[:, :2] + 8 + torch.rand(N, 2, generator=gen) * 200
    g = torch.rand(1, G, 4, generator=gen) * 1000
    g[..., 2:] = g[..., :2] + 4 + torch.rand(1, G, 2, generator=gen) * 100
    gts = PaddedBoxes(g, torch.zeros(1, G, dtype=torch.long), torch.ones(1, G, dtype=torch.bool))
    inside = torch.ones(1, N, dtype=torch.bool)
    assigner = BatchMaxIoUAssigner(pos_iou_thr=0.5, neg_iou_thr=0.4)
    small = PaddedBoxes(g[:, :7], gts.labels[:, :7], gts.mask[:, :7])
    assigner.assign_batch(a[:5000], inside[:, :5000], small)  # compile (if on) before measuring
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    res = BatchMaxIoUAssigner(pos_iou_thr=0.5, neg_iou_thr=0.4).assign_batch(a, inside, gts)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    print(peak * 1024, int((res.gt_inds > 0).sum()))
""")


def _peak_bytes(G, N):
    out = subprocess.run(
        [sys.executable, '-c', MEMORY_SCRIPT, str(G), str(N)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    return int(out[0]), int(out[1])


def test_many_gts_memory_bound_small():
    """1,000 gts x 100,000 anchors: peak below one (N, G) float matrix (400 MB)."""
    G, N = 1000, 100_000
    peak, num_pos = _peak_bytes(G, N)
    assert num_pos > 0
    assert peak < G * N * 4, f'peak {peak / 2**20:.0f} MiB >= one (N, G) matrix'


@pytest.mark.slow
@pytest.mark.parametrize('G', [2000, 5000])
def test_many_gts_memory_bound(G):
    """2,000 and 5,000 gts x 200,000 anchors on one image, no CPU fallback."""
    N = 200_000
    peak, num_pos = _peak_bytes(G, N)
    assert num_pos > 0
    assert peak < G * N * 4, f'peak {peak / 2**20:.0f} MiB >= one (N, G) matrix'
