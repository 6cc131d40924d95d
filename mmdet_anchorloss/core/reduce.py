"""Reduce per-anchor losses to one value per level (or per image), as upstream reports them."""

from typing import Optional, Union

import torch
from torch import Tensor

# mmdet's weight_reduce_loss adds this to avg_factor
AVG_FACTOR_EPS = torch.finfo(torch.float32).eps


def rows_of(loss: Tensor, num_rows: int) -> Tensor:
    """Sum an element-wise loss to (R,) rows; a 0-d early-exit result becomes zeros."""
    if loss.dim() == 0:  # L1 / SmoothL1 return (pred * weight).sum() when no weight is > 0
        return loss.expand(num_rows) / max(num_rows, 1)
    if num_rows == 0:  # no positive in the batch; reshape(0, -1) is ambiguous
        return loss.reshape(-1)[:0]
    if loss.dim() >= 2 and loss.size(0) == num_rows:
        return loss.flatten(1).sum(dim=1)  # no view op for the usual (R, K)
    return loss.reshape(num_rows, -1).sum(dim=1)


def segment_sum(values: Tensor, segment_ids: Tensor, num_segments: int) -> Tensor:
    """Sum of (R,) values into (num_segments,) by id; differentiable, no host sync."""
    out = values.new_zeros(num_segments)
    return out.index_add(0, segment_ids, values)


def normalise(total: Tensor, avg_factor: Optional[Union[Tensor, float]]) -> Tensor:
    """``total / (avg_factor + eps)``, mmdet's 'mean' reduction with an avg_factor."""
    if avg_factor is None:
        return total
    return total / (avg_factor + AVG_FACTOR_EPS)
