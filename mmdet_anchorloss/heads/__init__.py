"""The registered plugin heads: upstream heads whose loss is the batched one."""

from .anchor_loss_ssd_head import AnchorLossSSDHead, patch_ssd_predict
from .batched_loss import BatchedAnchorLossMixin
from .twins import (
    AnchorLossHead,
    AnchorLossRetinaHead,
    AnchorLossRetinaSepBNHead,
    AnchorLossRPNHead,
    batched_twin,
)

__all__ = [
    'AnchorLossHead',
    'AnchorLossRetinaHead',
    'AnchorLossRetinaSepBNHead',
    'AnchorLossRPNHead',
    'AnchorLossSSDHead',
    'BatchedAnchorLossMixin',
    'batched_twin',
    'patch_ssd_predict',
]
