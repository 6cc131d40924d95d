"""SSD head with the batched loss: only the classification step differs (hard negatives)."""

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from mmdet.models.dense_heads import SSDHead
from mmdet.models.losses import SmoothL1Loss
from torch import Tensor

from ..core.layout import levels_to_rows
from ..kernels.backends import use_triton
from ..kernels.softmax import softmax_cross_entropy_rows
from ..registry import register_twin
from .batched_loss import BatchedAnchorLossMixin, LossInputs


def hard_negative_sum(
    neg_loss: Tensor, neg: Tensor, num_neg: Tensor, rank_by: Optional[Tensor] = None
) -> Tensor:
    """Per image, the sum of the ``num_neg`` largest negative losses.

    Args:
        neg_loss (Tensor): (B, N) loss of every anchor.
        neg (Tensor): (B, N) bool, which anchors are negatives.
        num_neg (Tensor): (B,) long, how many to keep (<= negatives of that image).
        rank_by (Tensor, optional): (B, N) values that pick the negatives, when
            ``neg_loss`` is not bitwise upstream's (rounding can swap two nearly equal
            losses at the cut, and the gradient then goes to another anchor); default
            ``neg_loss``.

    Returns:
        Tensor: (B,) sums; equal to upstream's per-image ``topk(num_neg).sum()``.
    """
    keep = torch.arange(neg_loss.size(1), device=neg_loss.device)[None] < num_neg[:, None]
    if rank_by is None:
        ranked, _ = neg_loss.masked_fill(~neg, float('-inf')).sort(dim=1, descending=True)
    else:
        # stable: of equal values, the lower anchor index first, as CUDA's topk keeps them
        # (ties are common where upstream ranks half-precision values)
        order = rank_by.masked_fill(~neg, float('-inf')).argsort(
            dim=1, descending=True, stable=True
        )
        ranked = neg_loss.gather(1, order)
    return torch.where(keep, ranked, 0.0).sum(dim=1)


def upstream_cross_entropy(cls_scores: List[Tensor], labels: Tensor, channels: int) -> Tensor:
    """(B, N) ``F.cross_entropy(..., reduction='none')`` as upstream calls it: on the (N, C + 1)
    rows of the permuted maps, in the maps' own dtype, under whatever autocast is active.
    Under CUDA autocast with float16 maps upstream's values come back rounded to float16
    (the H200 run of d553a43: its SSD losses were those of float32 cross-entropies rounded
    to half), so its hard negatives are ranked on half values, with many ties. It copies
    the logits; it serves to rank the negatives bit for bit as upstream ranks them."""
    rows = levels_to_rows(cls_scores, channels)
    ce = F.cross_entropy(rows.view(-1, channels), labels.reshape(-1), reduction='none')
    return ce.view(labels.shape)


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
        rank_by = None
        if use_triton(cls_scores[0]) or cls_scores[0].is_cuda:
            # the kernels' cross-entropy is upstream's to a few ulps, not bit for bit: rank
            # the negatives by upstream's own values, so that the same anchors are kept
            with torch.no_grad():
                rank_by = (
                    upstream_cross_entropy(cls_scores, t.labels, self.cls_out_channels)
                    * t.label_weights
                )
        cls_sum = (ce * pos).sum(dim=1) + hard_negative_sum(ce, neg, num_neg, rank_by)
        return (cls_sum / t.avg_factor).view(-1, 1)

    def loss_groups(self, inputs: LossInputs) -> Tuple[Tensor, int]:
        """SSD reports the regression loss per image."""
        t = inputs.targets
        return t.pos_batch_inds, t.labels.size(0)
