"""The one list of what the plugin registers, and the upstream type each class stands in for.

Every registered class goes through ``register_twin``; ``PLUGIN_TWINS`` (upstream type ->
plugin type, the switch a user makes in a config), ``REGISTERED`` (names per mmdet
registry) and the package's ``__all__`` are all read from here.
"""

from typing import Dict, List, Type

from mmdet.registry import DATASETS, MODELS, TASK_UTILS

PLUGIN_TWINS: Dict[str, str] = {}
REGISTERED: Dict[str, List[str]] = {'MODELS': [], 'TASK_UTILS': [], 'DATASETS': []}
CLASSES: Dict[str, Type] = {}
_REGISTRIES = {'MODELS': MODELS, 'TASK_UTILS': TASK_UTILS, 'DATASETS': DATASETS}


def register_twin(upstream: str, registry: str = 'MODELS'):
    """Class decorator: register the class in mmdet's ``registry`` as the twin of the
    upstream type ``upstream`` (same constructor arguments, same numbers).

    Args:
        upstream (str): the mmdet type it replaces, e.g. ``'FocalLoss'``.
        registry (str): ``'MODELS'``, ``'TASK_UTILS'`` or ``'DATASETS'``.
    """

    def register(cls: Type) -> Type:
        _REGISTRIES[registry].register_module(module=cls)
        PLUGIN_TWINS[upstream] = cls.__name__
        REGISTERED[registry].append(cls.__name__)
        CLASSES[cls.__name__] = cls
        return cls

    return register
