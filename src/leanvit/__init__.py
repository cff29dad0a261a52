"""leanvit: adaptive token (and channel) reduction for timm Vision Transformers.

    import timm, leanvit
    model = timm.create_model("deit_small_patch16_224")
    fast = leanvit.adapt(model, "ppt", r=50)
    logits = fast(images)
    leanvit.count_macs(fast, images)   # GMACs per image of what ran
"""
from . import archs  # noqa: F401  (registers the reference architectures with timm)
from .flops import count_macs
from .methods import OptionError, Reduction, build_method, list_methods, register
from .runtime import LeanViT, UnsupportedModelError
from .tokens import TokenState
from .models import create_model, list_models
from .zoo import load_model

__version__ = "0.1.0"


def adapt(model, method="none", **options) -> LeanViT:
    """Wrap a timm VisionTransformer so that it runs with token-reduction ``method``.

    ``method`` is a registered name (see :func:`list_methods`) or a :class:`Reduction` instance.
    The original model is shared, not modified, and stays usable on its own.
    """
    if isinstance(model, LeanViT):
        model = model.model
    if isinstance(method, Reduction):
        if options:
            raise OptionError("pass options to the method's constructor, not to adapt()")
    elif isinstance(method, str):
        method = build_method(method, **options)
    else:
        raise OptionError(f"method must be a name or a Reduction, got {type(method).__name__}")
    return LeanViT(model, method)


__all__ = ["adapt", "count_macs", "create_model", "list_models", "load_model", "list_methods", "register", "build_method", "LeanViT", "Reduction",
           "TokenState", "OptionError", "UnsupportedModelError"]
