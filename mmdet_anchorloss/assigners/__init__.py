from .batch_max_iou_assigner import BatchMaxIoUAssigner

__all__ = ['BatchMaxIoUAssigner']
