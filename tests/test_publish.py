"""Model cards: one layout for every shipped file (tools/publish.py, a maintainers' tool outside the library)."""
import json
import sys
from pathlib import Path

import pytest
import torch

import leanvit
from leanvit.training import export_weights

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from publish import markdown_table, model_card, publish_rl4evit, trained_on, untouched_images, write_card  # noqa: E402


def test_markdown_table_and_card_layout(tmp_path):
    t = markdown_table(["a", "b"], "lr", [("x", 1), ("y", 2)])
    assert t.splitlines() == ["| a | b |", "|---|---:|", "| x | 1 |", "| y | 2 |"]
    card = model_card("m", "about it", "import leanvit", "numbers", "commands")
    heads = [line for line in card.splitlines() if line.startswith("#")]
    assert heads == ["# m", "## Measured", "## How it was trained (2-core x86_64 VM, no GPU)"]
    assert "```python\nimport leanvit\n```" in card
    path = write_card("m", card, zoo=tmp_path)
    assert path.read_text() == card and not list(tmp_path.glob("*.tmp"))


def _policy_run(tmp_path, model, seed: int, keep_bias: float, hidden=(16,)):
    """A result folder of benchmarks/rl4evit_v2.sh: an untrained policy biased toward keeping
    (``keep_bias`` > 0) or pruning, its training config on the tests' CIFAR split, its test sweep."""
    from conftest import CIFAR
    run = tmp_path / f"run{seed}"
    (run / "sweep").mkdir(parents=True)
    torch.manual_seed(seed)
    f = leanvit.adapt(model, "rl4evit", hidden=list(hidden))
    with torch.no_grad():
        f.method.actor[-1].weight.mul_(0.1)
        f.method.actor[-1].bias.copy_(torch.tensor([0.0, keep_bias]))
    export_weights(f.method, run / "policy.safetensors", metadata=f.method.options_metadata())
    ppo = dict(epochs=15, lr_actor=5e-5, lr_critic=5e-5, clip=0.2, entropy_coef=0.01, gamma=0.99, lam=0.95)
    config = dict(model="cifar10_vit12_w128", data=str(CIFAR), train_split="train", eval_split="holdout",
                  limit_train=200, limit_eval=100, seed=seed, options={"agents": "multi", "hidden": list(hidden)},
                  budget=0.7, beta=1.0, reward="correct", r2_to="kept", epochs=4, batch_size=64,
                  out=f"runs/x{seed}", ppo=ppo)
    (run / "train_metrics.json").write_text(json.dumps(dict(config=config, steps=12, gmacs_ratio=0.71,
                                                            history=[dict(elapsed_s=600)])))
    (run / "match.json").write_text(json.dumps(dict(mean_tokens=[65.0] * 3 + [40.0] * 3 + [30.0] * 3 + [20.0] * 3,
                                                    n_images=2000)))
    row = dict(method="rl4evit", n_images=10000, top1=74.0 + seed, delta_top1=-1.47, delta_top1_ci95=[-1.8, -1.1],
               agreement=90.0, kl_to_dense=0.04, kl_to_dense_ci95=[0.038, 0.042], gmacs=0.125,
               random_floor=dict(kl_to_dense=0.01), vs_random_floor=dict(kl_to_dense=0.03, kl_to_dense_ci95=[0.028, 0.032]))
    (run / "sweep" / "results.json").write_text(json.dumps(dict(dense=dict(top1=75.47, gmacs=0.1777),
                                                                date="2026-12-06", rows=[row])))
    return run


def test_rl4evit_policy_is_chosen_on_training_images_no_run_read(tmp_path):
    """publish_rl4evit compares the candidate policies on class-balanced training images that none
    of them trained or calibrated on, ships the one closest to dense (a byte copy) and writes its
    card from its own test sweep."""
    model = leanvit.load_model("cifar10_vit12_w128")
    zoo = tmp_path / "zoo"
    zoo.mkdir()
    prunes, keeps = _policy_run(tmp_path, model, 0, -3.0), _policy_run(tmp_path, model, 1, 3.0)
    record = tmp_path / "ship.json"
    out = publish_rl4evit([str(prunes), str(keeps)], zoo=zoo, holdout_images=100, record=str(record))
    assert json.loads(record.read_text()) == json.loads(json.dumps(out))
    kl = {k: v["kl_to_dense"] for k, v in out["results"].items() if k != "dense"}
    assert kl[str(keeps)] < kl[str(prunes)] and out["chosen"] == str(keeps)  # keeping more: closer to dense
    shipped = zoo / "cifar10_vit12_w128.rl4evit.safetensors"
    assert shipped.read_bytes() == (keeps / "policy.safetensors").read_bytes()
    # the images of the choice: none that either run read, 10 of each class
    configs = [json.loads((r / "train_metrics.json").read_text())["config"] for r in (prunes, keeps)]
    held = untouched_images(configs[0]["data"], configs, 100, None)
    assert not set(held.paths) & (trained_on(configs[0]) | trained_on(configs[1]))
    assert len(trained_on(configs[0])) == 300 and sorted(set(held.targets)) == list(range(10))
    assert all(held.targets.count(c) == 10 for c in range(10))
    card = (zoo / "cifar10_vit12_w128.rl4evit.md").read_text()
    from conftest import CIFAR
    assert f"**Top-1 on the test split of `{CIFAR}`, 10000 images: 75.00%** (dense 75.47%" in card
    assert "Chosen and shipped by `benchmarks/archive/rl4evit_publish.sh`" in card
    assert "Random tokens kept at its own per-image counts, on the same images, are closer" in card
    assert "KL - floor +0.0300\n  [+0.0280, +0.0320]" in card and "(0.703 of dense 0.1777" in card
    assert "--opt agents=multi --opt hidden=[16]" in card and "--budget 0.7" in card and f"**{keeps}** (shipped)" in card


def test_held_out_images_are_the_same_on_every_read():
    """A cluttered training split draws new placements on every read; the images where candidates
    are compared must not, so that the choice can be repeated."""
    from conftest import CIFAR
    held = untouched_images(f"cluttered:{CIFAR}", [], 20, None)
    first = [held[i] for i in range(len(held))]
    for (img, label, box), (again, label2, box2) in zip(first, (held[i] for i in range(len(held)))):
        assert label == label2 and torch.equal(box, box2) and list(img.getdata()) == list(again.getdata())
    assert len({tuple(b.tolist()) for _, _, b in first}) > 1


def test_rl4evit_policy_replaces_the_previous_only_if_better_on_held_out(tmp_path):
    """With the previously shipped policy given, only candidates better than it on the held-out
    images compete: no further from dense at no more GMACs (strictly better in one). Without one,
    nothing is shipped, the record says so and the error names the previous policy."""
    model = leanvit.load_model("cifar10_vit12_w128")
    zoo = tmp_path / "zoo"
    zoo.mkdir()
    small = _policy_run(tmp_path, model, 0, 30.0)  # keeps every token
    big = _policy_run(tmp_path, model, 1, 30.0, hidden=(64,))  # keeps every token too, with a dearer actor
    prunes = _policy_run(tmp_path, model, 2, -3.0)
    shipped, record = zoo / "cifar10_vit12_w128.rl4evit.safetensors", tmp_path / "ship.json"

    def before(run):
        return "before", run / "policy.safetensors", json.loads((run / "train_metrics.json").read_text())["config"]

    # prunes is further from dense than big, at fewer GMACs: not better; small is as close at fewer GMACs
    out = publish_rl4evit([str(prunes), str(small)], zoo=zoo, holdout_images=100, previous=before(big),
                          record=str(record))
    res = out["results"]
    assert res[str(small)]["kl_to_dense"] == res["before"]["kl_to_dense"]  # every token kept by both
    assert res[str(small)]["gmacs"] < res["before"]["gmacs"] and res[str(prunes)]["gmacs"] < res["before"]["gmacs"]
    assert res[str(prunes)]["kl_to_dense"] > res["before"]["kl_to_dense"]
    assert out["better_than_previous"] == [str(small)] and out["chosen"] == str(small)
    assert shipped.read_bytes() == (small / "policy.safetensors").read_bytes()
    card = (zoo / "cifar10_vit12_w128.rl4evit.md").read_text()
    assert ('closest to the dense model there (lowest mean KL) among those better than the policy shipped before '
            '(no further from dense at no more GMACs: 1 of the 2 runs):') in card
    assert "| the policy shipped before |" in card and "| before |" not in card
    with pytest.raises(ValueError, match=r"no candidate is better than before on the held-out images .* nothing shipped"):
        publish_rl4evit([str(prunes), str(big)], zoo=zoo, holdout_images=100, previous=before(small),
                        record=str(record))
    out = json.loads(record.read_text())
    assert out["better_than_previous"] == [] and out["chosen"] is None
    assert shipped.read_bytes() == (small / "policy.safetensors").read_bytes()  # untouched


def _selector_run(tmp_path, model, seed: int, keep_bias: float):
    """A train-selector folder: an untrained prune selector biased toward keeping (``keep_bias`` > 0)
    or pruning, and its metrics with the training config on the tests' CIFAR split."""
    from conftest import CIFAR
    run = tmp_path / f"selector{seed}"
    run.mkdir()
    torch.manual_seed(seed)
    options = {"strategy": "prune", "channels": False}
    f = leanvit.adapt(model, "prance", **options)
    with torch.no_grad():
        f.method.selector.actor[-1].weight.mul_(0.01)
        f.method.selector.actor[-1].bias.fill_(keep_bias)
    export_weights(f.method, run / "selector.safetensors", metadata=f.method.options_metadata())
    config = dict(model="cifar10_vit12_w128", data=str(CIFAR), train_split="train", eval_split="holdout",
                  limit_train=200, limit_eval=100, seed=seed, options=options, budget=0.5)
    (run / "metrics.json").write_text(json.dumps(dict(config=config, steps=100, gmacs_ratio=0.51, budget_met=True,
                                                      cost_weight=0.01, history=[dict(elapsed_s=600)])))
    return run


def test_prance_ships_the_meta_network_and_the_selector_chosen_on_held_out_training_images(tmp_path):
    """publish_prance writes the meta-network (fp16) and, of the candidate selectors, the one
    closest to dense on training images no selector read, with the choice recorded and the card's
    numbers measured on the shipped files."""
    from conftest import CIFAR
    from publish import publish_prance
    model = leanvit.load_model("cifar10_vit12_w128")
    meta = tmp_path / "meta"
    meta.mkdir()
    export_weights(model, meta / "final.safetensors")
    # as the benchmark scripts commit it: the run's metrics.json copied as train_metrics.json
    (meta / "train_metrics.json").write_text(json.dumps(dict(epochs_done=2, history=[
        dict(epoch=e, top1_smallest=70.0, top1_middle=74.0, top1=75.0, elapsed_s=60.0 * e) for e in (0, 1, 2)])))
    prunes, keeps = _selector_run(tmp_path, model, 0, -4.0), _selector_run(tmp_path, model, 1, 4.0)
    zoo, record = tmp_path / "zoo", tmp_path / "ship.json"
    out = publish_prance(str(meta), [str(prunes), str(keeps)], str(CIFAR), name="m_prance", zoo=zoo,
                         holdout_images=100, record=str(record), shipped_by="the test")
    kl = {k: v["kl_to_dense"] for k, v in out["results"].items() if k != "dense"}
    assert kl[str(keeps)] < kl[str(prunes)] and out["chosen"] == str(keeps)  # keeping more: closer to dense
    assert (zoo / "m_prance.prance.safetensors").read_bytes() == (keeps / "selector.safetensors").read_bytes()
    assert json.loads(record.read_text())["chosen"] == str(keeps)
    assert out["test"]["smallest"]["gmacs"] < out["test"]["middle"]["gmacs"] < out["test"]["largest (dense)"]["gmacs"]
    card = (zoo / "m_prance.md").read_text()
    assert f"**{keeps}** (shipped)" in card and "`strategy=prune channels=False`" in card
    assert "Shipped by `the test`" in card and "1,000 test images" in card
    # the fp16 meta-network, as users load it, is the model it was made from
    shipped = leanvit.create_model("cifar10_vit12_w128", checkpoint=str(zoo / "m_prance.safetensors"))
    assert torch.allclose(shipped.head.weight, model.head.weight.half().float())
