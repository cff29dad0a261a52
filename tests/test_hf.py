"""Hugging Face transformers and open_clip models through leanvit: exact with ``none`` (1e-5 in
fp32, small and full-size configurations), every reducing method on every family with the
user's output class, analytic MACs equal to torch's flop counter, refusals by name, loading
``hf:<dir>`` / ``open_clip:<arch>`` and the command line."""
from __future__ import annotations

import json
import sys
import time

import open_clip
import pytest
import torch
import transformers as T
from open_clip.transformer import QuickGELU as OpenClipQuickGELU
from open_clip.transformer import VisionTransformer as OpenClipViT
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import leanvit
from leanvit.adapters import DropInLeanViT
from leanvit.models import ModelError, create_model

from conftest import CIFAR, seed_all

SMALL = dict(hidden_size=64, num_hidden_layers=12, num_attention_heads=4, image_size=32, patch_size=4)
WITH_MLP = dict(SMALL, intermediate_size=128)

# the user's model class and its config (small: 32x32 images, 65 tokens, width 64, depth 12)
FAMILIES = {
    "vit-classifier": lambda: T.ViTForImageClassification(T.ViTConfig(**WITH_MLP, num_labels=10)),
    "vit-pooler": lambda: T.ViTModel(T.ViTConfig(**WITH_MLP)),
    "deit-classifier": lambda: T.DeiTForImageClassification(T.DeiTConfig(**WITH_MLP, num_labels=10)),
    "deit-teacher": lambda: T.DeiTForImageClassificationWithTeacher(T.DeiTConfig(**WITH_MLP, num_labels=10)),
    "deit-model": lambda: T.DeiTModel(T.DeiTConfig(**WITH_MLP), add_pooling_layer=False),
    "clip": lambda: T.CLIPVisionModel(T.CLIPVisionConfig(**WITH_MLP)),
    "clip-projection": lambda: T.CLIPVisionModelWithProjection(T.CLIPVisionConfig(**WITH_MLP, projection_dim=32)),
    "siglip": lambda: T.SiglipVisionModel(T.SiglipVisionConfig(**WITH_MLP)),
    "siglip-no-head": lambda: T.SiglipVisionModel(T.SiglipVisionConfig(**WITH_MLP, vision_use_head=False)),
    "dinov2": lambda: T.Dinov2Model(T.Dinov2Config(**SMALL, layerscale_value=0.5)),
    "dinov2-registers": lambda: T.Dinov2WithRegistersModel(T.Dinov2WithRegistersConfig(**SMALL, layerscale_value=0.5)),
}
METHODS = [("tome", dict(r=4)), ("evit", dict(keep_rate=0.7)), ("ppt", dict(r=6, threshold="scaled")),
           ("random", dict(keep_rate=0.6)), ("ats", {}), ("dynamicvit", dict(keep_rate=0.7))]


def randomized(model: torch.nn.Module, std: float = 0.3) -> torch.nn.Module:
    """Every weight moved by noise (norm scales and layer scales too), so that a part mapped to
    the wrong place changes the output by far more than the tolerance."""
    seed_all(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * std)
    return model.eval()


def pixels(batch: int = 3, size: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def max_differences(ref, out) -> dict:
    return {k: (ref[k] - out[k]).abs().max().item() for k in ref.keys() if ref[k] is not None}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    seed_all(0)
    return request.param, randomized(FAMILIES[request.param]())


# --------------------------------------------------------------------------- none == the user's model
def test_none_is_exact(family):
    name, model = family
    x = pixels()
    with torch.no_grad():
        ref = model(pixel_values=x)
        out = leanvit.adapt(model, "none")(pixel_values=x)
    assert type(out) is type(ref)
    assert set(k for k in ref.keys() if ref[k] is not None) == set(out.keys())
    diffs = max_differences(ref, out)
    assert diffs and max(diffs.values()) <= 1e-5, diffs
    assert max(ref[k].abs().max().item() for k in diffs) > 0.1  # outputs that a wrong weight would move


def test_tuple_output_and_loss():
    model = randomized(FAMILIES["vit-classifier"]())
    x, labels = pixels(), torch.tensor([1, 2, 3])
    f = leanvit.adapt(model, "none")
    with torch.no_grad():
        ref, out = model(pixel_values=x, labels=labels), f(pixel_values=x, labels=labels)
        assert abs(ref.loss.item() - out.loss.item()) <= 1e-5
        as_tuple = f(x, return_dict=False)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], out.logits)


FULL = {  # the families' default (base-size) configurations, at 224x224
    "vit": lambda: T.ViTForImageClassification(T.ViTConfig()),
    "deit": lambda: T.DeiTForImageClassificationWithTeacher(T.DeiTConfig(num_labels=1000)),
    "clip": lambda: T.CLIPVisionModelWithProjection(T.CLIPVisionConfig(patch_size=16)),
    "siglip": lambda: T.SiglipVisionModel(T.SiglipVisionConfig()),
    "dinov2": lambda: T.Dinov2Model(T.Dinov2Config()),  # built for 518x518: run at 224, interpolated
    "dinov2-registers": lambda: T.Dinov2WithRegistersModel(T.Dinov2WithRegistersConfig(image_size=518)),
}


@pytest.mark.parametrize("name", list(FULL))
def test_none_is_exact_full_size(name):
    seed_all(0)
    model = randomized(FULL[name](), std=0.02)
    x = pixels(1, 224)
    with torch.no_grad():
        ref = model(pixel_values=x)
        out = leanvit.adapt(model, "none", image_size=224)(pixel_values=x)
    diffs = max_differences(ref, out)
    assert diffs and max(diffs.values()) <= 1e-5, diffs


@pytest.mark.parametrize("name", ["vit-classifier", "clip", "siglip", "dinov2", "dinov2-registers"])
def test_other_image_size_interpolates_as_the_model_does(name):
    """image_size=40 on a model built for 32: position embeddings interpolated by the model's own
    code (DINOv2 always; the others with interpolate_pos_encoding=True); other sizes refused by name."""
    model = randomized(FAMILIES[name]())
    x = pixels(2, 40)
    f = leanvit.adapt(model, "none", image_size=40)
    with torch.no_grad():
        ref = model(pixel_values=x) if name.startswith("dinov2") else model(pixel_values=x, interpolate_pos_encoding=True)
        out = f(pixel_values=x, interpolate_pos_encoding=True)
    diffs = max_differences(ref, out)
    assert max(diffs.values()) <= 1e-5, diffs
    with pytest.raises(ValueError, match="runs 40x40 images.*image_size=32"):
        f(pixel_values=pixels(1, 32))


# --------------------------------------------------------------------------- every method, every family
def measured_macs(f, x) -> float:
    """MACs per image counted by torch (SDPA through the MATH backend so its matmuls are counted)."""
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        f(x)
    return counter.get_total_flops() / 2 / x.shape[0]


# every method on one class of each family (those returning last_hidden_state where the family has
# one); the family's other classes differ only in their heads: tome on them
ALL_METHODS = ["vit-pooler", "deit-teacher", "clip-projection", "siglip", "dinov2", "dinov2-registers"]


def methods_for(name):
    return METHODS if name in ALL_METHODS else METHODS[:1]


_built = {}


def built(name):
    """The family's model with its random weights, built once per name."""
    if name not in _built:
        seed_all(0)
        _built[name] = randomized(FAMILIES[name]())
    return _built[name]


@pytest.mark.parametrize("name,method_index", [(n, i) for n in FAMILIES for i in range(len(methods_for(n)))],
                         ids=[f"{n}-{METHODS[i][0]}" for n in FAMILIES for i in range(len(methods_for(n)))])
def test_methods_run_with_the_users_outputs(name, method_index):
    model = built(name)
    method, opts = METHODS[method_index]
    x = pixels(3)
    f = leanvit.adapt(model, method, **opts)
    grid = leanvit.adapt(model, method, last_hidden_state="grid", **opts)
    dense = leanvit.adapt(model, "none")
    with torch.no_grad():
        ref = model(pixel_values=x)
        out = f(pixel_values=x)
        on_grid = grid(pixel_values=x)
    assert type(out) is type(ref)
    for k in ref.keys():
        if ref[k] is not None and k != "last_hidden_state":
            assert out[k].shape == ref[k].shape and torch.isfinite(out[k]).all(), k
    if "last_hidden_state" in ref:
        n0 = ref.last_hidden_state.shape[1]
        assert out.last_hidden_state.shape[0] == 3 and out.last_hidden_state.shape[1] < n0
        assert on_grid.last_hidden_state.shape == ref.last_hidden_state.shape
    if method == "random":  # the same draws for both counts
        f.method.generator.manual_seed(0)
    analytic = leanvit.count_macs(f, x, padded=True) * 1e9
    if method == "random":
        f.method.generator.manual_seed(0)
    assert measured_macs(f, x) == pytest.approx(analytic, rel=0.01)
    assert analytic < leanvit.count_macs(dense, x) * 1e9


def test_grid_tokens_spread_merged_tokens_over_their_patches():
    model = randomized(FAMILIES["dinov2"]())
    x = pixels(2)
    f = leanvit.adapt(model, "tome", r=6, last_hidden_state="grid")
    with torch.no_grad():
        grid = f(pixel_values=x).last_hidden_state
        out = f.forward_tokens(x, source=True)
    assert torch.allclose(grid, f.unmerge(out), atol=1e-6)
    # each merged token appears once per patch it stands for
    distinct = torch.unique(grid[0].round(decimals=5), dim=0).shape[0]
    assert distinct == out.tokens.shape[1]


# --------------------------------------------------------------------------- open_clip
def open_clip_tower(**overrides) -> OpenClipViT:
    kw = dict(image_size=32, patch_size=4, width=64, layers=12, heads=4, mlp_ratio=2.0, output_dim=32)
    kw.update(overrides)
    seed_all(0)
    return randomized(OpenClipViT(**kw), std=0.1)


OPEN_CLIP_VARIANTS = {
    "tok": {}, "avg": dict(pool_type="avg"), "avg-ln-after-pool": dict(pool_type="avg", final_ln_after_pool=True),
    "layer-scale": dict(ls_init_value=0.1), "quick-gelu": dict(act_layer=OpenClipQuickGELU),
    "no-ln-pre": dict(no_ln_pre=True), "tokens": dict(output_tokens=True),
}


@pytest.mark.parametrize("variant", list(OPEN_CLIP_VARIANTS))
def test_open_clip_tower_none_is_exact(variant):
    tower = open_clip_tower(**OPEN_CLIP_VARIANTS[variant])
    x = pixels()
    with torch.no_grad():
        ref, out = tower(x), leanvit.adapt(tower, "none")(x)
    if variant == "tokens":
        assert (ref[1] - out[1]).abs().max() <= 1e-5
        ref, out = ref[0], out[0]
    assert out.shape == ref.shape and (ref - out).abs().max() <= 1e-5
    assert ref.abs().max() > 0.1


def test_open_clip_full_model_encode_image_full_size():
    seed_all(0)
    model = open_clip.create_model("ViT-B-32").eval()
    randomized(model.visual, std=0.02)
    x = pixels(2, 224)
    f = leanvit.adapt(model, "none")
    with torch.no_grad():
        ref = model.encode_image(x, normalize=True)
        assert (f.encode_image(x, normalize=True) - ref).abs().max() <= 1e-5
        assert (f(x) - model.encode_image(x)).abs().max() <= 1e-5


@pytest.mark.parametrize("method, opts", METHODS, ids=[m for m, _ in METHODS])
def test_open_clip_methods_and_macs(method, opts):
    tower = open_clip_tower()
    x = pixels(3)
    f = leanvit.adapt(tower, method, **opts)
    with torch.no_grad():
        assert f(x).shape == (3, 32)
    if method == "random":
        f.method.generator.manual_seed(0)
    analytic = leanvit.count_macs(f, x, padded=True) * 1e9
    if method == "random":
        f.method.generator.manual_seed(0)
    assert measured_macs(f, x) == pytest.approx(analytic, rel=0.01)


# --------------------------------------------------------------------------- refusals by name
def test_refusals_name_the_part():
    swin = T.SwinModel(T.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[1, 1]))
    with pytest.raises(leanvit.UnsupportedModelError, match="SwinModel has windowed attention"):
        leanvit.adapt(swin, "tome")
    swiglu = T.Dinov2Model(T.Dinov2Config(**SMALL, use_swiglu_ffn=True))
    with pytest.raises(leanvit.UnsupportedModelError, match="SwiGLU"):
        leanvit.adapt(swiglu, "tome")
    with pytest.raises(leanvit.UnsupportedModelError, match="attentional pooler"):
        leanvit.adapt(OpenClipViT(32, 4, 64, 2, 4, 2.0, attentional_pool=True, attn_pooler_heads=4), "none")
    with pytest.raises(leanvit.UnsupportedModelError, match="qk_norm"):
        leanvit.adapt(OpenClipViT(32, 4, 64, 2, 4, 2.0, qk_norm=True), "none")
    f = leanvit.adapt(FAMILIES["vit-pooler"]().eval(), "none")
    with pytest.raises(ValueError, match="output_attentions is not supported"):
        f(pixel_values=pixels(), output_attentions=True)


# --------------------------------------------------------------------------- loading
@pytest.fixture(scope="module")
def saved_vit(tmp_path_factory):
    """A random ViTForImageClassification (10 classes, 32x32) saved with save_pretrained, with an
    image processor config."""
    model = randomized(FAMILIES["vit-classifier"]())
    path = tmp_path_factory.mktemp("hf") / "vit"
    model.save_pretrained(path)
    (path / "preprocessor_config.json").write_text(json.dumps({
        "do_resize": True, "size": {"height": 32, "width": 32}, "resample": 2,
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}))
    return model, path


def test_hf_directory_loads_exactly(saved_vit):
    model, path = saved_vit
    timm_model = create_model(f"hf:{path}")
    x = pixels()
    with torch.no_grad():
        assert (timm_model(x) - model(pixel_values=x).logits).abs().max() <= 1e-5
    cfg = timm_model.pretrained_cfg
    assert cfg["input_size"] == (3, 32, 32) and cfg["mean"] == (0.5,) * 3 and cfg["interpolation"] == "bilinear"
    reloaded = T.ViTForImageClassification.from_pretrained(path)
    with torch.no_grad():
        out = leanvit.adapt(reloaded, "none")(pixel_values=x)
        assert (out.logits - model(pixel_values=x).logits).abs().max() <= 1e-5


def test_hub_name_offline_stops_at_once(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(ModelError, match="no local copy.*not reachable"):
        create_model("hf:someone/not-cached-vit")
    assert time.monotonic() - start < 10
    with pytest.raises(ModelError, match="no such directory"):
        create_model("hf:./not/a/dir")


def test_without_the_extra_one_line_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ModelError, match=r'needs transformers: pip install "leanvit\[hf\]"'):
        create_model("hf:google/vit-base-patch16-224")


def test_open_clip_checkpoint_loads_exactly(tmp_path):
    from safetensors.torch import save_file
    seed_all(0)
    model = open_clip.create_model("ViT-B-32").eval()
    randomized(model.visual, std=0.02)
    path = tmp_path / "clip.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    timm_model = create_model("open_clip:ViT-B-32", checkpoint=str(path))
    x = pixels(1, 224)
    with torch.no_grad():
        assert (timm_model(x) - model.encode_image(x)).abs().max() <= 1e-5
    with pytest.raises(ModelError, match="did you mean ViT-B-32"):
        create_model("open_clip:ViT-B-33")


def test_cli_eval_hf_directory(saved_vit, tmp_path, capsys):
    from leanvit.cli import main
    _, path = saved_vit
    out_json = tmp_path / "r.json"
    code = main(["eval", "--model", f"hf:{path}", "--data", str(CIFAR), "--split", "test", "--method", "tome",
                 "--opt", "r=4", "--limit", "8", "--batch-size", "4", "--workers", "0", "--json", str(out_json)])
    err = capsys.readouterr().err
    assert code == 0, err
    result = json.loads(out_json.read_text())
    assert result["n_images"] == 8 and result["gmacs"] < result["dense"]["gmacs"]


def test_adapted_model_is_a_runner():
    model = randomized(FAMILIES["clip-projection"]())
    f = leanvit.adapt(model, "tome", r=4)
    assert isinstance(f, DropInLeanViT)
    again = leanvit.adapt(f, "evit", keep_rate=0.7)  # re-adapting keeps the conversion
    with torch.no_grad():
        assert again(pixel_values=pixels()).image_embeds.shape == (3, 32)
