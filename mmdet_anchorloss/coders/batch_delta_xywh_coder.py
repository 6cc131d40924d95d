"""DeltaXYWHBBoxCoder with batched encode / decode of (B, N, 4) boxes."""

from typing import Optional, Sequence, Union

import torch
from mmdet.models.task_modules.coders import DeltaXYWHBBoxCoder
from mmdet.models.task_modules.coders.delta_xywh_bbox_coder import delta2bbox
from mmdet.structures.bbox import get_box_tensor
from torch import Tensor

from ..kernels.sync_policy import device_constant
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
        gt = get_box_tensor(gt_bboxes).float()
        proposals = get_box_tensor(anchors).expand_as(gt).float()
        # ``bbox2delta``'s arithmetic, op for op, with the means and stds kept on the device
        # (``bbox2delta`` copies them from the host each call, a host sync on CUDA)
        px1, py1, px2, py2 = proposals.unbind(-1)  # one op for the four columns
        gx1, gy1, gx2, gy2 = gt.unbind(-1)
        px = (px1 + px2) * 0.5
        py = (py1 + py2) * 0.5
        pw = px2 - px1
        ph = py2 - py1
        gx = (gx1 + gx2) * 0.5
        gy = (gy1 + gy2) * 0.5
        gw = gx2 - gx1
        gh = gy2 - gy1
        dx = (gx - px) / pw
        dy = (gy - py) / ph
        dw = torch.log(gw / pw)
        dh = torch.log(gh / ph)
        deltas = torch.stack([dx, dy, dw, dh], dim=-1)
        means = device_constant(tuple(float(m) for m in self.means), deltas.device)
        stds = device_constant(tuple(float(s) for s in self.stds), deltas.device)
        return deltas.sub_(means).div_(stds)

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
