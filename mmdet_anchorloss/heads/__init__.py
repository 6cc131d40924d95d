from .anchor_loss_heads import AnchorLossHead, AnchorLossRetinaHead, AnchorLossRPNHead
from .anchor_loss_ssd_head import AnchorLossSSDHead
from .batched_loss import BatchedAnchorLossMixin

__all__ = [
    'AnchorLossHead',
    'AnchorLossRetinaHead',
    'AnchorLossRPNHead',
    'AnchorLossSSDHead',
    'BatchedAnchorLossMixin',
]
