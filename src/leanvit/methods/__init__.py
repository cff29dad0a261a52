"""Token-reduction methods, registered by name (see :func:`leanvit.list_methods`)."""
from .base import (AttentionView, ModelInfo, OptionError, Reduction, build_method, list_methods,
                   register)
from . import none, tome, evit, ppt, ats, random, rl4evit, dynamicvit, channels, prance  # noqa: F401  (registers them)

__all__ = ["AttentionView", "ModelInfo", "OptionError", "Reduction", "build_method", "list_methods",
           "register"]
