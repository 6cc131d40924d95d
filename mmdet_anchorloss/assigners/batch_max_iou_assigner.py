"""MaxIoUAssigner for the whole batch: one IoU tensor, no loop over images or gts."""

from typing import Callable, NamedTuple, Optional, Tuple

import torch
from mmdet.models.task_modules.assigners import AssignResult, BboxOverlaps2D, MaxIoUAssigner
from mmdet.structures.bbox import get_box_tensor
from mmengine.structures import InstanceData
from torch import Tensor

from ..core.structures import BatchAssignResult, PaddedBoxes, pad_instances
from ..kernels.backends import triton_module, use_triton
from ..kernels.iou import (
    chunk_ties,
    finalize_assignment,
    low_quality_ties,
    low_quality_ties_kernel,
    overlap_max,
)
from ..kernels.sync_policy import avoid_host_sync, device_constant
from ..registry import register_twin


class Overlaps(NamedTuple):
    """IoU maxima of a batch, and how to find the anchors tied with each gt's best.

    Attributes:
        max_ov, argmax_ov (Tensor): (B, N) best IoU of each anchor and its gt.
        gt_max, gt_argmax (Tensor): (B, G) best IoU of each gt and its first anchor
            (gt_argmax None where the assigner does not read it: the Triton path with
            ``gt_max_assign_all``).
        ties (Callable[[], Tensor]): () -> (B, N) long, 1 + the highest eligible gt (real,
            best IoU >= ``min_pos_iou``) whose best IoU the anchor ties, else 0.
        triton (bool): found by the Triton kernels (the finalize step is one too).
    """

    max_ov: Tensor
    argmax_ov: Tensor
    gt_max: Tensor
    gt_argmax: Optional[Tensor]
    ties: Callable[[], Tensor]
    triton: bool = False


@register_twin('MaxIoUAssigner', 'TASK_UTILS')
class BatchMaxIoUAssigner(MaxIoUAssigner):
    """Drop-in ``MaxIoUAssigner`` that also assigns a padded batch at once.

    Same constructor and numbers as ``MaxIoUAssigner``. ``assign`` keeps the single-image
    interface (so upstream heads can use it); ``assign_batch`` takes anchors shared by the
    batch, per-image inside flags and gts padded to (B, G, 4).

    The IoU is fused with its reductions (``iou_kernels``) and computed in anchor chunks
    of at most ``max_chunk_elems`` entries (B * G * n), so no (B, G, N) matrix is stored;
    the low-quality step recomputes it chunk by chunk. ``gpu_assign_thr`` is accepted for
    config compatibility; chunking replaces the CPU fallback.
    """

    def __init__(self, *args, max_chunk_elems: int = 1 << 20, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.max_chunk_elems = int(max_chunk_elems)

    # ----------------------------------------------------------------- single image
    def assign(
        self,
        pred_instances: InstanceData,
        gt_instances: InstanceData,
        gt_instances_ignore: Optional[InstanceData] = None,
        **kwargs,
    ) -> AssignResult:
        """Upstream interface: assign the ``priors`` of one image (see ``MaxIoUAssigner``)."""
        if self.perm_repeat_gt_cfg is not None:
            return super().assign(pred_instances, gt_instances, gt_instances_ignore, **kwargs)
        priors = get_box_tensor(pred_instances.priors)
        device = priors.device
        gts = pad_instances([gt_instances], device)
        ignore = None
        if gt_instances_ignore is not None:
            ignore = pad_instances([gt_instances_ignore], device, with_labels=False)
        inside = torch.ones(1, len(priors), dtype=torch.bool, device=device)
        res = self.assign_batch(priors[:, :4], inside, gts, ignore)
        num_gts = len(gt_instances)
        max_overlaps = res.max_overlaps[0]
        if num_gts == 0 or len(priors) == 0:
            max_overlaps = torch.zeros_like(max_overlaps)
        return AssignResult(
            num_gts=num_gts, gt_inds=res.gt_inds[0], max_overlaps=max_overlaps, labels=res.labels[0]
        )

    # ----------------------------------------------------------------- batch
    def assign_batch(
        self,
        anchors: Tensor,
        inside: Tensor,
        gts: PaddedBoxes,
        ignore: Optional[PaddedBoxes] = None,
    ) -> BatchAssignResult:
        """Assign gts to the anchors of every image of the batch.

        Args:
            anchors (Tensor): (N, 4) anchors shared by the batch.
            inside (Tensor): (B, N) bool; anchors upstream would hand to the assigner.
                The others come back ignored (-1).
            gts (PaddedBoxes): bboxes (B, G, 4), labels (B, G), mask (B, G).
            ignore (PaddedBoxes, optional): boxes to ignore, (B, K, 4) with mask.

        Returns:
            BatchAssignResult: gt_inds, max_overlaps, labels (B, N); num_gts (B,).
        """
        B, N = inside.shape
        device = anchors.device
        if N == 0:  # no prior: upstream returns an empty result (and skips ignore boxes)
            none = torch.zeros(B, 0, dtype=torch.long, device=device)
            return BatchAssignResult(none, anchors.new_zeros(B, 0), none, gts.mask.sum(dim=1))
        if gts.bboxes.size(1) == 0:  # the kernels reduce over gts: keep one padding column
            gts = PaddedBoxes(
                gts.bboxes.new_zeros(B, 1, 4),
                torch.full((B, 1), -1, dtype=torch.long, device=device),
                torch.zeros(B, 1, dtype=torch.bool, device=device),
            )
        G = gts.bboxes.size(1)
        gt_mask = gts.mask
        ignored = self._ignored_anchors(anchors, ignore, B) if ignore is not None else None
        lo, hi = (
            self.neg_iou_thr if isinstance(self.neg_iou_thr, tuple) else (0.0, self.neg_iou_thr)
        )
        thresholds = (float(lo), float(hi), float(self.pos_iou_thr), float(self.min_pos_iou))
        ov = self._overlaps(anchors, inside, gts, ignored, thresholds)
        low = None
        if self.match_low_quality:
            if self.gt_max_assign_all:
                low = ov.ties()
            else:  # each gt claims its first best anchor; later gts overwrite earlier ones
                eligible = (ov.gt_max >= self.min_pos_iou) & gt_mask  # (B, G)
                low = torch.zeros(B, N, dtype=torch.long, device=device)
                gt_ids = torch.arange(1, G + 1, device=device).expand(B, G)
                low.scatter_reduce_(1, ov.gt_argmax, torch.where(eligible, gt_ids, 0), 'amax')
        has_gt = gt_mask.any(dim=1, keepdim=True)
        if ov.triton:  # one launch
            gt_inds, max_ov, labels = triton_module().assign_finalize(
                ov.max_ov,
                ov.argmax_ov,
                low,
                inside,
                has_gt,
                gts.labels,
                device_constant(thresholds, device, torch.float32),
            )
            return BatchAssignResult(gt_inds, max_ov, labels, gt_mask.sum(dim=1))
        if low is None:
            low = torch.zeros(B, N, dtype=torch.long, device=device)
        gt_inds, max_ov, labels = finalize_assignment(
            ov.max_ov, ov.argmax_ov, low, inside, has_gt, gts.labels, *thresholds[:3]
        )
        return BatchAssignResult(gt_inds, max_ov, labels, gt_mask.sum(dim=1))

    def _overlaps(
        self,
        anchors: Tensor,
        inside: Tensor,
        gts: PaddedBoxes,
        ignored: Optional[Tensor],
        thresholds: Tuple[float, float, float, float],
    ) -> 'Overlaps':
        """IoU maxima both ways, and the low-quality tie pass, for the whole batch.

        ``thresholds``: lo, hi, pos_iou_thr and min_pos_iou (the ties read the last).

        On CUDA with Triton and the default IoU calculator: one kernel launch for the maxima
        and one for the ties, whatever B, G and N (``triton_kernels.assign_overlaps``).
        Elsewhere: the fused (compiled) or configured calculator in anchor chunks.
        """
        fused_max, ties = self._kernels()
        if fused_max is overlap_max and use_triton(anchors):
            kernels = triton_module()
            max_ov, argmax_ov, gt_max, gt_argmax = kernels.assign_overlaps(
                gts.bboxes,
                gts.mask,
                anchors,
                inside,
                ignored,
                want_gt_argmax=self.match_low_quality and not self.gt_max_assign_all,
            )
            return Overlaps(
                max_ov,
                argmax_ov,
                gt_max,
                gt_argmax,
                lambda: kernels.assign_ties(
                    gts.bboxes,
                    gts.mask,
                    anchors,
                    inside,
                    ignored,
                    gt_max,
                    device_constant(thresholds, anchors.device, torch.float32),
                ),
                triton=True,
            )
        B, N = inside.shape
        G = gts.bboxes.size(1)
        device = anchors.device
        # Anchor chunks bound the eager temporaries (the compiled kernels store none).
        # Outside anchors are -inf: they never win a max and never tie with a gt's best IoU
        # (every image has at least one inside anchor).
        chunks = list(range(0, N, max(1, self.max_chunk_elems // max(1, B * G))))
        bounds = [(s, chunks[i + 1] if i + 1 < len(chunks) else N) for i, s in enumerate(chunks)]
        max_ov = anchors.new_empty(B, N)
        argmax_ov = torch.empty(B, N, dtype=torch.long, device=device)
        gt_max = anchors.new_full((B, G), float('-inf'))
        gt_argmax = torch.zeros(B, G, dtype=torch.long, device=device)
        chunk_max = []  # (B, G) best IoU of each gt within each chunk
        for s, e in bounds:
            m, am, c_max, c_arg = fused_max(
                gts.bboxes,
                gts.mask,
                anchors[s:e],
                inside[:, s:e],
                None if ignored is None else ignored[:, s:e],
            )
            max_ov[:, s:e], argmax_ov[:, s:e] = m, am
            chunk_max.append(c_max)
            better = c_max > gt_max  # strict: the first anchor of a tie wins, as in max()
            gt_argmax = torch.where(better, c_arg + s, gt_argmax)
            gt_max = torch.where(better, c_max, gt_max)
        return Overlaps(
            max_ov,
            argmax_ov,
            gt_max,
            gt_argmax,
            lambda: self._tied_anchors(
                anchors,
                gts,
                ignored,
                gt_max,
                (gt_max >= thresholds[3]) & gts.mask,
                ties,
                inside,
                bounds,
                chunk_max,
            ),
        )

    def _tied_anchors(
        self, anchors, gts, ignored, gt_max, eligible, ties, inside, bounds, chunk_max
    ) -> Tensor:
        """(B, N) long: 1 + the highest gt index whose best IoU the anchor ties, else 0.

        Upstream compares every anchor with every gt's best IoU. An anchor can only tie gt g
        inside a chunk where g's best IoU within the chunk equals its overall best, so the
        IoU is recomputed (bitwise the same values) only for those (chunk, image, gt)
        triples: usually one or two chunks per gt instead of all of them. With a calculator
        other than the default, every chunk is recomputed.
        """
        B, N = inside.shape
        need = (torch.stack(chunk_max) == gt_max) & eligible  # (C, B, G)
        every_chunk = ties is not low_quality_ties or len(bounds) == 1 or avoid_host_sync(need)
        if not every_chunk:
            c, b, g = need.nonzero(as_tuple=True)  # one host sync
            # Gathering the pairs runs eagerly (about ten passes over each pair's anchors);
            # the full pass is one fused pass per chunk when compiled.
            ratio = 8 if low_quality_ties_kernel.wants_compiled(need.device) else 2
            every_chunk = ratio * len(c) > need.numel()
        if every_chunk:
            # other calculator, one chunk, no host sync wanted (CUDA), or enough (chunk, gt)
            # pairs needed that the full pass over every chunk is cheaper than the pairs
            return torch.cat(
                [
                    ties(
                        gts.bboxes,
                        gts.mask,
                        anchors[s:e],
                        inside[:, s:e],
                        None if ignored is None else ignored[:, s:e],
                        gt_max,
                        eligible,
                    )
                    for s, e in bounds
                ],
                dim=1,
            )
        starts = device_constant(tuple(s for s, _ in bounds), anchors.device)
        length = bounds[0][1] - bounds[0][0]
        low = torch.zeros(B * N, dtype=torch.long, device=anchors.device)
        step = max(1, self.max_chunk_elems // max(1, length))
        for i in range(0, len(c), step):  # bounds memory when many gts tie everywhere
            ci, bi, gi = c[i : i + step], b[i : i + step], g[i : i + step]
            idx = starts[ci, None] + torch.arange(length, device=anchors.device)  # (M, L)
            valid = idx < N
            idx = idx.clamp(max=N - 1)
            gt_ids = chunk_ties(gts.bboxes, gt_max, anchors, inside, ignored, bi, gi, idx, valid)
            low.scatter_reduce_(0, (bi[:, None] * N + idx).view(-1), gt_ids.view(-1), 'amax')
        return low.view(B, N)

    def _kernels(self):
        """Fused IoU kernels for the default ``BboxOverlaps2D``; else the configured one."""
        calc = self.iou_calculator
        if type(calc) is BboxOverlaps2D and calc.scale == 1.0 and calc.dtype is None:
            return overlap_max, low_quality_ties

        def masked(gts, gt_mask, anchors, inside, ignored):
            B = inside.size(0)
            ov = calc(gts, anchors.expand(B, *anchors.shape))
            if ignored is not None:
                ov = ov.masked_fill(ignored[:, None, :], -1.0)
            return ov.masked_fill(~(gt_mask[:, :, None] & inside[:, None, :]), float('-inf'))

        def reduce_max(*args):
            ov = masked(*args)
            return (*ov.max(dim=1), *ov.max(dim=2))

        def ties(gts, gt_mask, anchors, inside, ignored, gt_max, eligible):
            ov = masked(gts, gt_mask, anchors, inside, ignored)
            tie = (ov == gt_max[:, :, None]) & eligible[:, :, None]
            gt_ids = torch.arange(1, gts.size(1) + 1, device=gts.device).view(1, -1, 1)
            return torch.where(tie, gt_ids, 0).amax(dim=1)

        return reduce_max, ties

    def _ignored_anchors(self, anchors: Tensor, ignore: PaddedBoxes, B: int) -> Optional[Tensor]:
        """(B, N) bool: anchors whose IoF with an ignore box exceeds ``ignore_iof_thr``."""
        if not self.ignore_iof_thr > 0 or not bool(ignore.mask.any()):
            return None
        # Padding boxes are all zeros: their IoF with any anchor is 0, never above a
        # positive threshold, so they need no mask.
        N = anchors.size(0)
        chunk = max(1, self.max_chunk_elems // max(1, B * ignore.bboxes.size(1)))
        out = []
        for start in range(0, N, chunk):
            a = anchors[start : start + chunk].expand(B, -1, -1)
            if self.ignore_wrt_candidates:
                iof = self.iou_calculator(a, ignore.bboxes, mode='iof').amax(dim=2)
            else:
                iof = self.iou_calculator(ignore.bboxes, a, mode='iof').amax(dim=1)
            out.append(iof > self.ignore_iof_thr)
        return torch.cat(out, dim=1)
