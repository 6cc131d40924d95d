"""Dataset-side input checks."""

from .checked_coco import CheckedCocoDataset, DroppedAnnotation

__all__ = ['CheckedCocoDataset', 'DroppedAnnotation']
