"""CrossEntropyLoss, sigmoid path fused; a drop-in for mmdet's ``CrossEntropyLoss``."""

from typing import Optional, Sequence, Tuple

import torch
from mmdet.models.losses import CrossEntropyLoss
from torch import Tensor

from ..core.reduce import normalise
from ..kernels.softmax import softmax_cross_entropy_rows
from ..registry import register_twin
from .fused_focal_loss import FusedSigmoidMixin


@register_twin('CrossEntropyLoss')
class FusedCrossEntropyLoss(FusedSigmoidMixin, CrossEntropyLoss):
    """Same constructor and numbers as mmdet's ``CrossEntropyLoss``.

    ``use_sigmoid=True`` (RPN, sigmoid heads) with class-index targets, no ``class_weight``
    and no ``ignore_index`` runs the fused sigmoid kernel (binary cross-entropy is the
    focal form with gamma 0 and both alphas 1). Softmax (``use_sigmoid=False``) is
    a log-sum-exp over the class axis of each level map, read in place (no permute /
    concatenate copy of the logits; see ``softmax_levels``).
    """

    def _sigmoid_params(self):
        return 0.0, 1.0, 1.0

    def _fusable(self) -> bool:
        return self.use_sigmoid and self.class_weight is None and self.ignore_index is None

    def level_losses(
        self,
        levels: Sequence[Tensor],
        num_base_priors: Sequence[int],
        labels: Tensor,
        weights: Tensor,
        avg_factor,
        positives: Optional[Tuple[Tensor, Tensor]] = None,
    ) -> Optional[Tensor]:
        """Per-level losses from the prediction maps: the fused sigmoid kernel, or the
        softmax read in place; None when the options need the generic path.

        See ``FusedSigmoidMixin.level_losses`` for the arguments; for softmax the maps are
        (B, A_l * (C + 1), H_l, W_l).
        """
        if self._fusable():
            return super().level_losses(
                levels, num_base_priors, labels, weights, avg_factor, positives
            )
        if not self._fusable_softmax():
            return None
        rows = (
            self.loss_weight * weights * softmax_cross_entropy_rows(levels, num_base_priors, labels)
        )
        sizes = [a * x.size(2) * x.size(3) for x, a in zip(levels, num_base_priors)]
        return normalise(torch.stack([r.sum() for r in rows.split(sizes, dim=1)]), avg_factor)

    def _fusable_softmax(self) -> bool:
        """Softmax read straight from the level maps (no class_weight / ignore_index)."""
        return (
            not self.use_sigmoid
            and not self.use_mask
            and self.class_weight is None
            and self.ignore_index is None
        )

    def forward(
        self,
        cls_score: Tensor,
        label: Tensor,
        weight: Optional[Tensor] = None,
        avg_factor=None,
        reduction_override: Optional[str] = None,
        ignore_index: Optional[int] = None,
        **kwargs,
    ) -> Tensor:
        """See ``CrossEntropyLoss.forward``."""
        assert reduction_override in (None, 'none', 'mean', 'sum')
        reduction = reduction_override if reduction_override else self.reduction
        out = None
        if ignore_index is None and not kwargs:
            fused_avg = avg_factor
            if (
                avg_factor is None
                and self.avg_non_ignore
                and reduction == 'mean'
                and self._fusable()
            ):
                # upstream's binary_cross_entropy averages over the non-ignored entries:
                # (#rows with a label >= 0) * C of them (one host sync, as upstream's .item())
                fused_avg = float((label >= 0).sum()) * cls_score.size(-1)
            out = self._fused_forward(cls_score, label, weight, fused_avg, reduction)
        if out is None:
            return super().forward(
                cls_score, label, weight, avg_factor, reduction_override, ignore_index, **kwargs
            )
        return out
