"""FocalLoss with a fused kernel and analytic gradient; a drop-in for mmdet's ``FocalLoss``."""

from typing import Optional, Sequence, Tuple

from mmdet.models.losses import FocalLoss
from torch import Tensor

from ..core.reduce import AVG_FACTOR_EPS
from ..kernels.sigmoid import sigmoid_level_losses
from ..registry import register_twin


class FusedSigmoidMixin:
    """Shared by the fused sigmoid losses: the upstream ``forward`` and the level path.

    Subclasses define ``_sigmoid_params()`` -> (gamma, alpha_pos, alpha_neg) and
    ``_fusable()``.

    ``level_losses`` is the fused-loss protocol the plugin heads use: any classification
    loss with that method gets the fast path; it returns None when its options need the
    generic path, and the head then calls the loss the upstream way.
    """

    def level_losses(
        self,
        levels: Sequence[Tensor],
        num_base_priors: Sequence[int],
        labels: Tensor,
        weights: Tensor,
        avg_factor,
        positives: Optional[Tuple[Tensor, Tensor]] = None,
    ) -> Optional[Tensor]:
        """Per-level losses straight from the prediction maps, as upstream reports them.

        Args:
            levels (Sequence[Tensor]): L maps (B, A_l * C, H_l, W_l).
            num_base_priors (Sequence[int]): A_l per level.
            labels (Tensor): (B, N) long in [0, C]; C is background.
            weights (Tensor): (B, N) float.
            avg_factor (Tensor | float): the normaliser.
            positives (tuple[Tensor, Tensor], optional): (P,) image and anchor index of
                the anchors with a label < C, when the caller has them (spares a sync).

        Returns:
            Tensor | None: (L,) ``loss_weight * sum(level) / (avg_factor + eps)``; None
            when this loss's options are not fused (the caller uses ``forward``).
        """
        if not self._fusable():
            return None
        scale = self.loss_weight / (avg_factor + AVG_FACTOR_EPS)
        return sigmoid_level_losses(
            levels, num_base_priors, labels, weights, scale, *self._sigmoid_params(), positives
        )

    def _fused_forward(
        self, pred: Tensor, target: Tensor, weight: Optional[Tensor], avg_factor, reduction: str
    ) -> Optional[Tensor]:
        """The upstream call on (R, C) scores and (R,) labels, fused; None if not fusable."""
        if (
            not self._fusable()
            or reduction not in ('mean', 'sum')
            or pred.dim() != 2
            or target.dim() != 1
            or (weight is not None and weight.shape != target.shape)
            or pred.numel() == 0  # no row: upstream's own result (NaN for a plain 'mean')
        ):
            return None
        R, C = pred.shape
        # mmdet's binary CE ignores negative labels; labels >= C are all-zero target rows
        valid = target >= 0
        if avg_factor is not None:
            if reduction == 'sum':
                raise ValueError('avg_factor can not be used with reduction="sum"')
            scale = self.loss_weight / (avg_factor + AVG_FACTOR_EPS)
        else:
            scale = self.loss_weight / max(R * C, 1) if reduction == 'mean' else self.loss_weight
        weight = pred.new_ones(R) if weight is None else weight.float()
        total = sigmoid_level_losses(
            [pred.reshape(1, R * C, 1, 1)],
            [R],
            target.clamp(min=0, max=C).view(1, R),
            (weight * valid).view(1, R),
            scale,
            *self._sigmoid_params(),
        )
        return total[0]


@register_twin('FocalLoss')
class FusedFocalLoss(FusedSigmoidMixin, FocalLoss):
    """Sigmoid focal loss, fused. Same constructor and numbers as mmdet's ``FocalLoss``.

    On class-index targets it runs one fused pass forward and one backward (see
    ``sigmoid_kernels``), on CPU and CUDA alike; other calls (one-hot targets,
    ``activated=True``, ``reduction='none'``) go to ``FocalLoss`` unchanged.
    """

    def _sigmoid_params(self):
        return self.gamma, self.alpha, 1.0 - self.alpha

    def _fusable(self) -> bool:
        return self.use_sigmoid and not self.activated

    def forward(
        self,
        pred: Tensor,
        target: Tensor,
        weight: Optional[Tensor] = None,
        avg_factor=None,
        reduction_override: Optional[str] = None,
    ) -> Tensor:
        """See ``FocalLoss.forward``."""
        assert reduction_override in (None, 'none', 'mean', 'sum')
        reduction = reduction_override if reduction_override else self.reduction
        out = self._fused_forward(pred, target, weight, avg_factor, reduction)
        if out is None:
            return super().forward(pred, target, weight, avg_factor, reduction_override)
        return out


__all__ = ['FusedFocalLoss', 'FusedSigmoidMixin']
