"""DeltaXYWHBBoxCoder with batched encode / decode of (B, N, 4) boxes."""

from typing import Optional, Sequence, Union

from mmdet.models.task_modules.coders import DeltaXYWHBBoxCoder
from mmdet.models.task_modules.coders.delta_xywh_bbox_coder import bbox2delta, delta2bbox
from mmdet.structures.bbox import get_box_tensor
from torch import Tensor

from ..registry import register_twin


@register_twin('DeltaXYWHBBoxCoder', 'TASK_UTILS')
class BatchDeltaXYWHBBoxCoder(DeltaXYWHBBoxCoder):
    """Drop-in ``DeltaXYWHBBoxCoder``; same constructor, same numbers.

    ``encode`` / ``decode`` keep the upstream interface. ``encode_batch`` and
    ``decode_batch`` take any leading batch shape (..., 4), with anchors broadcast
    against the deltas, and never warn or switch to the ONNX path for 3-d input.
    """

    def encode_batch(self, anchors: Tensor, gt_bboxes: Tensor) -> Tensor:
        """Deltas of ``gt_bboxes`` w.r.t. ``anchors``.

        Args:
            anchors (Tensor): (..., 4), broadcastable to ``gt_bboxes``.
            gt_bboxes (Tensor): (..., 4).

        Returns:
            Tensor: (..., 4) float deltas ((dx, dy, dw, dh) - means) / stds.
        """
        gt_bboxes = get_box_tensor(gt_bboxes)
        anchors = get_box_tensor(anchors).expand_as(gt_bboxes)
        return bbox2delta(anchors, gt_bboxes, self.means, self.stds)

    def decode_batch(
        self,
        anchors: Tensor,
        deltas: Tensor,
        max_shape: Optional[Union[Sequence[int], Tensor]] = None,
        wh_ratio_clip: float = 16 / 1000,
    ) -> Tensor:
        """Boxes from ``deltas`` applied to ``anchors``.

        Args:
            anchors (Tensor): (..., 4), broadcastable to ``deltas``.
            deltas (Tensor): (..., 4).
            max_shape (Sequence[int] | Tensor, optional): (H, W) to clip to, one for all.
            wh_ratio_clip (float): dw, dh are clamped to |log(wh_ratio_clip)|.

        Returns:
            Tensor: (..., 4) decoded x1y1x2y2 boxes.
        """
        anchors = get_box_tensor(anchors).expand_as(deltas)
        flat = delta2bbox(
            anchors.reshape(-1, 4),
            deltas.reshape(-1, 4),
            self.means,
            self.stds,
            max_shape,
            wh_ratio_clip,
            self.clip_border,
            self.add_ctr_clamp,
            self.ctr_clamp,
        )
        return flat.view(deltas.shape)
