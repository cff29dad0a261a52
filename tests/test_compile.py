"""torch.compile of adapted models: the fixed-count methods trace as one graph (fullgraph=True, no
host synchronisation) and give the eager logits; ``why_not_static`` says which methods cannot.

The fast tests compile with the ``eager`` backend (dynamo's capture of the whole graph, without
inductor's code generation, which takes minutes on 2 cores); inductor itself runs in the slow ones."""
import pytest
import torch

from conftest import STATIC_METHODS, images, small_vit
from leanvit import adapt
from leanvit.methods import build_method

STATIC = STATIC_METHODS


def _model():
    return small_vit(depth=4, sharp=4.0)


@pytest.mark.parametrize("name", list(STATIC))
def test_fullgraph_capture_matches_eager(name, device):
    torch._dynamo.reset()
    runner = adapt(_model().to(device), name, **STATIC[name])
    x = images(4).to(device)
    with torch.no_grad():
        ref = runner(x)
        out = torch.compile(runner, fullgraph=True, backend="eager")(x)  # raises on any graph break
    assert runner.method.why_not_static() is None
    assert (out - ref).abs().max() <= 1e-5


def test_ppt_mixed_batch_compiles_and_counts(device, monkeypatch):
    """A batch where some images prune and some pool: each takes its branch inside one graph, and
    the tally (on the device) counts the same as eagerly."""
    torch._dynamo.reset()
    model = _model().to(device)
    x = images(6).to(device)
    with torch.no_grad():
        variances = []
        probe = adapt(model, "ppt", r=8, layers=(1,), threshold=1e9)
        # pick a threshold between the images' variances at layer 1, so the batch is mixed
        from leanvit.methods.base import AttentionView, lazy
        orig = AttentionView.significance.f
        monkeypatch.setattr(AttentionView, "significance",
                            lazy(lambda self: (variances.append(orig(self).var(dim=1)), orig(self))[1]))
        probe(x)
        monkeypatch.undo()
        threshold = float(variances[0].median())
    eager = adapt(model, "ppt", r=8, layers=(1, 2), threshold=threshold)
    compiled_runner = adapt(model, "ppt", r=8, layers=(1, 2), threshold=threshold)
    with torch.no_grad():
        ref = eager(x)
        out = torch.compile(compiled_runner, fullgraph=True, backend="eager")(x)
    assert (out - ref).abs().max() <= 1e-5
    assert 0 < eager.method.prune_fraction()[1] < 1  # the batch was mixed
    assert compiled_runner.method.prune_fraction() == eager.method.prune_fraction()
    assert compiled_runner.method.tally.device.type == device.type


@pytest.mark.parametrize("name, options", [("ats", {}), ("random", dict(layers=(1,)))])
def test_per_image_methods_say_why_and_break_the_graph(name, options):
    torch._dynamo.reset()
    runner = adapt(_model(), name, **options)
    assert runner.method.why_not_static()
    with torch.no_grad(), pytest.raises(Exception):
        torch.compile(runner, fullgraph=True, backend="eager")(images(2))


def test_why_not_static_of_every_method():
    static = {n: build_method(n, **STATIC[n]) for n in STATIC}
    model = _model()
    for name, method in static.items():
        assert adapt(model, method).method.why_not_static() is None, name
    for name, options in (("ats", {}), ("rl4evit", dict(layers=(1, 2)))):
        assert "per-image" in adapt(model, name, **options).method.why_not_static()
    dyn = adapt(model, "dynamicvit", layers=(1, 2))
    assert dyn.method.why_not_static() is None  # inference: a fixed top-k per stage
    dyn.train()
    assert "training" in dyn.method.why_not_static()


def test_dynamicvit_inference_is_static():
    torch._dynamo.reset()
    runner = adapt(_model(), "dynamicvit", layers=(1, 2))
    with torch.no_grad():
        ref = runner(images(3))
        out = torch.compile(runner, fullgraph=True, backend="eager")(images(3))
    assert (out - ref).abs().max() <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("name", list(STATIC))
def test_inductor_matches_eager(name, device):
    """torch.compile with its default backend (inductor): the compiled runner's logits."""
    torch._dynamo.reset()
    runner = adapt(_model().to(device), name, **STATIC[name])
    with torch.no_grad():
        compiled = torch.compile(runner, fullgraph=True)
        for batch in (4, 2):
            x = images(batch).to(device)
            assert (compiled(x) - runner(x)).abs().max() <= 1e-5
