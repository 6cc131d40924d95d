"""The numeric core of the batched anchor-head loss: tensors in, NamedTuples out.

It knows nothing of registries or heads: anchors and inside flags (``anchors``), the
level-map / anchor-row mapping (``layout``), padded batches and results (``structures``),
the assignment adapter (``assign``), sampling (``sampling``), targets (``targets``),
reductions (``reduce``) and input checks (``validation``). The registered heads, losses,
assigner and coder are a thin layer on top (``mmdet_anchorloss.heads`` ...); the kernels
they run are in ``mmdet_anchorloss.kernels``.
"""
