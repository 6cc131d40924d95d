"""mmdet_anchorloss: a batched, fused anchor-head loss for mmdetection 3.x.

Importing the package registers every class into mmdet's registries:
MODELS ``AnchorLossHead``, ``AnchorLossRetinaHead``, ``AnchorLossRPNHead``,
``AnchorLossSSDHead``, ``FusedFocalLoss``, ``FusedCrossEntropyLoss``; TASK_UTILS
``BatchMaxIoUAssigner``, ``BatchDeltaXYWHBBoxCoder``. In a config:
``custom_imports = dict(imports=['mmdet_anchorloss'], allow_failed_imports=False)``.
"""

from . import datasets  # noqa: F401  (CheckedCocoDataset)
from .assigners import BatchMaxIoUAssigner
from .coders import BatchDeltaXYWHBBoxCoder
from .engine.checkpoint import register_safe_checkpoint_globals
from .heads import AnchorLossHead, AnchorLossRetinaHead, AnchorLossRPNHead, AnchorLossSSDHead
from .losses import FusedCrossEntropyLoss, FusedFocalLoss

__version__ = '0.1.0'

register_safe_checkpoint_globals()  # torch>=2.6 weights_only resume, see engine/checkpoint.py

# The switch a user makes in a config: upstream type -> plugin twin (same arguments).
PLUGIN_TWINS = {
    'AnchorHead': 'AnchorLossHead',
    'RetinaHead': 'AnchorLossRetinaHead',
    'RPNHead': 'AnchorLossRPNHead',
    'SSDHead': 'AnchorLossSSDHead',
    'FocalLoss': 'FusedFocalLoss',
    'CrossEntropyLoss': 'FusedCrossEntropyLoss',
    'MaxIoUAssigner': 'BatchMaxIoUAssigner',
    'DeltaXYWHBBoxCoder': 'BatchDeltaXYWHBBoxCoder',
}

REGISTERED = {
    'MODELS': [
        'AnchorLossHead',
        'AnchorLossRetinaHead',
        'AnchorLossRPNHead',
        'AnchorLossSSDHead',
        'FusedFocalLoss',
        'FusedCrossEntropyLoss',
    ],
    'TASK_UTILS': ['BatchMaxIoUAssigner', 'BatchDeltaXYWHBBoxCoder'],
}

__all__ = [
    'AnchorLossHead',
    'AnchorLossRetinaHead',
    'AnchorLossRPNHead',
    'AnchorLossSSDHead',
    'BatchDeltaXYWHBBoxCoder',
    'BatchMaxIoUAssigner',
    'FusedCrossEntropyLoss',
    'FusedFocalLoss',
    'REGISTERED',
]
