"""The full-size numeric kernels and how they run.

``iou`` (the assigner's fused IoU + reductions), ``sigmoid`` (focal / BCE with its analytic
gradient), ``softmax`` (cross-entropy read in place from the level maps), ``triton_kernels``
(the CUDA versions), ``compile`` (torch.compile with an eager fallback, and the mode),
``backends`` (Triton or torch for a given tensor) and ``sync_policy`` (where CUDA avoids a
host read-back).
"""
