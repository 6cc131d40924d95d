"""The batched anchor-head loss, shared by the plugin heads.

``BatchedAnchorLossMixin`` goes before an mmdet ``AnchorHead`` subclass in the bases and
replaces the image-by-image, level-by-level loss with one batched pass: anchors once,
inside flags per image, one assignment for the batch, targets for positives only, a fused
classification loss over all levels, the regression loss on gathered positives, and one
reduction to upstream's per-level values.
"""

from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
from mmdet.utils import reduce_mean
from mmengine.logging import MessageHub
from mmengine.structures import InstanceData
from torch import Tensor

from ..core.anchors import BatchAnchors, batch_anchors
from ..core.assign import assign_batch
from ..core.layout import gather_anchor_rows, levels_to_rows
from ..core.reduce import normalise, rows_of, segment_sum
from ..core.sampling import sample_batch
from ..core.structures import PaddedBoxes, SampledTargets, pad_instances
from ..core.targets import TargetOptions, build_targets, decode_boxes
from ..core.validation import (
    check_batch_lengths,
    check_finite_predictions,
    check_predictions,
    describe_image,
    gt_problems,
    raise_gt_error,
)
from ..diagnostics.assignment_stats import log_counts, log_values
from ..profiling import stage


class LossInputs(NamedTuple):
    """What the loss needs besides the predictions.

    Attributes:
        anchors (BatchAnchors): anchors (N, 4) and per-image inside flags (B, N).
        gts (PaddedBoxes): the batch's gts, padded to (B, G).
        targets (SampledTargets): labels, weights and box targets.
        assign_stats (dict[str, float] | None): the training-log statistics of the
            assignment (``assignment_stats.log_values``), read back with the positives' count;
            None when ``log_assign_stats`` is off.
    """

    anchors: BatchAnchors
    gts: PaddedBoxes
    targets: SampledTargets
    assign_stats: Optional[Dict[str, float]] = None


class BatchedAnchorLossMixin:
    """Batched ``loss_by_feat`` for AnchorHead-style heads (see module docstring).

    Goes first in the bases of an mmdet head class (``heads.twins.batched_twin`` does
    that). Extra keyword arguments of the plugin heads (all optional, defaults keep
    upstream's numbers):
        sync_avg_factor (bool): all-reduce (mean) the avg_factor across processes so the
            loss does not depend on how the batch is split. Default False (upstream's
            per-process normalisation).
        check_finite (bool): raise a ``ValueError`` naming the level when a prediction map
            holds NaN or inf. Default False (one extra pass and host sync).
        log_assign_stats (bool): record positives per level and the share of gts with no
            positive anchor in mmengine's ``MessageHub``. Default True.

    Class attributes a twin may set:
        loss_keys (dict): names of the two loss entries (RPN: ``loss_rpn_cls`` ...).
    """

    loss_keys: Dict[str, str] = dict(loss_cls='loss_cls', loss_bbox='loss_bbox')

    def __init__(
        self,
        *args,
        sync_avg_factor: bool = False,
        check_finite: bool = False,
        log_assign_stats: bool = True,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.sync_avg_factor = sync_avg_factor
        self.check_finite = check_finite
        self.log_assign_stats = log_assign_stats
        self.anchor_grids: dict = {}  # anchors per feature-map sizes (see anchors.batch_anchors)

    def loss_by_feat(
        self,
        cls_scores: List[Tensor],
        bbox_preds: List[Tensor],
        batch_gt_instances: Sequence[InstanceData],
        batch_img_metas: Sequence[dict],
        batch_gt_instances_ignore: Optional[Sequence] = None,
    ) -> Dict[str, List[Tensor]]:
        """Upstream ``AnchorHead.loss_by_feat``'s numbers, batched.

        Args:
            cls_scores (list[Tensor]): L maps (B, A * cls_out_channels, H_l, W_l).
            bbox_preds (list[Tensor]): L maps (B, A * 4, H_l, W_l).
            batch_gt_instances (list[InstanceData]): B items, ``bboxes`` (G_i, 4) and
                ``labels`` (G_i,).
            batch_img_metas (list[dict]): B metas.
            batch_gt_instances_ignore (list[InstanceData | None], optional).

        Returns:
            dict: the two ``loss_keys``, each a list of L 0-d tensors (one per level).
        """
        inputs = self.prepare_loss(
            cls_scores, bbox_preds, batch_gt_instances, batch_img_metas, batch_gt_instances_ignore
        )
        with stage('classification_loss'):
            losses_cls = self.classification_losses(cls_scores, inputs)
        with stage('regression_loss'):
            losses_bbox = self.regression_losses(bbox_preds, inputs)
        return {
            self.loss_keys['loss_cls']: list(losses_cls.unbind()),
            self.loss_keys['loss_bbox']: list(losses_bbox.unbind()),
        }

    # --------------------------------------------------------------- targets
    def batch_targets(
        self,
        featmap_sizes: Sequence,
        batch_gt_instances: Sequence[InstanceData],
        batch_img_metas: Sequence[dict],
        batch_gt_instances_ignore: Optional[Sequence] = None,
        device=None,
    ) -> LossInputs:
        """Anchors, assignment, sampling and box targets for the whole batch.

        Args:
            featmap_sizes (Sequence[tuple]): (H_l, W_l) per level.
            batch_gt_instances (Sequence[InstanceData]): B items with ``bboxes`` (G_i, 4)
                and ``labels`` (G_i,).
            batch_img_metas (Sequence[dict]): B metas (``img_shape``, ``pad_shape``).
            batch_gt_instances_ignore (Sequence[InstanceData | None], optional): boxes to
                ignore per image.

        Returns:
            LossInputs: ``anchors`` (N anchors, (B, N) inside flags) and ``targets``.
        """
        check_batch_lengths(batch_gt_instances, batch_img_metas, batch_gt_instances_ignore)
        return self._batch_targets(
            featmap_sizes, batch_gt_instances, batch_img_metas, batch_gt_instances_ignore, device
        )

    def _batch_targets(
        self, featmap_sizes, batch_gt_instances, batch_img_metas, batch_gt_instances_ignore, device
    ) -> LossInputs:
        """``batch_targets`` once the batch lengths are known to agree."""
        with stage('pad_gts'):
            gts = pad_instances(batch_gt_instances, device)
            ignore = None
            if batch_gt_instances_ignore is not None and any(
                i is not None and len(i) > 0 for i in batch_gt_instances_ignore
            ):
                ignore = pad_instances(batch_gt_instances_ignore, device, with_labels=False)
        with stage('anchors'):
            anchors = batch_anchors(
                self.prior_generator,
                featmap_sizes,
                batch_img_metas,
                self.train_cfg['allowed_border'],
                device,
                self.anchor_grids,
            )
        with stage('check_inputs'):
            check_targets_inputs(gts, ignore, anchors, self.num_classes, batch_img_metas)
        with stage('assign'):
            assign = assign_batch(
                self.assigner, anchors, gts, ignore, batch_gt_instances, batch_gt_instances_ignore
            )
        with stage('sample'):
            pos, neg, avg_factor = sample_batch(self.sampler, assign, anchors, batch_gt_instances)
            if self.sync_avg_factor:
                avg_factor = reduce_mean(avg_factor)
        # The target step's one read-back: the number of positives (so that they are found
        # without another sync) and, with it, the counts for the training log.
        with stage('read_back'):
            if self.log_assign_stats:
                levels = len(anchors.level_sizes)
                read = log_counts(
                    assign.gt_inds, anchors.level_ids, levels, gts.mask, read_with=[pos.sum()]
                )
                num_pos, *stat_values = read.tolist()
            else:
                num_pos, stat_values = pos.sum().tolist(), []
        options = TargetOptions(
            self.num_classes,
            self.train_cfg['pos_weight'],
            self.reg_decoded_bbox,
            self.bbox_coder,
        )
        with stage('targets'):
            targets = build_targets(
                options, anchors, gts, assign, pos, neg, avg_factor, num_pos=int(num_pos)
            )
        stats = log_values(stat_values, len(batch_img_metas)) if stat_values else None
        return LossInputs(anchors, gts, targets, stats)

    # --------------------------------------------------------------- losses
    def classification_losses(self, cls_scores: List[Tensor], inputs: LossInputs) -> Tensor:
        """(L,) classification loss per level (a twin may replace this step: SSD).

        A loss that offers ``level_losses`` (the fused-loss protocol, see
        ``losses.FusedSigmoidMixin``) reads the level maps itself; any other mmdet loss, or
        a fused one whose options it cannot fuse (it returns None), is called once over all
        levels and reduced per level.
        """
        t, a = inputs.targets, inputs.anchors
        fused = getattr(self.loss_cls, 'level_losses', None)
        if fused is not None:
            out = fused(
                cls_scores,
                self.prior_generator.num_base_anchors,
                t.labels,
                t.label_weights,
                t.avg_factor,
                positives=(t.pos_batch_inds, t.pos_anchor_inds),
            )
            if out is not None:
                return out
        B, N = t.labels.shape
        flat = levels_to_rows(cls_scores, self.cls_out_channels)
        out = self.loss_cls(
            flat.reshape(B * N, -1),
            t.labels.reshape(-1),
            t.label_weights.reshape(-1),
            reduction_override='none',
        )
        rows = rows_of(out, B * N).view(B, N)
        per_level = segment_sum(rows.sum(dim=0), a.level_ids, len(a.level_sizes))
        return normalise(per_level, t.avg_factor)

    def _positive_deltas(self, bbox_preds: List[Tensor], inputs: LossInputs) -> Tensor:
        """(P, box_dim) predictions of the positives, decoded with ``reg_decoded_bbox``
        (through the coder's ``decode_batch`` when it has one)."""
        t, a = inputs.targets, inputs.anchors
        pred = gather_anchor_rows(
            bbox_preds,
            self.prior_generator.num_base_anchors,
            t.pos_batch_inds,
            t.pos_anchor_inds,
            a.tables,
        )
        if self.reg_decoded_bbox:
            pred = decode_boxes(self.bbox_coder, a.anchors[t.pos_anchor_inds], pred)
        return pred

    def loss_groups(self, inputs: LossInputs) -> Tuple[Tensor, int]:
        """Which reported value each positive's regression loss adds to: its level (L
        values, upstream AnchorHead); a twin that reports per image returns image ids."""
        a, t = inputs.anchors, inputs.targets
        return a.level_ids[t.pos_anchor_inds], len(a.level_sizes)

    def regression_losses(self, bbox_preds: List[Tensor], inputs: LossInputs) -> Tensor:
        """Regression loss per level (or per ``loss_groups``), on the positives only."""
        t = inputs.targets
        pred = self._positive_deltas(bbox_preds, inputs)
        # Every positive has weight 1: passing none keeps the values and spares the
        # ``torch.any(weight > 0)`` read-back of mmdet's regression losses.
        out = self.loss_bbox(pred, t.pos_bbox_targets, None, reduction_override='none')
        rows = rows_of(out, len(pred))
        group_ids, num_groups = self.loss_groups(inputs)
        return normalise(segment_sum(rows, group_ids, num_groups), t.avg_factor)

    def prepare_loss(
        self,
        cls_scores,
        bbox_preds,
        batch_gt_instances,
        batch_img_metas,
        batch_gt_instances_ignore=None,
    ) -> LossInputs:
        """Validate the inputs, then compute anchors and targets (and log statistics)."""
        check_batch_lengths(batch_gt_instances, batch_img_metas, batch_gt_instances_ignore)
        check_predictions(
            cls_scores,
            bbox_preds,
            self.prior_generator.num_levels,
            self.prior_generator.num_base_anchors,
            self.cls_out_channels,
            self.bbox_coder.encode_size,
            len(batch_img_metas),
        )
        if self.check_finite:
            check_finite_predictions(cls_scores, bbox_preds)
        featmap_sizes = [tuple(s.shape[-2:]) for s in cls_scores]
        inputs = self._batch_targets(
            featmap_sizes,
            batch_gt_instances,
            batch_img_metas,
            batch_gt_instances_ignore,
            device=cls_scores[0].device,
        )
        if inputs.assign_stats is not None:
            hub = MessageHub.get_current_instance()
            for key, value in inputs.assign_stats.items():
                hub.update_scalar(key, value)
        return inputs

    # --------------------------------------------------------------- mmdet 2.x names
    def loss_single(
        self,
        cls_score,
        bbox_pred,
        anchors,
        labels,
        label_weights,
        bbox_targets,
        bbox_weights,
        num_total_samples,
    ):
        """mmdet 2.x ``loss_single``: one level, ``num_total_samples`` is the avg_factor."""
        return self.loss_by_feat_single(
            cls_score,
            bbox_pred,
            anchors,
            labels,
            label_weights,
            bbox_targets,
            bbox_weights,
            avg_factor=num_total_samples,
        )

    def legacy_loss(
        self, cls_scores, bbox_preds, gt_bboxes, gt_labels, img_metas, gt_bboxes_ignore=None
    ):
        """mmdet 2.x ``loss``: plain per-image tensors instead of ``InstanceData``.

        Args:
            gt_bboxes (list[Tensor]): B tensors (G_i, 4).
            gt_labels (list[Tensor]): B tensors (G_i,).
            img_metas (list[dict]): B metas.
            gt_bboxes_ignore (list[Tensor], optional): B tensors (K_i, 4).
        """
        gts = [InstanceData(bboxes=b, labels=lab) for b, lab in zip(gt_bboxes, gt_labels)]
        ignore = None
        if gt_bboxes_ignore is not None:
            ignore = [InstanceData(bboxes=b) if b is not None else None for b in gt_bboxes_ignore]
        return self.loss_by_feat(cls_scores, bbox_preds, gts, img_metas, ignore)


def check_targets_inputs(
    gts: PaddedBoxes,
    ignore: Optional[PaddedBoxes],
    anchors: BatchAnchors,
    num_classes: int,
    metas: Sequence[dict],
) -> None:
    """Bad gt / ignore boxes, and images without an inside anchor, in one host sync.

    Raises:
        ValueError: naming the image and box (``validation.raise_gt_error``), or the image
            that has no anchor inside its boundary.
    """
    flags = [gt_problems(gts, num_classes).any(), anchors.inside.any(dim=1).all()]
    if ignore is not None:
        flags.append(gt_problems(ignore, 0).any())
    bad_gt, all_inside, *bad_ignore = torch.stack(flags).tolist()  # the one read-back
    if bad_gt:
        raise_gt_error(gts, num_classes, metas)
    if bad_ignore and bad_ignore[0]:
        raise_gt_error(ignore, 0, metas, what='ignore')
    if not all_inside:
        img = int((~anchors.inside.any(dim=1)).nonzero()[0])
        raise ValueError(
            f'{describe_image(img, metas)} has no valid anchor inside the '
            f'image boundary (img_shape={metas[img]["img_shape"]}). Check the '
            'image size and anchor sizes, or set ``allowed_border`` to -1 to skip the '
            'condition.'
        )
