"""Registered plugin heads: upstream heads with the batched loss.

Each is a subclass of its upstream twin, so the constructor, ``state_dict`` keys, forward
and predict path are upstream's; only the loss is replaced.
"""

from mmdet.models.dense_heads import AnchorHead, RetinaHead, RPNHead
from mmdet.registry import MODELS

from .batched_loss import BatchedAnchorLossMixin


class _PluginHeadInit:
    """Pops the plugin options before the upstream constructor sees the arguments."""

    def __init__(
        self,
        *args,
        sync_avg_factor: bool = False,
        check_finite: bool = False,
        log_assign_stats: bool = True,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._init_batched_options(sync_avg_factor, check_finite, log_assign_stats)


@MODELS.register_module()
class AnchorLossHead(_PluginHeadInit, BatchedAnchorLossMixin, AnchorHead):
    """Drop-in ``AnchorHead`` with the batched loss."""

    def loss_by_feat(
        self,
        cls_scores,
        bbox_preds,
        batch_gt_instances,
        batch_img_metas,
        batch_gt_instances_ignore=None,
    ) -> dict:
        """See ``BatchedAnchorLossMixin.batched_loss_by_feat``."""
        return self.batched_loss_by_feat(
            cls_scores, bbox_preds, batch_gt_instances, batch_img_metas, batch_gt_instances_ignore
        )


@MODELS.register_module()
class AnchorLossRetinaHead(_PluginHeadInit, BatchedAnchorLossMixin, RetinaHead):
    """Drop-in ``RetinaHead`` with the batched loss."""

    loss_by_feat = AnchorLossHead.loss_by_feat


@MODELS.register_module()
class AnchorLossRPNHead(_PluginHeadInit, BatchedAnchorLossMixin, RPNHead):
    """Drop-in ``RPNHead`` with the batched loss; keys ``loss_rpn_cls`` / ``loss_rpn_bbox``."""

    def loss_by_feat(
        self,
        cls_scores,
        bbox_preds,
        batch_gt_instances,
        batch_img_metas,
        batch_gt_instances_ignore=None,
    ) -> dict:
        """See ``RPNHead.loss_by_feat``."""
        losses = self.batched_loss_by_feat(
            cls_scores, bbox_preds, batch_gt_instances, batch_img_metas, batch_gt_instances_ignore
        )
        return dict(loss_rpn_cls=losses['loss_cls'], loss_rpn_bbox=losses['loss_bbox'])
