from .fused_cross_entropy_loss import FusedCrossEntropyLoss
from .fused_focal_loss import FusedFocalLoss

__all__ = ['FusedCrossEntropyLoss', 'FusedFocalLoss']
