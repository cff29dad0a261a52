"""Evaluation: fidelity to dense (agreement, KL, paired interval), unbiased runner order,
provenance in every result JSON."""
import hashlib
import json

import pytest
import torch

import leanvit
from leanvit.cli import main
from leanvit.data import EMBEDDED_CIFAR10, eval_transform, load_dataset, make_loader
from leanvit.evaluate import evaluate, kl_per_image, paired_delta
from leanvit.report import format_sweep_table


def test_paired_delta_by_hand():
    ref = torch.tensor([1, 1, 0, 0, 1, 0, 1, 1], dtype=torch.bool)
    new = torch.tensor([1, 0, 1, 0, 1, 0, 0, 1], dtype=torch.bool)
    delta, (lo, hi) = paired_delta(new, ref)
    d = torch.tensor([0, -1, 1, 0, 0, 0, -1, 0], dtype=torch.float64)  # per-image differences
    half = 100 * 1.96 * float(d.std()) / 8 ** 0.5
    assert delta == pytest.approx(-12.5) and lo == pytest.approx(-12.5 - half) and hi == pytest.approx(-12.5 + half)
    same, ci = paired_delta(ref, ref)
    assert same == 0 and ci == [0, 0]


def test_kl_per_image_by_hand():
    p = torch.tensor([[0.7, 0.2, 0.1]], dtype=torch.float64)
    q = torch.tensor([[0.5, 0.25, 0.25]], dtype=torch.float64)
    expected = float((p * (p / q).log()).sum())
    assert float(kl_per_image(p.log(), q.log())) == pytest.approx(expected, rel=1e-9)
    assert float(kl_per_image(q.log() + 3.0, q.log())) == pytest.approx(0.0, abs=1e-12)  # logits, not probs


def test_eval_json_fidelity_matches_a_recomputation(tmp_path, capsys):
    """`eval --json` has agreement, kl_to_dense, delta_top1 and its interval, equal to what the
    logits of dense and the method on the same images give; and its provenance names the data
    and weights with their sha256."""
    out = tmp_path / "r.json"
    code = main(["eval", "--model", "cifar10_vit12_w128", "--data", "cifar10-sample", "--split", "test",
                 "--method", "evit", "--opt", "keep_rate=0.5", "--limit", "60", "--batch-size", "25",
                 "--workers", "0", "--json", str(out)])
    printed = capsys.readouterr().out
    assert code == 0 and "agree %" in printed and "KL" in printed
    r = json.loads(out.read_text())
    model = leanvit.load_model("cifar10_vit12_w128")
    ds = load_dataset(EMBEDDED_CIFAR10, split="test", transform=eval_transform(model), num_classes=10, limit=60)
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    y = torch.tensor(ds.targets)
    with torch.inference_mode():
        dense = leanvit.adapt(model, "none")(x)
        evit = leanvit.adapt(model, "evit", keep_rate=0.5)(x)
    assert r["agreement"] == pytest.approx(100 * float((dense.argmax(1) == evit.argmax(1)).double().mean()))
    kl = kl_per_image(dense, evit).double()
    assert r["kl_to_dense"] == pytest.approx(float(kl.mean()), rel=1e-4, abs=1e-7)
    half = 1.96 * float(kl.std()) / len(kl) ** 0.5  # the normal interval of the mean KL
    assert r["kl_to_dense_ci95"] == pytest.approx([float(kl.mean()) - half, float(kl.mean()) + half],
                                                  rel=1e-3, abs=1e-7)
    assert r["kl_to_dense_ci95"][0] < r["kl_to_dense"] < r["kl_to_dense_ci95"][1]
    delta, ci = paired_delta(evit.argmax(1) == y, dense.argmax(1) == y)
    assert r["delta_top1"] == pytest.approx(delta) and r["delta_top1_ci95"] == pytest.approx(ci)
    assert r["delta_top1"] == pytest.approx(r["top1"] - r["dense"]["top1"])
    assert r["kl_to_dense"] > 0 and r["dense"]["agreement"] == 100.0 and r["dense"]["kl_to_dense"] == 0.0
    assert r["speedup"] > 0 and r["speedup_iqr"][0] <= r["speedup_iqr"][1]
    p = r["provenance"]
    assert p["data"] == str(EMBEDDED_CIFAR10) and p["data_sha256"] == hashlib.sha256(
        EMBEDDED_CIFAR10.read_bytes()).hexdigest()
    assert p["weights"] == "shipped" and p["checkpoint_sha256"] == hashlib.sha256(
        open(p["checkpoint"], "rb").read()).hexdigest()
    assert p["limit"] == 60 and p["split"] == "test" and p["leanvit_version"]
    assert p["leanvit_commit"] is None or len(p["leanvit_commit"].split("+")[0]) == 40


class _Clock(torch.nn.Module):
    """A stand-in runner that records when it ran."""

    def __init__(self, name, log):
        super().__init__()
        self.name, self.log = name, log
        self.method = leanvit.build_method("none")  # a stateless method

    def forward(self, x):
        self.log.append(self.name)
        return torch.zeros(x.shape[0], 10)

    def tracing(self):
        import contextlib
        return contextlib.nullcontext([])


def test_runner_order_is_shuffled_per_batch_and_seeded(monkeypatch):
    """No runner always runs first (dense was timed first on every batch, which favoured the rest)."""
    monkeypatch.setattr("leanvit.evaluate.macs_per_image", lambda runner, trace, images: torch.zeros(images.shape[0]))
    ds = load_dataset(EMBEDDED_CIFAR10, split="test", transform=eval_transform(leanvit.load_model("cifar10_vit12_w128")),
                      limit=40)
    orders = []
    for seed in (0, 0, 1):
        log = []
        runners = {n: _Clock(n, log) for n in ("dense", "a", "b")}
        res = evaluate(runners, make_loader(ds, batch_size=2, num_workers=0), seed=seed)
        assert sorted(log[:3]) == ["a", "b", "dense"] and len(log) == 3 + 3 * 20  # one untimed warm-up each
        log = log[3:]
        orders.append([tuple(log[i:i + 3]) for i in range(0, len(log), 3)])
        assert res["a"].agreement == 100.0
    assert orders[0] == orders[1] != orders[2]  # seeded
    assert {o[0] for o in orders[0]} == {"dense", "a", "b"}  # each runner runs first on some batch
    assert all(sorted(o) == ["a", "b", "dense"] for o in orders[0])


def test_warm_up_leaves_no_trace_on_the_methods():
    """The untimed warm-up forward does not count in PPT's statistics nor move random's draws."""
    from conftest import small_vit
    ds = load_dataset(EMBEDDED_CIFAR10, split="test", transform=eval_transform(dict(input_size=(3, 32, 32))), limit=8)
    m = small_vit()
    ppt = leanvit.adapt(m, "ppt", r=4, threshold="scaled")
    rnd = leanvit.adapt(m, "random", keep_rate=0.5)
    evaluate({"dense": leanvit.adapt(m, "none"), "ppt": ppt, "random": rnd},
                   make_loader(ds, batch_size=4, num_workers=0))
    assert ppt.method.seen_counts == {3: 8, 6: 8, 9: 8}  # the 8 images, not 8 + the warm-up's 4
    fresh = leanvit.adapt(m, "random", keep_rate=0.5)
    with torch.no_grad():
        for batch in make_loader(ds, batch_size=4, num_workers=0):  # the two timed forwards, alone
            fresh(batch.images)
    assert torch.equal(fresh.method.generator.get_state(), rnd.method.generator.get_state())


def test_table_marks_significant_differences():
    dense = dict(method="dense", top1=80.0, gmacs=1.0, images_per_second=10.0)
    rows = [dict(method="x", label="a", top1=78.0, gmacs=0.5, images_per_second=20.0, agreement=90.0,
                 kl_to_dense=0.02, delta_top1_ci95=[-3.0, -1.0], speedup=2.0),
            dict(method="y", label="b", top1=79.8, gmacs=0.5, images_per_second=20.0, agreement=99.0,
                 kl_to_dense=0.001, delta_top1_ci95=[-0.5, 0.1], speedup=1.9)]
    table = format_sweep_table(rows, dense)
    assert "-2.00*" in table and "-0.20 " in table and "90.00" in table and "0.0200" in table and "1.90x" in table
    assert "paired 95% interval" in table


def test_random_floor_is_random_tokens_at_the_method_counts():
    """``controls``: the floor of a method is random tokens at its traced per-image counts, on the
    same images; its ``vs_random_floor`` equals the paired differences recomputed from the logits,
    and a method that keeps every token has a floor equal to itself."""
    from conftest import sharpen, small_vit
    from leanvit.bench import Floor
    from leanvit.evaluate import paired_interval
    ds = load_dataset(EMBEDDED_CIFAR10, split="test", transform=eval_transform(dict(input_size=(3, 32, 32))), limit=24)
    m = sharpen(small_vit())
    runners = {"dense": leanvit.adapt(m, "none"), "evit": leanvit.adapt(m, "evit", keep_rate=0.5),
               "all": leanvit.adapt(m, "evit", keep_rate=1.0)}
    res = evaluate(runners, make_loader(ds, batch_size=24, num_workers=0), controls=["evit", "all", "dense"])
    assert "evit floor" in res and "all floor" in res and "dense floor" not in res  # the reference has none
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    y = torch.tensor(ds.targets)
    with torch.inference_mode():
        dense = runners["dense"](x)
        with runners["evit"].tracing() as trace:
            evit = runners["evit"](x)
        floor = leanvit.LeanViT(m, Floor(trace, runners["evit"].method.position))(x)
    assert res["evit floor"].gmacs == pytest.approx(res["evit"].gmacs, rel=1e-6)  # same counts, same MACs
    assert res["evit floor"].kl_to_dense == pytest.approx(float(kl_per_image(dense, floor).mean()), rel=1e-4)
    assert not torch.allclose(floor, evit, atol=1e-3)  # other tokens were kept
    v = res["evit"].vs_random_floor
    kl, kl_ci = paired_interval(kl_per_image(dense, evit) - kl_per_image(dense, floor))
    agree, agree_ci = paired_interval(100.0 * ((evit.argmax(1) == dense.argmax(1)).double()
                                               - (floor.argmax(1) == dense.argmax(1)).double()))
    top1, _ = paired_interval(100.0 * ((evit.argmax(1) == y).double() - (floor.argmax(1) == y).double()))
    assert v["kl_to_dense"] == pytest.approx(kl, rel=1e-3, abs=1e-6)
    assert v["kl_to_dense_ci95"] == pytest.approx(kl_ci, rel=1e-3, abs=1e-6)
    assert v["agreement"] == pytest.approx(agree) and v["agreement_ci95"] == pytest.approx(agree_ci)
    assert v["top1"] == pytest.approx(top1)
    same = res["all"].vs_random_floor
    assert same["kl_to_dense"] == pytest.approx(0.0, abs=1e-6) and same["agreement"] == 0.0
    assert res["dense"].vs_random_floor is None
    with pytest.raises(ValueError, match="no runner"):
        evaluate(runners, make_loader(ds, batch_size=24, num_workers=0), controls=["nope"])


def test_a_spec_on_its_own_checkpoint_is_measured_against_the_compared_dense_model(tmp_path):
    """``checkpoint=`` runs a row on a copy of the compared model with other weights (a ViT
    fine-tuned with its method): its fidelity is to the compared model's dense forward, its random
    floor runs on the same copy, and the row names the weights; the compared model is untouched."""
    from safetensors.torch import save_file
    from conftest import sharpen, small_vit
    from leanvit.evaluate import sweep
    from leanvit.options import parse_spec
    from leanvit.provenance import file_sha256
    ds = load_dataset(EMBEDDED_CIFAR10, split="test", transform=eval_transform(dict(input_size=(3, 32, 32))), limit=16)
    m = sharpen(small_vit())
    before = {k: v.clone() for k, v in m.state_dict().items()}
    other = {k: v + 0.05 * torch.randn_like(v) if k.startswith("head") else v.clone() for k, v in before.items()}
    path = tmp_path / "ft.safetensors"
    save_file(other, str(path))
    specs = [parse_spec("none"), parse_spec(f"none:checkpoint={path}"), parse_spec(f"evit:keep_rate=0.5:checkpoint={path}")]
    res = sweep(m, make_loader(ds, batch_size=16, num_workers=0), specs, random_floor=True)
    plain, own, evit = res["rows"]
    assert plain["kl_to_dense"] == pytest.approx(0.0, abs=1e-7) and "model_weights" not in plain
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    tuned = small_vit()
    tuned.load_state_dict(other)
    with torch.inference_mode():
        kl = float(kl_per_image(m.eval()(x), tuned.eval()(x)).mean())
    assert kl > 1e-4 and own["kl_to_dense"] == pytest.approx(kl, rel=1e-4)
    assert own["model_weights"]["checkpoint_sha256"] == file_sha256(path) and "model" not in own
    assert evit["random_floor"]["gmacs"] == pytest.approx(evit["gmacs"], rel=1e-6)
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())


def test_floor_table_marks_where_the_method_beats_random():
    from leanvit.report import format_floor_table
    floor = dict(top1=70.0, agreement=80.0, kl_to_dense=0.05)
    rows = [dict(method="x", label="a", random_floor=floor,
                 vs_random_floor=dict(kl_to_dense=-0.02, kl_to_dense_ci95=[-0.03, -0.01], agreement=4.0,
                                      agreement_ci95=[-1.0, 9.0], top1=1.0, top1_ci95=[-2.0, 4.0])),
            dict(method="y", label="b")]  # no floor: no line
    table = format_floor_table(rows)
    assert "-0.0200 [-0.0300, -0.0100]*" in table and "+4.00 [-1.00, +9.00] " in table and "0.0500" in table
    assert "\ny " not in table and len(table.strip().splitlines()) == 4
