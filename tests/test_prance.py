"""PRANCE: elastic meta-network, per-image bucketed execution, Result-to-Go rewards, budget control."""
import copy
import math
import json
import os
import shutil
import subprocess
from dataclasses import replace

import pytest
import torch

import leanvit
from leanvit.evaluate import kl_per_image
from leanvit.elastic import reorder_by_importance
from leanvit.methods.prance import StageChoice
from leanvit.rl import BudgetController, calibrate
from leanvit.train_prance import SelectorConfig, rollout_tensors, stage_rewards, train_selector

from conftest import CIFAR, images, small_vit
from test_flops import measured_macs

STRATEGIES = ["prune", "merge", "prune-merge", "none"]
TINY_KI, TINY_KP, TINY_IMAGES = 0.2, 0.5, 512  # budget control on the tiny untrained model


def spread(runner, scale=30.0, seed=0):
    """Make the random selector's choices differ strongly between images."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        last = runner.method.selector.actor[-1]
        last.weight.copy_(torch.randn(last.weight.shape, generator=g) * scale / last.weight.shape[1] ** 0.5)
    return runner


def test_largest_subnetwork_equals_the_model():
    m = small_vit(sharp=3.0)
    x = images(4)
    meta = reorder_by_importance(copy.deepcopy(m))
    f = leanvit.adapt(meta, "prance", subnet="largest")
    torch.testing.assert_close(f(x), m(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_selector_choosing_everything_full_is_the_model(strategy):
    m = small_vit(sharp=3.0)
    f = leanvit.adapt(m, "prance", strategy=strategy)
    with torch.no_grad():  # every action at 1: all heads, all neurons, keep ratio 1.0
        f.method.selector.actor[-1].weight.zero_()
        f.method.selector.actor[-1].bias.fill_(20.0)
    x = images(3)
    torch.testing.assert_close(f(x), m(x), rtol=1e-4, atol=1e-5)
    assert leanvit.count_macs(f, x) == pytest.approx(leanvit.count_macs(m, x) + 3 * f.method.selector_macs() / 1e9)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_packed_batch_equals_one_image_at_a_time(strategy, device):
    """Images that chose different widths and keep ratios run as one packed batch (one record per
    block, not per group); the result equals running each image alone."""
    f = spread(leanvit.adapt(small_vit(sharp=3.0).to(device), "prance", strategy=strategy))
    base = images(5, seed=3).to(device)
    x = torch.cat([base, base[:3]])
    with torch.inference_mode(), f.tracing() as trace:
        batched = f(x)
    last = [rec for rec in trace if rec.get("layer") == f.method.bounds[-1] - 1]
    assert len(last) == 1 and len(set(last[0]["heads"].tolist())) > 1  # one batch, several widths
    if strategy != "none":
        assert len(set(last[0]["mlp_tokens"].tolist())) > 1  # and several token counts
    alone = torch.cat([f(x[i:i + 1]) for i in range(x.shape[0])])
    torch.testing.assert_close(batched, alone, rtol=0, atol=1e-5)
    per_image = [leanvit.count_macs(f, x[i:i + 1]) for i in range(x.shape[0])]
    assert leanvit.count_macs(f, x) == pytest.approx(sum(per_image) / len(per_image), rel=1e-9)


@pytest.mark.parametrize("strategy", ["prune", "merge", "prune-merge"])
def test_analytic_macs_equal_measured(strategy):
    f = spread(leanvit.adapt(small_vit(sharp=3.0), "prance", strategy=strategy))
    x = images(4)
    analytic = leanvit.count_macs(f, x, padded=True) * 1e9  # what ran: attention pads its groups
    measured = measured_macs(f, x)
    # the rest is scoring and the merge similarities (not GMACs, as in the papers), computed for
    # the batch's widest destination set
    assert measured == pytest.approx(analytic, rel=0.025)
    assert leanvit.count_macs(f, x) * 1e9 < analytic
    assert analytic < leanvit.count_macs(small_vit(), x) * 1e9


def test_keep_ratios_compound_and_widths_are_sliced():
    f = leanvit.adapt(small_vit(sharp=3.0), "prance", strategy="prune")
    f.method.fixed = StageChoice(heads=2, hidden=128, keep=0.5)
    with torch.inference_mode(), f.tracing() as trace:
        f(images(2))
    mlp = {rec["layer"]: int(rec["mlp_tokens"][0]) for rec in trace}
    assert [mlp[i] - 1 for i in (2, 3, 6, 9)] == [64, 32, 16, 8]  # floor(0.5 * N) per stage
    assert {int(h) for rec in trace if rec["layer"] >= 3 for h in rec["heads"]} == {2}
    assert {int(h) for rec in trace if rec["layer"] >= 3 for h in rec["hidden"]} == {128}
    assert {rec["heads"] for rec in trace if rec["layer"] < 3} == {None}  # full width

    f = leanvit.adapt(small_vit(sharp=3.0), "prance", strategy="prune-merge")
    f.method.fixed = StageChoice(heads=4, hidden=256, keep=0.5, merge=0.5)
    with torch.inference_mode(), f.tracing() as trace:
        f(images(2))
    assert [int(rec["mlp_tokens"][0]) - 1 for rec in trace if rec["layer"] in (3, 6, 9)] == [16, 4, 1]


def test_options_are_checked():
    m = small_vit()
    with pytest.raises(leanvit.OptionError, match="strategy must be"):
        leanvit.adapt(m, "prance", strategy="drop")
    with pytest.raises(leanvit.OptionError, match="subnet must be"):
        leanvit.adapt(m, "prance", subnet="huge")
    with pytest.raises(leanvit.OptionError, match="nothing to decide"):
        leanvit.adapt(m, "prance", strategy="none", channels=False)
    with pytest.raises(leanvit.OptionError, match="stages"):
        leanvit.adapt(small_vit(depth=3), "prance", stages=4)


def test_random_choices_are_uniform_per_image_seeded_and_free():
    """random=true: no selector runs (no MACs for it), every image and stage draws its own widths
    and keep ratio (several per batch), the same seed the same draws; a batch equals its images alone
    when each image draws what it drew in the batch (the floor replays those draws)."""
    from leanvit.bench import Floor
    m = small_vit(sharp=3.0)
    x = images(16, seed=5)
    f = leanvit.adapt(m, "prance", random=True, seed=3)
    with torch.inference_mode(), f.tracing() as trace:
        out = f(x)
    assert not any(rec["layer"] is None for rec in trace)  # no selector MACs noted
    later = [rec for rec in trace if rec["layer"] in f.method.bounds[1:-1]]
    assert all(len(set(rec["heads"].tolist())) > 1 and len(set(rec["hidden"].tolist())) > 1 for rec in later)
    assert len({tuple(rec["mlp_tokens"].tolist()) for rec in later}) == len(later)  # counts differ by stage
    with torch.inference_mode():
        again = leanvit.adapt(m, "prance", random=True, seed=3)(x)
        other = leanvit.adapt(m, "prance", random=True, seed=4)(x)
        assert torch.equal(out, again) and not torch.allclose(out, other)
        replay = leanvit.LeanViT(m, Floor(trace, f.method.position))  # same per-image counts and widths
        assert leanvit.count_macs(replay, x) == pytest.approx(leanvit.count_macs(leanvit.adapt(m, "prance", random=True, seed=3), x))
    for bad, match in ((dict(random="yes"), "random must be"), (dict(random=True, subnet="middle"), "no weights")):
        with pytest.raises(leanvit.OptionError, match=match):
            leanvit.adapt(m, "prance", **bad)


def test_result_to_go_rewards_hand_made():
    # 2 decisions, 3 images. Image 0: dense right, finished network right then wrong.
    correct = torch.tensor([[True, True, False], [False, True, False]])
    dense = torch.tensor([True, False, True])
    macs = torch.tensor([[0.8, 0.9, 0.5], [0.6, 0.7, 0.4]])
    kept = torch.tensor([[0.5, 1.0, 0.5], [0.25, 1.0, 0.25]])
    r = stage_rewards(correct, dense, macs, kept, cost_weight=0.5, token_weight=0.2)
    expect = torch.tensor([[1 - 0.4 - 0.05, 1 - 0.45 - 0.1, 0 - 0.25 - 0.05],
                           [0 - 0.3 - 0.025, 1 - 0.35 - 0.1, 0 - 0.2 - 0.025]])
    torch.testing.assert_close(r, expect)
    # the fidelity reward replaces the accuracy term by exp(-KL to dense), the costs stay
    fidelity = torch.tensor([[1.0, 0.5, 0.25], [0.75, 1.0, 0.0]])
    r = stage_rewards(correct, dense, macs, kept, cost_weight=0.5, token_weight=0.2, fidelity=fidelity)
    torch.testing.assert_close(r, fidelity - 0.5 * (macs + 0.2 * kept))


def test_rollout_records_every_image_at_every_decision(device):
    f = spread(leanvit.adapt(small_vit(sharp=3.0).to(device), "prance", strategy="prune"))
    m = f.method
    x = images(6).to(device)
    labels = torch.arange(6, device=device) % 10
    m.sampling = True
    with torch.no_grad():
        out = f(x)
    ro = rollout_tensors(m.rollout, 6, m.n_stages, m.dense_block_macs(f), labels)
    assert ro["features"].shape[:2] == (3, 6) and ro["actions"].shape == (3, 6, m.action_dim)
    assert (ro["macs_ratio"] > 0).all() and (ro["macs_ratio"] <= 1 + 1e-6).all()
    assert (ro["kept"][1:] <= ro["kept"][:-1]).all()  # keep ratios compound
    # the last decision's finished network is the network itself
    torch.testing.assert_close(ro["correct"][-1], out.argmax(1) == labels)
    # the recorded log-probabilities are those of the recorded actions
    d = m.selector.distribution(ro["features"])
    torch.testing.assert_close(d.log_prob(ro["actions"]).sum(-1), ro["logp"])
    # with the dense logits: the fidelity of every finished network; the last one's is the network's
    dense = leanvit.adapt(f.model, "none")(x)
    fid = rollout_tensors(m.rollout, 6, m.n_stages, m.dense_block_macs(f), labels, dense)["fidelity"]
    assert fid.shape == (3, 6) and ((fid > 0) & (fid <= 1 + 1e-6)).all()
    torch.testing.assert_close(fid[-1], torch.exp(-kl_per_image(dense, out)).float(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("budget", [0.3, 0.5, 0.8])
def test_budget_controller_settles_on_a_lagging_response(budget):
    """The PI controller against a stand-in selector whose GMACs ratio drifts, a fifth of the
    way per batch, toward 0.6 - 3 x cost weight (clipped to [0.2, 1]): it settles within 2% of
    any budget it can reach with a non-negative weight (below 0.6); above, the weight stays at 0
    (compute is never rewarded) and the ratio at the selector's own 0.6."""
    control = BudgetController(budget, ki=0.02, kp=0.1)
    ratio, seen, weights = 0.6, [], []
    for _ in range(150):
        target = min(max(0.6 - 3 * control.cost_weight, 0.2), 1.0)
        ratio += 0.2 * (target - ratio)
        weights.append(control.update(ratio))
        seen.append(ratio)
    reachable = budget < 0.6
    assert all(abs(r / (budget if reachable else 0.6) - 1) < 0.02 for r in seen[-30:])
    assert min(weights) >= 0 and (control.cost_weight > 0) == reachable
    # the first step answers at once, in the right direction
    first = BudgetController(budget, ki=0.02, kp=0.1)
    assert (first.update(0.6) > 0) == reachable


def test_budget_is_met_on_a_tiny_model(tmp_path, monkeypatch):
    """Real selector training on a small untrained ViT with a budget far above where the selector
    starts: the controlled cost weight stays at 0 (it never rewards compute), and the calibration
    brings the trained selector's mean GMACs on the evaluation images within 5% of the budget.
    Resuming a finished run changes nothing."""
    from leanvit.rl import PPOConfig
    cfg = SelectorConfig(model="vit12_convstem_w96_cifar", out=str(tmp_path), data=str(CIFAR),
                         options=dict(strategy="prune"), budget=0.8, dual_lr=TINY_KI, dual_p=TINY_KP, epochs=1,
                         batch_size=32, limit_train=TINY_IMAGES, limit_eval=32, workers=0,
                         ppo=PPOConfig(gamma=0.9, lam=0.9, epochs=4, lr_actor=3e-3, lr_critic=5e-3))
    weights = []
    update = BudgetController.update
    monkeypatch.setattr(BudgetController, "update", lambda self, r: weights.append(update(self, r)) or weights[-1])
    m = train_selector(cfg, log=lambda s: None)
    assert m["budget_met"], (m["gmacs_ratio"], m["history"])
    # the selector starts near 0.53 of dense: the weight stays at 0, and the calibration lifts it
    assert min(weights) == 0 and "calibration_shift" in m["history"][-1]
    torch.manual_seed(cfg.seed)  # the random-weight model the training ran on (it seeds before building it):
    # the file records that model and loads on no other
    f = leanvit.adapt(leanvit.create_model("vit12_convstem_w96_cifar"), "prance",
                      weights=str(tmp_path / "selector.safetensors"))
    assert f.method.strategy == "prune" and f.method.selector.log_std.shape == (f.method.action_dim,)
    again = train_selector(cfg, log=lambda s: None)
    assert again["history"] == m["history"] and again["cost_weight"] == m["cost_weight"]
    with pytest.raises(ValueError, match="budget must be"):
        train_selector(replace(cfg, budget=1.5), log=lambda s: None)


def test_fidelity_reward_reaches_the_rewards(tmp_path, monkeypatch):
    """``reward="kl"``: every PPO batch's Result-to-Go rewards get the finished networks' fidelity
    to dense, exp(-KL) in (0, 1], in place of the 0/1 accuracy term."""
    from leanvit import train_prance
    seen, real = [], train_prance.stage_rewards
    monkeypatch.setattr(train_prance, "stage_rewards", lambda *a: seen.append(a[6]) or real(*a))
    cfg = SelectorConfig(model="vit12_convstem_w96_cifar", out=str(tmp_path), data=str(CIFAR), reward="kl",
                         options=dict(strategy="prune"), cost_weight=0.0, epochs=1, batch_size=32,
                         limit_train=64, limit_eval=32, workers=0)
    train_selector(cfg, log=lambda s: None)
    assert len(seen) == 2 and all(f is not None and ((f > 0) & (f <= 1 + 1e-6)).all() and (f < 1).any()
                                  for f in seen)


def test_budget_not_met_trains_on_up_to_max_epochs(tmp_path):
    """A budget out of reach in one epoch: training goes on an epoch at a time up to max_epochs,
    and a resume with a larger max_epochs goes on from there."""
    from leanvit.rl import PPOConfig
    cfg = SelectorConfig(model="vit12_convstem_w96_cifar", out=str(tmp_path), data=str(CIFAR),
                         options=dict(strategy="prune"), budget=0.99, budget_tolerance=0.001, epochs=1, max_epochs=2, calibrate=False,
                         batch_size=32, limit_train=64, limit_eval=16, workers=0, ppo=PPOConfig(epochs=1))
    said = []
    m = train_selector(cfg, log=said.append)
    assert not m["budget_met"] and m["steps"] == 4 and m["epochs"] == 2
    assert sum("one more epoch" in line for line in said) == 1
    m = train_selector(replace(cfg, max_epochs=3), log=said.append)
    assert m["steps"] == 6 and [h["epoch"] for h in m["history"]] == [1, 2, 3]


def test_calibrate_bisects_to_the_budget():
    """A stand-in selector whose GMACs ratio rises in steps of 0.01 with the shift: bisection stops
    within half the tolerance; out of reach, it returns the nearest end; already in, nothing runs."""
    calls = []

    def ratio_at(s):
        calls.append(s)
        return min(max(round(0.45 + 0.08 * s, 2), 0.2), 0.95)
    shift, ratio = calibrate(ratio_at, 0.45, budget=0.6, tolerance=0.05)
    assert abs(ratio / 0.6 - 1) <= 0.025 and ratio == ratio_at(shift) and shift > 0 and len(calls) <= 13
    shift, ratio = calibrate(ratio_at, 0.45, budget=0.1, tolerance=0.05)
    assert ratio == 0.2 and shift < -3
    calls.clear()
    assert calibrate(ratio_at, 0.61, budget=0.6, tolerance=0.05) == (0.0, 0.61) and not calls


def test_missed_budget_is_met_by_calibration_on_resume(tmp_path):
    """A selector trained too briefly for its budget, without calibration, misses it; resuming the
    finished run with calibration shifts only the actor's output bias and meets it."""
    from leanvit.rl import PPOConfig
    from safetensors.torch import load_file
    cfg = SelectorConfig(model="vit12_convstem_w96_cifar", out=str(tmp_path), data=str(CIFAR),
                         options=dict(strategy="prune"), budget=0.85, epochs=1, calibrate=False,
                         batch_size=32, limit_train=64, limit_eval=32, workers=0, ppo=PPOConfig(epochs=1))
    before = train_selector(cfg, log=lambda s: None)
    assert not before["budget_met"], before["gmacs_ratio"]
    weights_before = load_file(tmp_path / "selector.safetensors")
    said = []
    after = train_selector(replace(cfg, calibrate=True), log=said.append)
    assert after["budget_met"] and after["steps"] == before["steps"] and after["epochs"] == 1
    shift = after["history"][-1]["calibration_shift"]
    assert shift > 0 and any("shifted by" in line for line in said)
    weights_after = load_file(tmp_path / "selector.safetensors")
    bias = next(k for k in weights_after if k.endswith("actor.4.bias"))
    for k, v in weights_after.items():
        expected = weights_before[k] + shift if k == bias else weights_before[k]
        torch.testing.assert_close(v, expected)
    assert train_selector(replace(cfg, calibrate=True), log=lambda s: None)["history"] == after["history"]


def test_supernet_training_reports_subnetworks_before_and_after(tmp_path):
    from leanvit.train import TrainConfig, train
    cfg = TrainConfig(model="vit12_convstem_w96_cifar", out=str(tmp_path), data=str(CIFAR), epochs=1,
                      batch_size=16, limit_train=48, limit_eval=32, workers=0, lr=1e-3, method="prance", sandwich=2)
    m = train(cfg, log=lambda s: None)
    h = m["history"]
    assert [e["epoch"] for e in h] == [0, 1] and m["steps"] == 3
    assert all(k in h[0] and k in h[1] for k in ("top1", "top1_middle", "top1_smallest"))
    assert "top1_smallest" in m and (tmp_path / "final.safetensors").is_file()
    with pytest.raises(ValueError, match="needs method 'prance'"):
        train(TrainConfig(model="vit12_convstem_w96_cifar", out=str(tmp_path / "b"), data=str(CIFAR),
                          sandwich=2), log=lambda s: None)


def test_token_maps_and_bench_handle_per_image_paths(tmp_path):
    from leanvit.bench import benchmark, format_speed_table
    from leanvit.token_maps import record_token_states, token_maps
    m = small_vit(sharp=3.0)
    f = spread(leanvit.adapt(m, "prance", strategy="prune-merge"))
    x = images(3)
    recs = record_token_states(f, x)
    assert [r.layer for r in recs] == [3, 6, 9] and all(r.source.shape[0] == 3 for r in recs)
    with torch.inference_mode(), f.tracing() as trace:
        f(x)
    last = [rec for rec in trace if rec.get("layer") == 9][0]["mlp_tokens"]
    assert recs[-1].counts().tolist() == last.tolist() and len(set(last.tolist())) > 1  # per image, one batch
    token_maps({"prance": f}, x, tmp_path / "maps.png", layers=(3, 6, 9))
    assert (tmp_path / "maps.png").stat().st_size > 0
    res = benchmark(m, [("prance", "prance", dict(strategy="prune-merge"))], x, repeats=1, progress=False)
    assert "floor_speedup" in res["methods"]["prance"] and "prance" in format_speed_table(res)
    one = benchmark(m, [("prance", "prance", dict(strategy="prune"))], x, repeats=1, progress=False, one_at_a_time=True)
    assert one["settings"]["batch_size"] == 1 and one["settings"]["images"] == 3 and "batch=1 images=3" in format_speed_table(one)


@pytest.mark.parametrize("strategy", ["prune", "merge"])
def test_floor_replays_per_image_counts_and_widths(strategy):
    """bench's floor runs every image with the method's token counts and widths, in a batch and
    one image at a time."""
    from leanvit.bench import floor_of
    f = spread(leanvit.adapt(small_vit(sharp=3.0), "prance", strategy=strategy))
    x = images(4)

    def paths(runner, batches):
        out = []
        for b in batches:
            with torch.inference_mode(), runner.tracing() as trace:
                runner(b)
            out.append([(rec["mlp_tokens"].tolist(), rec["attn_tokens"].tolist(),
                         torch.as_tensor(rec["heads"] if rec["heads"] is not None else -1).expand(len(b)).tolist(),
                         torch.as_tensor(rec["hidden"] if rec["hidden"] is not None else -1).expand(len(b)).tolist())
                        for rec in trace if rec["layer"] is not None])
        return out
    floor = floor_of(f, x)
    assert paths(floor, [x]) == paths(f, [x])
    assert paths(floor, [x[i:i + 1] for i in range(4)]) == paths(f, [x[i:i + 1] for i in range(4)])


def test_shuffled_floor_deals_a_channel_only_selectors_widths_to_other_images():
    """A channel-only selector reduces no token, so its random floor is itself; its shuffled floor
    runs the batch's per-image widths permuted over the images: the same multiset of per-image
    paths and MACs, not the same order, and other logits; evaluate's ``vs_shuffled_floor`` is the
    paired difference recomputed from those logits."""
    from leanvit.bench import Floor
    from leanvit.data import Batch
    from leanvit.evaluate import evaluate, paired_interval
    from leanvit.measure import macs_per_image
    f = spread(leanvit.adapt(small_vit(sharp=3.0), "prance", strategy="none"))
    x = images(8)

    def widths(trace):
        full = [torch.as_tensor(-1 if rec[k] is None else rec[k]).expand(len(x)).tolist()
                for rec in trace if rec["layer"] is not None for k in ("heads", "hidden")]
        return [tuple(w[i] for w in full) for i in range(len(x))]
    with torch.inference_mode():
        with f.tracing() as trace:
            out = f(x)
        macs = macs_per_image(f, trace, x)
        same = leanvit.LeanViT(f.model, Floor(trace, f.method.position))
        shuffled = leanvit.LeanViT(f.model, Floor(trace, f.method.position, shuffle=True))
        assert torch.allclose(same(x), out, atol=1e-5)  # no token chosen: the random floor is the method
        with shuffled.tracing() as shuffled_trace:
            other = shuffled(x)
        other_macs = macs_per_image(shuffled, shuffled_trace, x)
    mine, theirs = widths(trace), widths(shuffled_trace)
    assert len(set(mine)) > 2 and sorted(mine) == sorted(theirs) and mine != theirs
    # the same MACs per image, dealt to other images, less the selector's (the floor decides nothing)
    selector = torch.tensor(sorted(macs.tolist())) - torch.tensor(sorted(other_macs.tolist()))
    assert float(selector.min()) > 0 and torch.allclose(selector, selector[0]) and not torch.equal(macs - selector[0], other_macs)
    assert not torch.allclose(other, out, atol=1e-3)
    dense = leanvit.adapt(f.model, "none")
    res = evaluate({"dense": dense, "sel": f}, [Batch(x, torch.zeros(len(x), dtype=torch.long))], controls=["sel"],
                   shuffled=True)
    assert res["sel floor"].kl_to_dense == pytest.approx(res["sel"].kl_to_dense, rel=1e-4)
    with torch.inference_mode():
        ref = dense(x)
        replay = leanvit.LeanViT(f.model, Floor(trace, f.method.position, shuffle=True))(x)  # the same permutation
    kl, ci = paired_interval(kl_per_image(ref, out) - kl_per_image(ref, replay))
    assert res["sel"].vs_shuffled_floor["kl_to_dense"] == pytest.approx(kl, rel=1e-3, abs=1e-7)
    assert res["sel"].vs_shuffled_floor["kl_to_dense_ci95"] == pytest.approx(ci, rel=1e-3, abs=1e-7)
    assert res["sel shuffled floor"].gmacs == pytest.approx(res["sel floor"].gmacs, rel=1e-9)


def test_selector_weights_remember_their_options(tmp_path):
    from leanvit.training import export_weights
    f = leanvit.adapt(small_vit(), "prance", strategy="prune-merge")
    path = tmp_path / "selector.safetensors"
    export_weights(f.method, path, metadata=f.method.options_metadata())
    g = leanvit.adapt(small_vit(), "prance", strategy="prune-merge", weights=str(path))
    torch.testing.assert_close(g.method.selector.actor[0].weight, f.method.selector.actor[0].weight)
    h = leanvit.adapt(small_vit(), "prance", weights=str(path))  # the options come with the weights
    assert h.method.strategy == "prune-merge" and h.method.channels is True
    with pytest.raises(leanvit.OptionError, match="trained with strategy=prune-merge channels=true stages=4"):
        leanvit.adapt(small_vit(), "prance", strategy="prune", weights=str(path))
    with pytest.raises(leanvit.OptionError, match="cannot load selector weights"):
        leanvit.adapt(small_vit(), "prance", weights=str(tmp_path / "missing.safetensors"))


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
def test_supernet_and_selector_train_under_torchrun(tmp_path):
    """Both PRANCE trainings run data-parallel on 2 CPU processes and keep identical replicas."""
    common = ["--model", "vit12_convstem_w96_cifar", "--data", str(CIFAR), "--limit-train", "64",
              "--limit-eval", "32", "--workers", "0", "--batch-size", "16", "--epochs", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = ["torchrun", "--standalone", "--nproc_per_node", "2", "-m", "leanvit"]
    proc = subprocess.run(run + ["train-supernet", "--out", str(tmp_path / "meta")] + common,
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = json.loads((tmp_path / "meta" / "metrics.json").read_text())
    assert meta["world_size"] == 2 and meta["replica_max_abs_diff"] == 0.0 and "top1_smallest" in meta
    proc = subprocess.run(run + ["train-selector", "--out", str(tmp_path / "sel"), "--opt", "strategy=prune-merge",
                                 "--checkpoint", str(tmp_path / "meta" / "final.safetensors")] + common,
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sel = json.loads((tmp_path / "sel" / "metrics.json").read_text())
    assert sel["world_size"] == 2 and sel["steps"] == 4 and sel["replica_max_abs_diff"] == 0.0
    assert (tmp_path / "sel" / "train.log").read_text().count("done:") == 1


def test_joint_finetuning_under_a_frozen_selector(tmp_path):
    """`leanvit train --method prance --opt weights=SELECTOR`: the meta-network trains under the
    selector's per-image decisions; the selector itself does not change."""
    from leanvit.train import TrainConfig, train
    from leanvit.training import export_weights
    model = leanvit.create_model("vit12_convstem_w96_cifar")
    f = spread(leanvit.adapt(model, "prance", strategy="prune"), scale=3.0)
    export_weights(f.method, tmp_path / "sel.safetensors", metadata=f.method.options_metadata())
    cfg = TrainConfig(model="vit12_convstem_w96_cifar", out=str(tmp_path / "ft"), data=str(CIFAR), epochs=1,
                      batch_size=16, limit_train=32, limit_eval=16, workers=0, lr=1e-3, method="prance",
                      options=dict(strategy="prune", weights=str(tmp_path / "sel.safetensors")))
    m = train(cfg, log=lambda s: None)
    assert m["steps"] == 2
    from safetensors.torch import load_file
    after = load_file(str(tmp_path / "ft" / "method.safetensors"))
    for k, v in f.method.state_dict().items():
        torch.testing.assert_close(after[k], v)
    moved = load_file(str(tmp_path / "ft" / "final.safetensors"))
    assert not torch.equal(moved["blocks.5.mlp.fc1.weight"], model.state_dict()["blocks.5.mlp.fc1.weight"])


@pytest.mark.parametrize("widths", ["per-stage", "uniform"])
def test_sandwich_random_subnetworks_mix_widths_per_stage_or_not(widths):
    """The random sandwich sub-networks run other widths in different stages ('per-stage', the mixes
    the selector picks) or one width everywhere ('uniform'), as the trace of their forwards shows."""
    from types import SimpleNamespace
    from leanvit.train_prance import sandwich_step
    runner = leanvit.adapt(small_vit(sharp=3.0), "prance")
    method, bounds = runner.method, runner.method.bounds
    cfg = SimpleNamespace(seed=0, sandwich=6, label_smoothing=0.0, distill=0.0, sandwich_widths=widths)
    batch = SimpleNamespace(images=images(2), labels=torch.tensor([0, 1]))
    runs = []

    def net(x):
        with runner.tracing() as trace:
            y = runner(x)
        # per later stage: the (heads, hidden) its blocks ran with
        def first(w):
            return None if w is None else int(w[0])
        runs.append([{(first(rec["heads"]), first(rec["hidden"])) for rec in trace
                      if bounds[k] <= rec["layer"] < bounds[k + 1]} for k in range(1, len(bounds) - 1)])
        return y
    for step in range(3):
        sandwich_step(net, method, batch, cfg, None, step)
    random_runs = [r for i, r in enumerate(runs) if i % (cfg.sandwich + 1) > 1]  # not the largest, smallest
    assert len(random_runs) == 3 * (cfg.sandwich - 1)
    assert all(len(stage) == 1 for r in random_runs for stage in r)  # one width per stage
    mixed = [len({next(iter(stage)) for stage in r}) > 1 for r in random_runs]
    assert any(mixed) if widths == "per-stage" else not any(mixed)
    assert isinstance(method.fixed, StageChoice)  # left at the largest


def test_random_subnetwork_per_stage_draws_heads_and_mlp_independently():
    method = leanvit.adapt(small_vit(), "prance").method
    g = torch.Generator().manual_seed(0)
    draws = [method.random_subnetwork(g, per_stage=True) for _ in range(50)]
    assert all(len(d) == method.n_stages - 1 for d in draws)
    per_stage = {c for d in draws for c in d}
    assert {c.heads for c in per_stage} == set(method.head_options)
    assert {c.hidden for c in per_stage} == set(method.mlp_options)
    assert len({(c.heads, c.hidden) for c in per_stage}) > len(method.head_options)  # not tied to each other


# --- selector PPO: entropy bonus, value normalisation, option-count regularisation -------------------
def _rollout(f, n=16, seed=0):
    m = f.method
    m.sampling = True
    with torch.no_grad():
        f(images(n, seed=seed))
    m.sampling = False
    labels = torch.arange(n) % 10
    ro = rollout_tensors(m.rollout, n, m.n_stages, m.dense_block_macs(f), labels)
    rewards = stage_rewards(ro["correct"], torch.ones(n, dtype=torch.bool), ro["macs_ratio"], ro["kept"], 0.5, 0.25)
    return ro, rewards


def _update(f, ro, rewards, **kw):
    from leanvit.ppo import ppo_update
    from leanvit.rl import PPOConfig
    from leanvit.train_prance import SelectorAgents
    sel = copy.deepcopy(f.method.selector)
    ppo = PPOConfig(gamma=0.9, lam=0.9, epochs=kw.pop("epochs", 4), lr_actor=1e-2, lr_critic=5e-3,
                    entropy_coef=kw.pop("entropy_coef", 0.0))
    agents = SelectorAgents(sel, f.method.action_bins(), kw.pop("option_entropy", 0.0))
    opt_a = torch.optim.Adam(agents.actor_parameters(), lr=ppo.lr_actor)
    opt_c = torch.optim.Adam(agents.critic_parameters(), lr=ppo.lr_critic)
    losses = ppo_update(agents, agents.trajectories(ro, rewards), ppo, opt_a, opt_c, **kw)
    return sel, losses


def test_entropy_bonus_widens_the_action_distribution():
    f = spread(leanvit.adapt(small_vit(sharp=3.0), "prance", strategy="prune"))
    ro, rewards = _rollout(f)
    plain, _ = _update(f, ro, rewards)
    bonus, losses = _update(f, ro, rewards, entropy_coef=1.0)
    assert (bonus.log_std > plain.log_std).all()
    assert "entropy" in losses
    assert SelectorConfig(model="m", out="o").ppo.entropy_coef == 0.01  # the authors' and MAPPO's


def test_value_norm_tracks_the_returns_exactly():
    from leanvit.rl import ValueNorm
    norm, parts = ValueNorm(), [torch.randn(7, 3) * 4 + 2, torch.randn(5) * 0.5 - 1, torch.randn(11) + 3]
    for p in parts:
        norm.update(p)
    every = torch.cat([p.flatten() for p in parts]).double()
    assert float(norm.count) == every.numel()
    assert float(norm.mean) == pytest.approx(float(every.mean()), rel=1e-9)
    assert float(norm.var) == pytest.approx(float(every.var(unbiased=False)), rel=1e-9)
    x = torch.randn(4)
    torch.testing.assert_close(norm.denormalize(norm.normalize(x)), x)

    f = spread(leanvit.adapt(small_vit(sharp=3.0), "prance", strategy="prune"))
    ro, rewards = _rollout(f)
    vn = ValueNorm()
    _update(f, ro, rewards + 100.0, value_norm=vn)  # returns far from the critic's start near 0
    assert float(vn.count) == rewards.numel() and float(vn.mean) > 100  # the critic learns (value - mean) / std instead


def test_choice_marginal_entropy_counts_how_the_batch_spreads_over_options():
    from leanvit.train_prance import choice_marginal_entropy
    Normal = torch.distributions.Normal
    same = Normal(torch.full((1, 8, 1), 0.3), torch.full((1, 8, 1), 1e-3))
    spread_out = Normal(((torch.arange(8.0) + 0.5) / 8).reshape(1, 8, 1), torch.full((1, 8, 1), 1e-3))
    assert float(choice_marginal_entropy(same, (8,))) == pytest.approx(0.0, abs=1e-6)
    assert float(choice_marginal_entropy(spread_out, (8,))) == pytest.approx(math.log(8), rel=1e-4)
    # a wide Gaussian spreads even one image over the options; the end options take the tails
    wide = Normal(torch.full((1, 1, 1), 0.5), torch.full((1, 1, 1), 10.0))
    assert 0.9 * math.log(2) < float(choice_marginal_entropy(wide, (2,))) <= math.log(2) + 1e-6


def test_option_entropy_term_leaves_fewer_distinct_configurations():
    """The regularised update lowers the batch's marginal choice entropy below the plain update's, and
    the greedy selector then runs fewer distinct configurations on the batch."""
    from leanvit.measure import image_configurations
    from leanvit.train_prance import choice_marginal_entropy
    f = spread(leanvit.adapt(small_vit(sharp=3.0), "prance", strategy="prune"))
    ro, rewards = _rollout(f, n=24)
    bins = f.method.action_bins()
    assert bins == (len(f.method.head_options), len(f.method.mlp_options), 8)
    results = {}
    for coef in (0.0, 1.0):
        sel, losses = _update(f, ro, rewards, option_entropy=coef)
        assert ("option_entropy" in losses) == bool(coef)
        with torch.no_grad():
            h = float(choice_marginal_entropy(sel.distribution(ro["features"]), bins))
        g = copy.deepcopy(f)
        g.method.selector = sel
        with torch.no_grad(), g.tracing() as trace:
            g(images(24, seed=0))
        results[coef] = (h, len(set(image_configurations(trace, 24))))
    assert results[1.0][0] < results[0.0][0] - 0.05
    assert results[1.0][1] < results[0.0][1]


def test_configurations_per_image_from_the_trace():
    from leanvit.measure import image_configurations
    f = spread(leanvit.adapt(small_vit(sharp=3.0), "prance", strategy="prune"))
    x = images(6, seed=3)
    with torch.no_grad(), f.tracing() as trace:
        f(torch.cat([x, x[:2]]))
    keys = image_configurations(trace, 8)
    assert keys[6:] == keys[:2] and len(set(keys[:6])) > 1 and len(keys[0]) == 12
    f.method.fixed = StageChoice(heads=2, hidden=128, keep=0.5)
    with torch.no_grad(), f.tracing() as trace:
        f(x)
    assert len(set(image_configurations(trace, 6))) == 1


# --- selector state: the keys of the last block --------------------------------------------------
def test_keys_state_is_the_mean_key_of_the_block_before_each_stage(monkeypatch):
    m = small_vit(sharp=3.0)
    f = spread(leanvit.adapt(m, "prance", strategy="prune", state="keys"))
    method = f.method
    assert method.selector.actor[0].in_features == 64 + method.n_stages  # C + stage one-hot + left
    x = images(3)
    seen = {}
    features = method.features
    monkeypatch.setattr(method, "features", lambda state, k: seen.setdefault(k, state.plan["keys"]) is None
                        or features(state, k))
    with torch.no_grad():
        f(x)
    # stage 0 runs dense: the keys before stage 1 are those of timm's block bounds[1] - 1
    last = method.bounds[1] - 1
    inputs = {}
    hook = m.blocks[last].register_forward_pre_hook(lambda mod, args: inputs.setdefault("x", args[0]))
    with torch.no_grad():
        m(x)
        hook.remove()
        C = m.embed_dim
        k = m.blocks[last].attn.qkv(m.blocks[last].norm1(inputs["x"]))[..., C:2 * C]
    torch.testing.assert_close(seen[1], k.mean(dim=1), rtol=1e-4, atol=1e-5)
    assert set(seen) == set(range(1, method.n_stages))


def test_keys_state_packed_batch_equals_one_image_at_a_time(tmp_path):
    from leanvit.training import export_weights
    f = spread(leanvit.adapt(small_vit(sharp=3.0), "prance", strategy="prune", state="keys"))
    x = images(6, seed=3)
    with torch.inference_mode(), f.tracing() as trace:
        batched = f(x)
    assert len(set(image_configurations_of(trace, 6))) > 1
    alone = torch.cat([f(x[i:i + 1]) for i in range(x.shape[0])])
    torch.testing.assert_close(batched, alone, rtol=0, atol=1e-5)
    # the selector's weights remember the state they were trained with
    path = tmp_path / "selector.safetensors"
    export_weights(f.method, path, metadata=f.method.options_metadata())
    g = leanvit.adapt(small_vit(sharp=3.0), "prance", weights=str(path))
    assert g.method.state_kind == "keys"
    torch.testing.assert_close(g(x), batched, rtol=0, atol=1e-5)
    with pytest.raises(leanvit.OptionError, match="state=keys"):
        leanvit.adapt(small_vit(), "prance", weights=str(path), state="summary")
    with pytest.raises(leanvit.OptionError, match="state must be one of"):
        leanvit.adapt(small_vit(), "prance", state="values")


def image_configurations_of(trace, batch):
    from leanvit.measure import image_configurations
    return image_configurations(trace, batch)


def test_selector_state_option_and_its_conflict(tmp_path):
    cfg = SelectorConfig(model="vit12_convstem_w96_cifar", out=str(tmp_path), options=dict(state="summary"),
                         state="keys")
    with pytest.raises(ValueError, match="--state keys and --opt state=summary disagree"):
        train_selector(cfg, log=lambda s: None)


def test_configurations_are_checked_in_python_as_on_the_command_line():
    """A negative cost weight would reward compute: the configuration refuses it when made in
    Python, as the command line does, and so every other checked field (PPO's included)."""
    from leanvit.rl import PPOConfig
    from leanvit.train_policy import PolicyConfig
    with pytest.raises(ValueError, match="cost_weight must be a number >= 0"):
        SelectorConfig(model="m", out="o", cost_weight=-0.5)
    with pytest.raises(ValueError, match="alpha must be a number >= 0"):
        PolicyConfig(model="m", out="o", alpha=-1.0)
    with pytest.raises(ValueError, match="budget must be"):
        SelectorConfig(model="m", out="o", budget=0.0)
    with pytest.raises(ValueError, match="clip must be a number > 0"):
        PolicyConfig(model="m", out="o", ppo=PPOConfig(clip=0.0))
    assert SelectorConfig(model="m", out="o", cost_weight=0.0, budget=0.5).cost_weight == 0.0
