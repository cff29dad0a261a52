"""Hugging Face ``transformers`` and ``open_clip`` models through leanvit: :func:`adapt` converts
them into the equivalent timm VisionTransformer (:mod:`leanvit.convert`) and wraps that in a
:class:`DropInLeanViT`, which answers as the user's model does (the same ``ModelOutput`` class, or
open_clip's embedding tensor). timm models go to :func:`leanvit.runtime.adapt` unchanged.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .convert import Conversion, ConversionError, convert, is_foreign
from .methods import OptionError
from .methods.base import Reduction
from .runtime import LeanViT, UnsupportedModelError, method_from
from .runtime import adapt as adapt_timm
from .tokens import TokenState

LAST_HIDDEN_STATE = ("reduced", "grid")


class DropInLeanViT(LeanViT):
    """A converted transformers / open_clip model run by leanvit's block runner, returning what the
    user's model returns.

    ``last_hidden_state``: "reduced" (the tokens left after reduction, prefix tokens first, padding
    of ragged batches zero) or "grid" (every input token's place, prefix tokens then the patch grid:
    each patch gets the token that stands for it, pruned patches zeros).
    """

    def __init__(self, conversion: Conversion, method: Reduction, last_hidden_state: str = "reduced"):
        if last_hidden_state not in LAST_HIDDEN_STATE:
            raise OptionError(f"last_hidden_state must be one of {LAST_HIDDEN_STATE}, got {last_hidden_state!r}")
        super().__init__(conversion.model, method)
        self.conversion = conversion
        self.last_hidden_state = last_hidden_state

    def forward(self, pixel_values: Optional[Tensor] = None, labels: Optional[Tensor] = None,
                return_dict: Optional[bool] = None, interpolate_pos_encoding: Optional[bool] = None, **kwargs):
        """The user's model's forward: ``pixel_values`` (B, C, H, W) at the size the model was
        adapted for; ``labels`` give the user's model's loss."""
        images = kwargs.pop("image", None) if pixel_values is None else pixel_values
        self._refuse(kwargs, images)
        del interpolate_pos_encoding  # positions were interpolated at conversion when asked (image_size)
        grid = self.last_hidden_state == "grid"
        state = self.run_blocks_tracking(images, grid)
        c = self.conversion
        if c.outputs is None:  # open_clip: the embedding (and the tokens, if the tower returns them)
            pooled = self.finish(state)
            return (pooled, self._tokens(state, grid)[:, self.n_prefix:]) if c.output_tokens else pooled
        fields = self._heads(state)
        if c.pooled is None:
            fields.pop("pooled")
        else:
            fields[c.pooled] = fields.pop("pooled")
        if "last_hidden_state" in c.outputs.__dataclass_fields__:
            fields["last_hidden_state"] = self._tokens(state, grid)
        if labels is not None:
            if "logits" not in fields:
                raise ValueError(f"labels: the adapted {c.source} has no logits to compute a loss from")
            fields["loss"] = c.loss(labels, fields["logits"])
        out = c.outputs(**fields)
        return out.to_tuple() if return_dict is False else out

    def encode_image(self, image: Tensor, normalize: bool = False) -> Tensor:
        """open_clip's ``CLIP.encode_image``: the image embedding, L2-normalised if asked."""
        features = self.finish(self.run_blocks(self.embed(image)))
        return torch.nn.functional.normalize(features, dim=-1) if normalize else features

    def _refuse(self, kwargs: dict, images) -> None:
        for name in ("output_attentions", "output_hidden_states", "bool_masked_pos"):
            if kwargs.pop(name, None):
                raise ValueError(f"{name} is not supported by a leanvit-adapted model (each block runs on "
                                 "its own reduced tokens); call the original model for it")
        if kwargs:
            raise TypeError(f"unexpected arguments {', '.join(kwargs)} for the adapted {self.conversion.source}")
        if images is None:
            raise ValueError("pass pixel_values (B, C, H, W)")
        want = tuple(self.model.patch_embed.img_size)
        if isinstance(images, Tensor) and images.dim() == 4 and tuple(images.shape[-2:]) != want:
            raise ValueError(f"this adapted {self.conversion.source} runs {want[0]}x{want[1]} images (its position "
                             f"embeddings were laid out for that grid), got {images.shape[-2]}x{images.shape[-1]}; "
                             f"adapt it with image_size={images.shape[-2]} for that size")

    def _heads(self, state: TokenState) -> dict:
        """The head outputs on the final tokens: the timm head's as "pooled"; a teacher DeiT's two
        classifiers separately too (their mean is the logits, as timm's distilled head returns)."""
        if not self.conversion.teacher:
            return {"pooled": self.finish(state)}
        if self._trace is not None:
            self.last_state = state
        m = self.model
        x = m.norm(state.x)
        cls_logits, dist_logits = m.head(x[:, 0]), m.head_dist(x[:, 1])
        return {"pooled": (cls_logits + dist_logits) / 2, "cls_logits": cls_logits,
                "distillation_logits": dist_logits}

    def _tokens(self, state: TokenState, grid: bool) -> Tensor:
        """``last_hidden_state``: the final tokens (after the final norm where the user's model
        normalises them), reduced or spread back over the input tokens."""
        x = self.model.norm(state.x) if self.conversion.normed else state.x
        if state.valid is not None:
            x = x.masked_fill(~state.valid[..., None], 0.0)
        if not grid:
            return x
        source = state.source if state.valid is None else state.source * state.valid[..., None]
        return source.transpose(1, 2).to(x.dtype) @ x


def adapt(model, method="none", **options) -> LeanViT:
    """Wrap a model so that it runs with token-reduction ``method`` (see :func:`list_methods`).

    timm VisionTransformer / Eva models: :func:`leanvit.runtime.adapt`. transformers ViT, DeiT,
    CLIP vision, SigLIP vision and DINOv2 models, and open_clip's VisionTransformer tower or CLIP
    model, are converted to the equivalent timm model and answer as the original does
    (:class:`DropInLeanViT`); their options ``image_size`` (the images it will run, default the
    model's own: position embeddings are interpolated as the model does) and ``last_hidden_state``
    ("reduced" or "grid") are taken here, the rest go to the method. The original model is not
    modified.
    """
    if isinstance(model, DropInLeanViT):
        return _drop_in(model.conversion, method, options, options.pop("last_hidden_state", model.last_hidden_state))
    if not is_foreign(model):
        return adapt_timm(model, method, **options)
    image_size = options.pop("image_size", None)
    last_hidden_state = options.pop("last_hidden_state", "reduced")
    try:
        conversion = convert(model, image_size)
    except ConversionError as e:
        raise UnsupportedModelError(str(e)) from None
    return _drop_in(conversion, method, options, last_hidden_state)


def _drop_in(conversion: Conversion, method, options: dict, last_hidden_state: str) -> DropInLeanViT:
    return DropInLeanViT(conversion, method_from(method, options), last_hidden_state)
