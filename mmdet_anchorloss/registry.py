"""The one list of what the plugin registers, and the upstream type each class stands in for.

Every registered class goes through ``register_twin`` or ``register_alternative``;
``PLUGIN_TWINS`` (upstream type -> plugin type with the same numbers, the switch a user
makes in a config), ``ALTERNATIVES`` (upstream type -> opt-in plugin types that change the
numbers by design, e.g. other random draws), ``REGISTERED`` (names per mmdet registry) and
the package's ``__all__`` are all read from here.
"""

from typing import Dict, List, Type

from mmdet.registry import DATASETS, MODELS, TASK_UTILS

PLUGIN_TWINS: Dict[str, str] = {}
ALTERNATIVES: Dict[str, List[str]] = {}
REGISTERED: Dict[str, List[str]] = {'MODELS': [], 'TASK_UTILS': [], 'DATASETS': []}
CLASSES: Dict[str, Type] = {}
_REGISTRIES = {'MODELS': MODELS, 'TASK_UTILS': TASK_UTILS, 'DATASETS': DATASETS}


def _register(cls: Type, registry: str) -> None:
    """Register ``cls`` in mmdet's ``registry`` and in this module's lists."""
    _REGISTRIES[registry].register_module(module=cls)
    REGISTERED[registry].append(cls.__name__)
    CLASSES[cls.__name__] = cls


def register_twin(upstream: str, registry: str = 'MODELS'):
    """Class decorator: register the class in mmdet's ``registry`` as the twin of the
    upstream type ``upstream`` (same constructor arguments, same numbers).

    Args:
        upstream (str): the mmdet type it replaces, e.g. ``'FocalLoss'``.
        registry (str): ``'MODELS'``, ``'TASK_UTILS'`` or ``'DATASETS'``.
    """

    def register(cls: Type) -> Type:
        _register(cls, registry)
        PLUGIN_TWINS[upstream] = cls.__name__
        return cls

    return register


def register_alternative(upstream: str, registry: str = 'MODELS'):
    """Class decorator: register the class in mmdet's ``registry`` as an opt-in stand-in for
    ``upstream`` that does not give its numbers (so ``PLUGIN_TWINS`` leaves it out, and no
    config is switched to it but by hand).
    """

    def register(cls: Type) -> Type:
        _register(cls, registry)
        ALTERNATIVES.setdefault(upstream, []).append(cls.__name__)
        return cls

    return register
