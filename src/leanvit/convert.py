"""Hugging Face ``transformers`` and ``open_clip`` Vision Transformers as the equivalent timm
``VisionTransformer``: the same weights, computing the same function (checked to 1e-5 in fp32 by
the tests), so that leanvit's one block runner runs them unchanged.

Each converted model records what the user's model returns (:class:`Conversion`), so the adapted
model can answer with the same outputs. What timm's ``VisionTransformer`` cannot compute exactly
is refused with :class:`ConversionError`, naming the part. The module layouts of transformers 5.x
and 4.x are both read: every part is looked up under each name it has had.
"""
from __future__ import annotations

import dataclasses
from functools import partial
from typing import Callable, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.layers import QuickGELU
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer

INSTALL_HINT = 'pip install "leanvit[hf]" (transformers and open_clip_torch)'

# the model classes converted, by family; the heads are what the class puts on the encoder
HF_CLASSES = {
    "ViTModel": "vit", "ViTForImageClassification": "vit",
    "DeiTModel": "deit", "DeiTForImageClassification": "deit", "DeiTForImageClassificationWithTeacher": "deit",
    "CLIPVisionModel": "clip", "CLIPVisionModelWithProjection": "clip",
    "SiglipVisionModel": "siglip",
    "Dinov2Model": "dinov2", "Dinov2WithRegistersModel": "dinov2",
}
# Hugging Face vision models outside those families, and the part leanvit cannot reproduce
HF_REFUSED = {
    "Swin": "windowed attention with a relative position bias",
    "Beit": "a relative position bias inside attention",
    "Data2VecVision": "a relative position bias inside attention",
    "ViTMAE": "random masking of patches in its embeddings",
    "ViTHybrid": "a convolutional (BiT) stem",
    "Dinov2ForImageClassification": "a head on the CLS token concatenated with the patch tokens' mean",
    "CLIPModel": "a text tower (pass CLIPVisionModelWithProjection, or model.vision_model)",
    "SiglipModel": "a text tower (pass SiglipVisionModel, or model.vision_model)",
    "Hiera": "hierarchical pooling stages", "Mvit": "pooling attention", "Levit": "convolutional stages",
}


class ConversionError(ValueError):
    """The model has a part the equivalent timm VisionTransformer cannot compute; the message names it."""


@dataclasses.dataclass
class Conversion:
    """A user's model as a timm VisionTransformer, and what the user's model returns.

    outputs: the ``ModelOutput`` class the user's model returns (None: open_clip, a tensor)
    pooled:  the field the timm head's output fills ("logits", "pooler_output", "image_embeds",
             None: the model pools nothing)
    normed:  whether ``last_hidden_state`` is after the final norm (CLIP's is before)
    teacher: DeiT with a distillation head (``cls_logits``, ``distillation_logits`` too)
    """

    model: VisionTransformer
    source: str  # the user's model class
    outputs: Optional[type] = None
    pooled: Optional[str] = None
    normed: bool = True
    teacher: bool = False
    loss: Optional[Callable] = None  # the user's model's loss (labels, logits, config)
    config: object = None
    encode: bool = False  # open_clip's full CLIP: the adapted model's forward is encode_image
    output_tokens: bool = False  # open_clip tower returning (pooled, tokens)


def is_foreign(model: nn.Module) -> bool:
    """Whether ``model`` is a transformers or open_clip model (converted by :func:`convert`)."""
    return type(model).__module__.split(".")[0] in ("transformers", "open_clip")


def convert(model: nn.Module, image_size: Union[int, Sequence[int], None] = None) -> Conversion:
    """The timm VisionTransformer equal to ``model`` on ``image_size`` images (default: the size
    the model was built for; position embeddings interpolated as the model itself does)."""
    package = type(model).__module__.split(".")[0]
    if package == "open_clip":
        return _convert_open_clip(model, image_size)
    name = type(model).__name__
    if name not in HF_CLASSES:
        part = next((why for prefix, why in HF_REFUSED.items() if name.startswith(prefix)), None)
        raise ConversionError(
            f"{name}{f' has {part}, which' if part else ''} is not supported: leanvit adapts the Hugging Face "
            f"models {', '.join(HF_CLASSES)}")
    return _convert_hf(model, name, HF_CLASSES[name], image_size)


# --- lookups under the names a part has had in transformers' module layouts -----------------------
def _find(module: nn.Module, *paths: str, required: bool = True):
    for path in paths:
        m = module
        for attr in path.split("."):
            m = getattr(m, attr, None)
            if m is None:
                break
        if m is not None:
            return m
    if required:
        raise ConversionError(f"{type(module).__name__} has none of {', '.join(paths)}: a module layout "
                              "leanvit does not know (transformers version?)")
    return None


def _activation(name: str, fallback: nn.Module) -> Callable[[], nn.Module]:
    """A timm-side activation for a transformers ``hidden_act`` name (the model's own module when
    the name has no exact torch equivalent)."""
    known = {"gelu": nn.GELU, "gelu_pytorch_tanh": partial(nn.GELU, approximate="tanh"),
             "quick_gelu": QuickGELU, "relu": nn.ReLU, "silu": nn.SiLU, "swish": nn.SiLU}
    return known.get(name, lambda: fallback)


def _pair(size) -> Tuple[int, int]:
    return (int(size), int(size)) if isinstance(size, (int, float)) else (int(size[0]), int(size[1]))


# --- transformers ------------------------------------------------------------------------------------
def _convert_hf(model: nn.Module, name: str, family: str, image_size) -> Conversion:
    config = model.config
    core = model
    while getattr(core, "embeddings", None) is None:  # the encoder under the task heads
        core = _find(core, "vision_model", "vit", "deit", "dinov2")
    layers = _find(core, "layers", "encoder.layer", "encoder.layers")
    emb = core.embeddings
    _check_hf_config(config, family)
    D, heads = config.hidden_size, config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or D // heads
    if head_dim * heads != D:
        raise ConversionError(f"{name}: head_dim {head_dim} x {heads} heads != hidden_size {D} "
                              "(timm's attention splits the width evenly)")
    patch = _find(emb, "patch_embeddings.projection", "patch_embedding")
    size = _pair(image_size if image_size is not None else config.image_size)
    grid = (size[0] // patch.stride[0], size[1] // patch.stride[1])
    cls = getattr(emb, "cls_token", None)
    if cls is None and getattr(emb, "class_embedding", None) is not None:
        cls = emb.class_embedding.reshape(1, 1, D)
    dist = getattr(emb, "distillation_token", None)
    registers = getattr(emb, "register_tokens", None)
    n_reg = 0 if registers is None else registers.shape[1]
    pos = _hf_positions(emb, (cls is not None) + (dist is not None), grid, size, D)
    mlp0 = _find(layers[0], "mlp.fc1", "intermediate.dense")
    act = _find(layers[0], "mlp.activation_fn", "mlp.activation", "intermediate.intermediate_act_fn", required=False)
    teacher = name == "DeiTForImageClassificationWithTeacher"
    pooling = "map" if family == "siglip" and getattr(core, "head", None) is not None else \
        "token" if cls is not None else "avg"
    kw = dict(img_size=size, patch_size=tuple(patch.stride), in_chans=patch.in_channels, num_classes=0,
              global_pool=pooling, embed_dim=D, depth=len(layers), num_heads=heads,
              mlp_ratio=(mlp0.out_features + 0.5) / D,  # int(D * ratio) is the width exactly
              qkv_bias=_find(layers[0], "attention.q_proj", "attention.attention.query",
                             "self_attn.q_proj").bias is not None,
              class_token=cls is not None, reg_tokens=0 if teacher else n_reg + (dist is not None),
              no_embed_class=n_reg > 0, pre_norm=getattr(core, "pre_layrnorm", None) is not None,
              fc_norm=False, init_values=1.0 if family == "dinov2" else None,
              act_layer=_activation(config.hidden_act, act),
              norm_layer=partial(nn.LayerNorm, eps=config.layer_norm_eps), weight_init="skip")
    timm_model = (VisionTransformerDistilled if teacher else VisionTransformer)(**kw)
    sd = _hf_embed_state(patch, cls, dist, registers, pos, "dist_token" if teacher else "reg_token")
    for i, layer in enumerate(layers):
        sd.update(_hf_layer_state(layer, f"blocks.{i}."))
    if kw["pre_norm"]:
        sd.update(_prefixed("norm_pre.", core.pre_layrnorm.state_dict()))
    sd.update(_prefixed("norm.", _find(core, "layernorm", "post_layernorm").state_dict()))
    conv = _hf_heads(model, name, family, core, timm_model, sd)
    timm_model.num_classes = _outputs_of(timm_model.head)
    _load(timm_model, sd, name)
    conv.model = timm_model.to(device=patch.weight.device, dtype=patch.weight.dtype).eval()
    conv.config = config
    conv.loss = lambda labels, logits: model.loss_function(labels, logits, model.config)
    return conv


def _check_hf_config(config, family: str) -> None:
    if getattr(config, "use_swiglu_ffn", False):
        raise ConversionError(f"{type(config).__name__}.use_swiglu_ffn: the SwiGLU MLP (DINOv2 giant) is not "
                              "supported; leanvit runs a two-layer MLP")
    if getattr(config, "qk_norm", False) or getattr(config, "use_qk_norm", False):
        raise ConversionError(f"{type(config).__name__}: query/key normalisation (qk_norm) is not supported")


def _hf_positions(emb: nn.Module, n_pos_prefix: int, grid, size, D: int) -> torch.Tensor:
    """(1, prefix + patches, D) the position embeddings the model adds on ``size`` images: its own
    ``interpolate_pos_encoding`` (DINOv2 always calls it; the others when asked to), which returns
    the stored table unchanged at the size the model was built for."""
    dummy = torch.zeros(1, n_pos_prefix + grid[0] * grid[1], D)
    table = getattr(emb, "position_embeddings", None)
    if table is None:
        table = emb.position_embedding.weight[None]
    if not hasattr(emb, "interpolate_pos_encoding"):  # older transformers: one size only
        if table.shape[1] != dummy.shape[1]:
            raise ConversionError(f"{type(emb).__name__} has no interpolate_pos_encoding (an older transformers): "
                                  f"image_size {size} cannot be reproduced, only the configured size")
        return table.detach().float()
    with torch.no_grad():
        pos = emb.interpolate_pos_encoding(dummy, size[0], size[1])
    if pos.shape[1] != dummy.shape[1]:
        raise ConversionError(f"{type(emb).__name__}: position embeddings of {pos.shape[1]} tokens for "
                              f"{dummy.shape[1]} tokens on {size[0]}x{size[1]} images")
    return pos.detach().float()


def _hf_embed_state(patch, cls, dist, registers, pos, dist_key: str) -> dict:
    """The embedding weights; a plain DeiT's distillation token runs as timm's one register token
    (``dist_key``), the teacher DeiT's as timm's distilled model's own."""
    sd = {"patch_embed.proj.weight": patch.weight}
    if patch.bias is not None:
        sd["patch_embed.proj.bias"] = patch.bias
    if registers is not None:  # timm adds no position to prefix tokens: the CLS position goes into it
        sd["cls_token"] = cls + pos[:, :1].to(cls.dtype)
        sd["reg_token"] = registers
        sd["pos_embed"] = pos[:, 1:]
        return sd
    if cls is not None:
        sd["cls_token"] = cls
    if dist is not None:
        sd[dist_key] = dist
    sd["pos_embed"] = pos
    return sd


def _hf_layer_state(layer: nn.Module, p: str) -> dict:
    q = _find(layer, "attention.q_proj", "attention.attention.query", "self_attn.q_proj")
    k = _find(layer, "attention.k_proj", "attention.attention.key", "self_attn.k_proj")
    v = _find(layer, "attention.v_proj", "attention.attention.value", "self_attn.v_proj")
    o = _find(layer, "attention.o_proj", "attention.output.dense", "self_attn.out_proj")
    fc1 = _find(layer, "mlp.fc1", "intermediate.dense")
    fc2 = _find(layer, "mlp.fc2", "output.dense")
    n1 = _find(layer, "layernorm_before", "norm1", "layer_norm1")
    n2 = _find(layer, "layernorm_after", "norm2", "layer_norm2")
    sd = {p + "attn.qkv.weight": torch.cat([q.weight, k.weight, v.weight]),
          p + "attn.proj.weight": o.weight, p + "attn.proj.bias": o.bias,
          p + "mlp.fc1.weight": fc1.weight, p + "mlp.fc1.bias": fc1.bias,
          p + "mlp.fc2.weight": fc2.weight, p + "mlp.fc2.bias": fc2.bias}
    if q.bias is not None:
        sd[p + "attn.qkv.bias"] = torch.cat([q.bias, k.bias, v.bias])
    sd.update(_prefixed(p + "norm1.", n1.state_dict()))
    sd.update(_prefixed(p + "norm2.", n2.state_dict()))
    for i in (1, 2):
        scale = getattr(layer, f"layer_scale{i}", None)
        if scale is not None:
            sd[f"{p}ls{i}.gamma"] = scale.lambda1
    return sd


def _hf_heads(model, name: str, family: str, core, timm_model, sd: dict) -> Conversion:
    """The user's heads as the timm model's ``head`` (and ``head_dist``, ``attn_pool``)."""
    ns = __import__(type(model).__module__, fromlist=["_"])  # the output classes the model's module uses
    base = getattr(ns, "BaseModelOutputWithPooling", None)
    if family == "siglip" and timm_model.attn_pool is not None:
        sd.update(_mha_pool_state(core.head))
    if name.endswith("ForImageClassification"):
        timm_model.head = _copy_linear(model.classifier)
        return Conversion(timm_model, name, ns.ImageClassifierOutput, "logits")
    if name == "DeiTForImageClassificationWithTeacher":
        timm_model.head, timm_model.head_dist = _copy_linear(model.cls_classifier), \
            _copy_linear(model.distillation_classifier)
        return Conversion(timm_model, name, ns.DeiTForImageClassificationWithTeacherOutput, "logits", teacher=True)
    if name == "CLIPVisionModelWithProjection":
        timm_model.head = _copy_linear(model.visual_projection)
        return Conversion(timm_model, name, ns.CLIPVisionModelOutput, "image_embeds", normed=False)
    pooler = getattr(core, "pooler", None)
    if pooler is not None:  # ViT/DeiT's pooler: dense + activation on the first token
        timm_model.head = nn.Sequential(_copy_linear(pooler.dense), pooler.activation)
    has_pool = family in ("clip", "dinov2") or pooler is not None or timm_model.attn_pool is not None
    return Conversion(timm_model, name, base, "pooler_output" if has_pool else None, normed=family != "clip")


def _outputs_of(head: nn.Module) -> int:
    """timm's ``num_classes`` for a copied head: a classifier's (or projection's) outputs; 0 for a
    pooler (it is no classifier) or none."""
    return head.out_features if isinstance(head, nn.Linear) else 0


def _mha_pool_state(head: nn.Module) -> dict:
    """SigLIP's attention-pooling head (torch MultiheadAttention + MLP) as timm's AttentionPoolLatent."""
    attn, D = head.attention, head.probe.shape[-1]
    w, b = attn.in_proj_weight, attn.in_proj_bias
    sd = {"attn_pool.latent": head.probe, "attn_pool.q.weight": w[:D], "attn_pool.q.bias": b[:D],
          "attn_pool.kv.weight": w[D:], "attn_pool.kv.bias": b[D:],
          "attn_pool.proj.weight": attn.out_proj.weight, "attn_pool.proj.bias": attn.out_proj.bias}
    sd.update(_prefixed("attn_pool.norm.", head.layernorm.state_dict()))
    sd.update({"attn_pool.mlp.fc1.weight": head.mlp.fc1.weight, "attn_pool.mlp.fc1.bias": head.mlp.fc1.bias,
               "attn_pool.mlp.fc2.weight": head.mlp.fc2.weight, "attn_pool.mlp.fc2.bias": head.mlp.fc2.bias})
    return sd


def _copy_linear(m: nn.Module) -> nn.Module:
    if not isinstance(m, nn.Linear):
        return nn.Identity()
    out = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
    out.load_state_dict(m.state_dict())
    return out


def _prefixed(prefix: str, sd: dict) -> dict:
    return {prefix + k: v for k, v in sd.items()}


def _load(timm_model: nn.Module, sd: dict, name: str) -> None:
    """Every weight of the timm model, from the user's model, exactly (a missing or extra one is a
    conversion bug or a part not mapped: refused by name)."""
    own = timm_model.state_dict()
    head_keys = {k for k in own if k.startswith(("head.", "head_dist."))}  # copied with their modules
    missing = sorted(k for k in own if k not in sd and k not in head_keys)
    extra = sorted(k for k in sd if k not in own)
    if missing or extra:
        raise ConversionError(f"{name}: cannot map its weights onto timm's VisionTransformer "
                              f"(unmapped: {', '.join(missing[:4]) or '-'}; left over: {', '.join(extra[:4]) or '-'})")
    with torch.no_grad():
        for k, v in sd.items():
            if own[k].shape != v.shape:
                raise ConversionError(f"{name}: {k} has shape {tuple(v.shape)}, timm's {tuple(own[k].shape)}")
            own[k].copy_(v.detach().to(own[k].dtype))


# --- open_clip ---------------------------------------------------------------------------------------
def _convert_open_clip(model: nn.Module, image_size) -> Conversion:
    encode = hasattr(model, "encode_image") and hasattr(model, "visual")
    tower = model.visual if encode else model
    name = type(tower).__name__
    if name == "TimmModel":
        raise ConversionError("open_clip's TimmModel tower wraps a timm model: adapt model.visual.trunk "
                              "(timm) directly, its head is model.visual.head")
    if name != "VisionTransformer":
        raise ConversionError(f"open_clip's {name} image tower is not a Vision Transformer; leanvit adapts "
                              "open_clip's VisionTransformer")
    if getattr(tower, "attn_pool", None) is not None:
        raise ConversionError("open_clip VisionTransformer with an attentional pooler (attentional_pool, "
                              "CoCa) is not supported")
    blocks = tower.transformer.resblocks
    if any(type(b).__name__ != "ResidualAttentionBlock" for b in blocks):
        raise ConversionError(f"open_clip block {type(blocks[0]).__name__} (qk_norm, scaled cosine attention, "
                              "head or fc scaling) is not supported; leanvit runs ResidualAttentionBlock")
    size = _pair(image_size if image_size is not None else tower.image_size)
    if size != _pair(tower.image_size):
        raise ConversionError(f"open_clip's VisionTransformer adds position embeddings for "
                              f"{_pair(tower.image_size)} images only; image_size={size} cannot be reproduced")
    return _open_clip_timm(tower, size, encode, name)


def _open_clip_timm(tower, size, encode: bool, name: str) -> Conversion:
    blk0, D = tower.transformer.resblocks[0], tower.class_embedding.shape[0]
    act = blk0.mlp.gelu
    act_layer = QuickGELU if type(act).__name__ == "QuickGELU" else \
        partial(nn.GELU, approximate=act.approximate) if isinstance(act, nn.GELU) else (lambda: act)
    avg = tower.pool_type == "avg"
    after_pool = avg and tower.final_ln_after_pool  # LayerNorm is per token: after a CLS pool it is the same
    kw = dict(img_size=size, patch_size=tuple(tower.conv1.stride), in_chans=tower.conv1.in_channels,
              num_classes=0, global_pool="avg" if avg else "token", embed_dim=D, depth=len(tower.transformer.resblocks),
              num_heads=blk0.attn.num_heads, mlp_ratio=(blk0.mlp.c_fc.out_features + 0.5) / D,
              qkv_bias=blk0.attn.in_proj_bias is not None, class_token=True, pre_norm=True,
              final_norm=True, fc_norm=after_pool,  # timm: fc_norm replaces the final norm
              init_values=1.0 if not isinstance(blk0.ls_1, nn.Identity) else None, act_layer=act_layer,
              norm_layer=partial(nn.LayerNorm, eps=blk0.ln_1.eps), weight_init="skip")
    timm_model = VisionTransformer(**kw)
    sd = {"patch_embed.proj.weight": tower.conv1.weight, "cls_token": tower.class_embedding.reshape(1, 1, D),
          "pos_embed": tower.positional_embedding[None]}
    if isinstance(tower.ln_pre, nn.Identity):
        timm_model.norm_pre = nn.Identity()
    else:
        sd.update(_prefixed("norm_pre.", tower.ln_pre.state_dict()))
    sd.update(_prefixed("fc_norm." if after_pool else "norm.", tower.ln_post.state_dict()))
    for i, b in enumerate(tower.transformer.resblocks):
        p = f"blocks.{i}."
        sd.update({p + "attn.qkv.weight": b.attn.in_proj_weight, p + "attn.qkv.bias": b.attn.in_proj_bias,
                   p + "attn.proj.weight": b.attn.out_proj.weight, p + "attn.proj.bias": b.attn.out_proj.bias,
                   p + "mlp.fc1.weight": b.mlp.c_fc.weight, p + "mlp.fc1.bias": b.mlp.c_fc.bias,
                   p + "mlp.fc2.weight": b.mlp.c_proj.weight, p + "mlp.fc2.bias": b.mlp.c_proj.bias})
        sd.update(_prefixed(p + "norm1.", b.ln_1.state_dict()))
        sd.update(_prefixed(p + "norm2.", b.ln_2.state_dict()))
        if kw["init_values"] is not None:
            sd.update({p + "ls1.gamma": b.ls_1.gamma, p + "ls2.gamma": b.ls_2.gamma})
    if tower.proj is not None:
        timm_model.head = nn.Linear(D, tower.proj.shape[1], bias=False)
        timm_model.head.weight.data.copy_(tower.proj.detach().t())
        timm_model.num_classes = tower.proj.shape[1]
    _load(timm_model, {k: v for k, v in sd.items() if v is not None}, f"open_clip {name}")
    w = tower.conv1.weight
    timm_model = timm_model.to(device=w.device, dtype=w.dtype).eval()
    return Conversion(timm_model, f"open_clip {name}", encode=encode,
                      output_tokens=bool(getattr(tower, "output_tokens", False)))
