"""mmdet_anchorloss: a batched, fused anchor-head loss for mmdetection 3.x.

Importing the package registers every class into mmdet's registries:
MODELS ``AnchorLossHead``, ``AnchorLossRetinaHead``, ``AnchorLossRPNHead``,
``AnchorLossSSDHead``, ``FusedFocalLoss``, ``FusedCrossEntropyLoss``; TASK_UTILS
``BatchMaxIoUAssigner``, ``BatchDeltaXYWHBBoxCoder``. In a config:
``custom_imports = dict(imports=['mmdet_anchorloss'], allow_failed_imports=False)``.
"""

from .assigners import BatchMaxIoUAssigner
from .coders import BatchDeltaXYWHBBoxCoder
from .heads import AnchorLossHead, AnchorLossRetinaHead, AnchorLossRPNHead, AnchorLossSSDHead
from .losses import FusedCrossEntropyLoss, FusedFocalLoss

__version__ = '0.1.0'

REGISTERED = {
    'MODELS': ['AnchorLossHead', 'AnchorLossRetinaHead', 'AnchorLossRPNHead',
               'AnchorLossSSDHead', 'FusedFocalLoss', 'FusedCrossEntropyLoss'],
    'TASK_UTILS': ['BatchMaxIoUAssigner', 'BatchDeltaXYWHBBoxCoder'],
}

__all__ = ['AnchorLossHead', 'AnchorLossRetinaHead', 'AnchorLossRPNHead', 'AnchorLossSSDHead',
           'BatchDeltaXYWHBBoxCoder', 'BatchMaxIoUAssigner', 'FusedCrossEntropyLoss',
           'FusedFocalLoss', 'REGISTERED']
