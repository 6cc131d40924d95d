"""mmdet_anchorloss: a batched, fused anchor-head loss for mmdetection 3.x.

Importing the package registers every class into mmdet's registries (``registry.py`` keeps
the one list: ``PLUGIN_TWINS`` maps each upstream type to its plugin twin, ``REGISTERED``
lists the names per registry). In a config:
``custom_imports = dict(imports=['mmdet_anchorloss'], allow_failed_imports=False)``.

Importing changes one thing in mmengine, on purpose: it calls
``engine.checkpoint.register_safe_checkpoint_globals()``, so that ``--resume`` works under
torch >= 2.6 (``weights_only`` loading) for any config that imports the plugin, with mmdet's
own ``tools/train.py`` too, without opening ``torch.load`` to arbitrary pickles (see
``engine/checkpoint.py`` and the README). Nothing else is patched at import; the tools
call ``heads.patch_ssd_predict()`` themselves (``engine.runner.prepare_process``).
"""

from . import assigners, coders, datasets, heads, losses, samplers  # noqa: F401  (registration)
from .engine.checkpoint import register_safe_checkpoint_globals
from .registry import ALTERNATIVES, CLASSES, PLUGIN_TWINS, REGISTERED

__version__ = '0.1.0'

register_safe_checkpoint_globals()  # see the module docstring

globals().update(CLASSES)  # the registered classes, importable from the package

__all__ = sorted(CLASSES) + ['ALTERNATIVES', 'PLUGIN_TWINS', 'REGISTERED']
