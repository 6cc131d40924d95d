"""Anchor-assignment diagnostics: statistics (pure tensor functions) and pictures.

Plotting lives in :mod:`.plots` (imports matplotlib) and the config glue in
:mod:`.head_assign` (imports mmdet lazily); neither is imported here, so that in-training
statistics only pull in torch.
"""

from .assignment_stats import (
    IGNORED,
    NEGATIVE,
    SIZE_BUCKETS,
    BatchAssignStats,
    ImageAssignStats,
    batch_assign_stats,
    per_image_stats,
    size_buckets,
    summarize,
)

__all__ = [
    'IGNORED',
    'NEGATIVE',
    'SIZE_BUCKETS',
    'BatchAssignStats',
    'ImageAssignStats',
    'batch_assign_stats',
    'per_image_stats',
    'size_buckets',
    'summarize',
]
