"""Training-loop support: safe checkpoint loading, distributed launch on CPU."""

from .checkpoint import (  # noqa: F401
    UnsafeCheckpointError,
    load_from_local_safe,
    register_safe_checkpoint_globals,
    safe_checkpoint_globals,
)
