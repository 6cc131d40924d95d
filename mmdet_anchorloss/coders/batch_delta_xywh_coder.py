"""DeltaXYWHBBoxCoder with batched encode / decode of (B, N, 4) boxes."""

from typing import Optional, Sequence, Union

import numpy as np
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
        proposals = get_box_tensor(anchors).float()
        if proposals.shape != gt.shape:
            proposals = proposals.expand_as(gt)
        # ``bbox2delta``'s arithmetic, element for element, on (x, y) pairs: anchors and gts
        # stacked so that each step is one op for both and both axes. The means and stds
        # stay on the device (``bbox2delta`` copies them from the host each call, a host
        # sync on CUDA).
        corners = torch.stack([proposals, gt]).unflatten(-1, (2, 2))  # (2, ..., 2 corners, xy)
        top_left, bottom_right = corners.unbind(-2)
        centre = (top_left + bottom_right) * 0.5  # px, py | gx, gy
        size = bottom_right - top_left  # pw, ph | gw, gh
        (p_centre, g_centre), (p_size, g_size) = centre.unbind(), size.unbind()
        deltas = torch.cat([(g_centre - p_centre) / p_size, torch.log(g_size / p_size)], dim=-1)
        means, stds = tuple(float(m) for m in self.means), tuple(float(s) for s in self.stds)
        if means == (0.0,) * 4 and stds == (1.0,) * 4:  # RetinaNet's, the RPN's: x - 0, x / 1
            return deltas  # are x bit for bit (-0.0 too), two ops fewer
        return deltas.sub_(device_constant(means, deltas.device)).div_(
            device_constant(stds, deltas.device)
        )

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
        if max_shape is not None:  # clipped: upstream's function as it is (not in the loss)
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
        return self._decode_flat(anchors.reshape(-1, 4), deltas.reshape(-1, 4), wh_ratio_clip).view(
            deltas.shape
        )

    def _decode_flat(self, rois: Tensor, deltas: Tensor, wh_ratio_clip: float) -> Tensor:
        """``delta2bbox`` without ``max_shape``, op for op, on (M, 4) rows, with the means
        and stds kept on the device (``delta2bbox`` copies them from the host each call, a
        host sync on CUDA)."""
        if deltas.size(0) == 0:
            return deltas
        means = device_constant(tuple(float(m) for m in self.means), deltas.device, deltas.dtype)
        stds = device_constant(tuple(float(s) for s in self.stds), deltas.device, deltas.dtype)
        denorm = deltas * stds + means
        dxy, dwh = denorm[:, :2], denorm[:, 2:]
        pxy = (rois[:, :2] + rois[:, 2:]) * 0.5
        pwh = rois[:, 2:] - rois[:, :2]
        dxy_wh = pwh * dxy
        max_ratio = float(np.abs(np.log(wh_ratio_clip)))
        if self.add_ctr_clamp:
            dxy_wh = torch.clamp(dxy_wh, max=self.ctr_clamp, min=-self.ctr_clamp)
            dwh = torch.clamp(dwh, max=max_ratio)
        else:
            dwh = dwh.clamp(min=-max_ratio, max=max_ratio)
        gxy = pxy + dxy_wh
        gwh = pwh * dwh.exp()
        return torch.cat([gxy - (gwh * 0.5), gxy + (gwh * 0.5)], dim=-1)
