"""SSD head with the batched loss: only the classification step differs (hard negatives)."""

from typing import List, Tuple

import torch
from mmdet.models.dense_heads import SSDHead
from mmdet.models.losses import SmoothL1Loss
from torch import Tensor

from ..kernels.softmax import softmax_cross_entropy_rows
from ..registry import register_twin
from .batched_loss import BatchedAnchorLossMixin, LossInputs


def hard_negative_sum(neg_loss: Tensor, neg: Tensor, num_neg: Tensor) -> Tensor:
    """Per image, the sum of the ``num_neg`` largest negative losses.

    Args:
        neg_loss (Tensor): (B, N) loss of every anchor.
        neg (Tensor): (B, N) bool, which anchors are negatives.
        num_neg (Tensor): (B,) long, how many to keep (<= negatives of that image).

    Returns:
        Tensor: (B,) sums; equal to upstream's per-image ``topk(num_neg).sum()``.
    """
    ranked, _ = neg_loss.masked_fill(~neg, float('-inf')).sort(dim=1, descending=True)
    keep = torch.arange(neg_loss.size(1), device=neg_loss.device)[None] < num_neg[:, None]
    return torch.where(keep, ranked, 0.0).sum(dim=1)


def patch_ssd_predict(cls: type = SSDHead) -> None:
    """Let mmdet 3.3.0's ``SSDHead`` (and subclasses) predict.

    ``BaseDenseHead._predict_by_feat_single`` reads ``self.loss_cls.custom_cls_channels``,
    but ``SSDHead`` never creates ``loss_cls`` (its loss is built in), so evaluation fails
    with ``AttributeError: 'SSDHead' object has no attribute 'loss_cls'`` (mmdetection
    issues 11063, 11305, 11780; fix proposed in PR 11524). A class-level ``loss_cls = None``
    makes that check read False, as it does for every other head; the loss, which never uses
    ``loss_cls``, is unchanged. ``AnchorLossSSDHead`` carries the attribute itself; the
    tools call this for the upstream twin. Does nothing where the class already has it.
    """
    if 'loss_cls' not in vars(cls):
        cls.loss_cls = None


@register_twin('SSDHead')
class AnchorLossSSDHead(BatchedAnchorLossMixin, SSDHead):
    """Drop-in ``SSDHead`` with the batched loss.

    Same numbers as ``SSDHead.loss_by_feat``: softmax cross-entropy on every anchor, all
    positives plus the ``neg_pos_ratio`` x #pos hardest negatives per image, Smooth L1
    (``smoothl1_beta``) on positives, both divided by the batch avg_factor. As upstream,
    the result has one entry per image, not per level.
    """

    loss_cls = None  # see ``patch_ssd_predict``

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.train_cfg is not None:  # upstream calls smooth_l1_loss with this beta
            self.loss_bbox = SmoothL1Loss(beta=self.train_cfg['smoothl1_beta'], loss_weight=1.0)

    def classification_losses(self, cls_scores: List[Tensor], inputs: LossInputs) -> Tensor:
        """(B, 1) per image: positives plus the hardest negatives, over the avg_factor."""
        t = inputs.targets
        ce = (
            softmax_cross_entropy_rows(cls_scores, self.prior_generator.num_base_anchors, t.labels)
            * t.label_weights
        )
        pos = t.labels < self.num_classes
        neg = t.labels == self.num_classes
        num_neg = torch.minimum(self.train_cfg['neg_pos_ratio'] * pos.sum(dim=1), neg.sum(dim=1))
        cls_sum = (ce * pos).sum(dim=1) + hard_negative_sum(ce, neg, num_neg)
        return (cls_sum / t.avg_factor).view(-1, 1)

    def loss_groups(self, inputs: LossInputs) -> Tuple[Tensor, int]:
        """SSD reports the regression loss per image."""
        t = inputs.targets
        return t.pos_batch_inds, t.labels.size(0)
