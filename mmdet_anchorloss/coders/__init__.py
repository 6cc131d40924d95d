from .batch_delta_xywh_coder import BatchDeltaXYWHBBoxCoder

__all__ = ['BatchDeltaXYWHBBoxCoder']
