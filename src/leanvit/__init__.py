"""leanvit: adaptive token (and channel) reduction for timm Vision Transformers.

    import timm, leanvit
    model = timm.create_model("deit_small_patch16_224")
    fast = leanvit.adapt(model, "ppt", r=50)
    logits = fast(images)
    leanvit.count_macs(fast, images)   # GMACs per image of what ran
"""
from . import archs  # noqa: F401  (registers the reference architectures with timm)
from .measure import count_macs
from .methods import OptionError, Reduction, build_method, list_methods, register
from .adapters import adapt
from .runtime import LeanViT, TokenOutput, UnsupportedModelError
from .tokens import TokenState
from .models import create_model, list_models, load_model

__version__ = "0.1.0"


__all__ = ["adapt", "count_macs", "create_model", "list_models", "load_model", "list_methods", "register", "build_method", "LeanViT", "Reduction",
           "TokenState", "TokenOutput", "OptionError", "UnsupportedModelError"]
