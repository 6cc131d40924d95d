"""Batched twins of mmdet's anchor heads, made by one factory.

``batched_twin(RetinaHead)`` is a subclass of ``RetinaHead`` with the batched loss
(``BatchedAnchorLossMixin``), registered in ``MODELS`` as ``AnchorLossRetinaHead``. The
constructor, ``state_dict`` keys, forward and predict path stay upstream's. Any head that
keeps ``AnchorHead.loss_by_feat`` can be made a twin this way.
"""

from typing import Optional

from mmdet.models.dense_heads import AnchorHead, RetinaHead, RetinaSepBNHead, RPNHead

from ..registry import register_twin
from .batched_loss import BatchedAnchorLossMixin


def batched_twin(upstream: type, name: Optional[str] = None, **attributes) -> type:
    """Make and register the batched twin of an ``AnchorHead`` subclass.

    Args:
        upstream (type): the mmdet head class (its ``loss_by_feat`` must be AnchorHead's).
        name (str, optional): the registered name; default ``'AnchorLoss' + upstream name``.
        **attributes: class attributes, e.g. ``loss_keys`` to rename the loss keys (a head
            whose own ``loss_by_feat`` only renames AnchorHead's keys, as RPNHead's does).

    Returns:
        type: the registered class.
    """
    if upstream.loss_by_feat is not AnchorHead.loss_by_feat and 'loss_keys' not in attributes:
        raise TypeError(
            f'{upstream.__name__} has its own loss_by_feat; a batched twin would not give '
            'its numbers. Subclass BatchedAnchorLossMixin and replace the step that differs.'
        )
    name = name or f'AnchorLoss{upstream.__name__}'
    doc = f'Drop-in ``{upstream.__name__}`` with the batched loss (same config arguments).'
    cls = type(name, (BatchedAnchorLossMixin, upstream), dict(__doc__=doc, **attributes))
    cls.__module__ = __name__
    return register_twin(upstream.__name__)(cls)


AnchorLossHead = batched_twin(AnchorHead, 'AnchorLossHead')
AnchorLossRetinaHead = batched_twin(RetinaHead)
AnchorLossRetinaSepBNHead = batched_twin(RetinaSepBNHead)
AnchorLossRPNHead = batched_twin(
    RPNHead, loss_keys=dict(loss_cls='loss_rpn_cls', loss_bbox='loss_rpn_bbox')
)
