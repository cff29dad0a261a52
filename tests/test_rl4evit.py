"""RL4EViT: rewards by hand, greedy inference that really removes tokens, masked == removed."""
import pytest
import torch

import leanvit
from leanvit.flops import tokens_per_block
from leanvit.methods.rl4evit import agent_rewards

from conftest import CIFAR, images, small_vit


def test_rewards_hand_made():
    # one image, 3 agents, 2 layers; layer 0: keep, prune, keep; layer 1 (agent 1 gone): keep, -, prune
    kept = torch.tensor([[[True, False, True]], [[True, False, False]]])
    alive = torch.tensor([[[True, True, True]], [[True, False, True]]])
    r = agent_rewards(kept, alive, torch.tensor([True]), alpha=0.5, beta=2.0)
    # the paper's: r2 is shared by the preserved tokens only
    # layer 0: n=2 kept -> r2 = 1/2; kept agents: 0.5*-1 + 2*0.5 = 0.5, pruned: 0
    # layer 1: n=1 -> r2 = 1; agent 0 kept: -0.5 + 2 = 1.5; agent 1 gone: 0; agent 2 pruned: 0
    assert r[:, 0].tolist() == [[0.5, 0.0, 0.5], [1.5, 0.0, 0.0]]
    wrong = agent_rewards(kept, alive, torch.tensor([False]), alpha=0.5, beta=2.0)
    assert wrong[:, 0].tolist() == [[-0.5, 0.0, -0.5], [-0.5, 0.0, 0.0]]
    # the earlier reading: every agent that acted earns r2, pruned ones included
    alive_r = agent_rewards(kept, alive, torch.tensor([True]), alpha=0.5, beta=2.0, r2_to="alive")
    assert alive_r[:, 0].tolist() == [[0.5, 1.0, 0.5], [1.5, 0.0, 2.0]]
    with pytest.raises(ValueError, match="r2_to"):
        agent_rewards(kept, alive, torch.tensor([True]), alpha=0.5, beta=2.0, r2_to="all")


def test_actor_and_critic_sizes_follow_the_width():
    f = leanvit.adapt(small_vit(), "rl4evit")  # width 64: actor 64-256-256-64-2, critic 128-256-256-64-1
    sizes = [m.weight.shape[::-1] for m in f.method.actor if isinstance(m, torch.nn.Linear)]
    assert [tuple(s) for s in sizes] == [(64, 256), (256, 256), (256, 64), (64, 2)]
    assert f.method.critic[0].normalized_shape == (128,) and f.method.critic[1].weight.shape[1] == 128
    assert any(k.startswith("method.actor.") for k in f.state_dict())  # the policy is part of the model


def _half_pruning_rl4evit(**opts):
    torch.manual_seed(3)
    f = leanvit.adapt(small_vit(sharp=4.0), "rl4evit", **opts)
    with torch.no_grad():  # bias the actor so that about half the tokens are pruned
        f.method.actor[-1].bias.copy_(torch.tensor([0.0, 0.0]))
    return f


def test_greedy_inference_removes_tokens_and_matches_masked():
    f = _half_pruning_rl4evit()
    x = images(4)
    with torch.no_grad(), f.tracing() as trace:
        gathered = f(x)
    counts = tokens_per_block(trace).tolist()
    assert counts[2] == [65] * 4  # decisions come before block 3: block 3 runs on the kept tokens
    n3 = tokens_per_block(trace, "attn_tokens")[3].tolist()
    assert all(n < 65 for n in n3) and len(set(n3)) > 1  # per image, for real
    f.masked = True
    with torch.no_grad():
        masked = f(x)
    torch.testing.assert_close(masked, gathered, rtol=1e-4, atol=1e-5)
    # greedy: the same image gives the same decision every time
    f.masked = False
    with torch.no_grad():
        torch.testing.assert_close(f(x), gathered)


def test_packed_execution_equals_one_image_at_a_time_and_masked():
    """The ragged batch runs packed (one record per block, no groups): its logits, predictions and
    per-image token counts equal those of each image alone and of masked execution, and it
    computes less than padding every image to the widest."""
    f = _half_pruning_rl4evit()
    x = images(7)
    runs = {}
    for masked in (False, True):
        f.masked = masked
        with torch.no_grad(), f.tracing() as trace:
            runs[masked] = (f(x), tokens_per_block(trace), f.last_state)
        assert [rec["layer"] for rec in trace if rec["layer"] is not None] == list(range(12))
    f.masked = False
    with torch.no_grad():
        alone = torch.cat([f(x[i:i + 1]) for i in range(7)])
    logits, counts, _ = runs[False]
    assert len(set(counts[4].tolist())) > 2  # ragged
    for other in (alone, runs[True][0]):
        torch.testing.assert_close(logits, other, rtol=0, atol=1e-5)
        assert torch.equal(logits.argmax(1), other.argmax(1))
    assert torch.equal(counts, runs[True][1])
    width = counts.max(dim=1).values.double()  # padded to the widest image at every block
    blocks = f.model.blocks
    from leanvit.flops import block_macs
    padded_everything = float(sum(block_macs(blocks[i], width[i], width[i]) for i in range(12)))
    with torch.no_grad(), f.tracing() as trace:
        f(x)
    ran = float(sum(block_macs(blocks[r["layer"]], r["attn_run"], r["mlp_run"], span=r["attn_span"]).double().mean()
                    if isinstance(r["attn_run"], torch.Tensor) else block_macs(blocks[r["layer"]], r["attn_run"], r["mlp_run"])
                    for r in trace if r["layer"] is not None))
    assert ran < padded_everything


def test_packed_token_maps_record_the_whole_batch():
    from leanvit.token_maps import record_token_states
    f = _half_pruning_rl4evit()
    recs = record_token_states(f, images(5))
    assert [r.layer for r in recs] == [2, 5, 8] and all(r.source.shape[0] == 5 for r in recs)



def test_placement_before_or_after_the_pruning_blocks():
    """placement=before (the default, the paper's) decides on block 2's output and block 3 runs on
    the kept tokens; placement=after (the old schedule) lets block 3 run on all of them; with the
    same actor the two differ by exactly one block's worth of tokens."""
    x = images(4)
    counts = {}
    for placement in ("before", "after"):
        f = _half_pruning_rl4evit(placement=placement)
        assert f.method.placement == placement
        with torch.no_grad(), f.tracing() as trace:
            f(x)
        counts[placement] = tokens_per_block(trace, "attn_tokens")
        assert list(f.method.decision_layers()) == ([2, 5, 8] if placement == "before" else [3, 6, 9])
    assert (counts["before"][:3] == 65).all() and (counts["before"][3] < 65).all()
    assert (counts["after"][:4] == 65).all() and (counts["after"][4] < 65).all()
    assert "placement=before" in repr(leanvit.adapt(small_vit(), "rl4evit").method)
    with pytest.raises(leanvit.OptionError, match="there is none before block 0"):
        leanvit.adapt(small_vit(), "rl4evit", layers=[0, 6])
    leanvit.adapt(small_vit(), "rl4evit", layers=[0, 6], placement="after")  # after block 0 is fine
    with pytest.raises(leanvit.OptionError, match="placement must be"):
        leanvit.adapt(small_vit(), "rl4evit", placement="inside")
    with pytest.raises(leanvit.OptionError, match="activation must be"):
        leanvit.adapt(small_vit(), "rl4evit", activation="gelu")


def test_options_travel_with_the_weights(tmp_path):
    """The exported policy stores its options (placement, hidden, agents, layers, activation) in
    its safetensors metadata; loading it without options rebuilds the same policy, the same logits;
    a contradicting option is refused, naming what the policy was trained with."""
    from safetensors import safe_open
    from leanvit.training import export_weights
    torch.manual_seed(0)
    f = leanvit.adapt(small_vit(sharp=4.0), "rl4evit", hidden=[32], layers=[2, 7], agents="single",
                      placement="after", activation="relu")
    path = tmp_path / "policy.safetensors"
    export_weights(f.method, path, metadata=f.method.options_metadata())
    with safe_open(str(path), "pt") as fh:
        assert fh.metadata()["placement"] == '"after"' and fh.metadata()["hidden"] == "[32]"
    g = leanvit.adapt(small_vit(sharp=4.0), "rl4evit", weights=str(path))
    m = g.method
    assert (m.layers, m.hidden, m.agents, m.placement, m.activation) == ((2, 7), [32], "single", "after", "relu")
    assert m.input_norm and isinstance(m.actor[0], torch.nn.LayerNorm) and isinstance(m.actor[2], torch.nn.ReLU)
    x = images(3)
    with torch.no_grad():
        torch.testing.assert_close(g(x), f(x), rtol=0, atol=0)
    with pytest.raises(leanvit.OptionError, match="trained with placement=after"):
        leanvit.adapt(small_vit(), "rl4evit", weights=str(path), placement="before")
    # the defaults now: LayerNorm of the input, tanh, before; PRANCE's selector, built by the same
    # mlp, keeps its ReLU and no input norm
    default = leanvit.adapt(small_vit(), "rl4evit").method
    assert isinstance(default.actor[0], torch.nn.LayerNorm) and isinstance(default.critic[0], torch.nn.LayerNorm)
    assert isinstance(default.actor[2], torch.nn.Tanh)
    assert isinstance(leanvit.adapt(small_vit(), "prance").method.selector.actor[1], torch.nn.ReLU)
    # a policy of 2026-12-02/03 stores its options but not input_norm: it had none
    old = leanvit.adapt(small_vit(sharp=4.0), "rl4evit", hidden=[32], input_norm=False)
    meta = {k: v for k, v in old.method.options_metadata().items() if k != "input_norm"}
    export_weights(old.method, tmp_path / "old.safetensors", metadata=meta)
    back = leanvit.adapt(small_vit(sharp=4.0), "rl4evit", weights=str(tmp_path / "old.safetensors")).method
    assert back.input_norm is False and isinstance(back.actor[0], torch.nn.Linear)
    with pytest.raises(leanvit.OptionError, match="trained with input_norm=False"):
        leanvit.adapt(small_vit(), "rl4evit", weights=str(tmp_path / "old.safetensors"), input_norm=True)


def test_sampling_records_a_rollout():
    f = leanvit.adapt(small_vit(), "rl4evit")
    f.masked, f.method.sampling = True, True
    with torch.no_grad():
        f(images(2))
    steps = f.method.rollout
    assert [s["layer"] for s in steps] == [2, 5, 8]  # after blocks 2, 5, 8: before 3, 6, 9
    assert steps[0]["alive"].all() and steps[0]["tokens"].shape == (2, 64, 64)
    # an agent pruned at layer 3 is not alive at layer 6
    pruned = steps[0]["action"] == 0
    assert not (steps[1]["alive"] & pruned).any()


def test_a_kept_fallback_token_is_recorded_as_kept():
    """When every agent of an image samples "prune", its most keep-inclined token is kept anyway:
    the rollout records that agent's action as keep, with keep's log-probability, so that PPO
    learns from the action that ran."""
    f = leanvit.adapt(small_vit(), "rl4evit", hidden=[8])
    with torch.no_grad():
        f.method.actor[-1].bias.copy_(torch.tensor([30.0, -30.0]))  # prune, almost surely
    f.masked, f.method.sampling = True, True
    with torch.no_grad():
        f(images(2))
    for step in f.method.rollout:
        alive, kept, action = step["alive"], step["kept"], step["action"]
        assert (kept.sum(dim=1) == 1).all()  # one token per image: the fallback
        assert torch.equal(action[alive] == 1, kept[alive])
        logits = f.method.actor(step["tokens"])
        expected = torch.distributions.Categorical(logits=logits).log_prob(action)
        torch.testing.assert_close(step["logp"][alive], expected[alive])




def test_short_policy_training_raises_the_reward(tmp_path):
    """On an untrained ViT accuracy is at chance, so the reward mostly counts kept tokens: the
    agents must learn to prune, and the mean reward must rise."""
    from leanvit.rl import PPOConfig
    from leanvit.train_policy import PolicyConfig, train_policy
    cfg = PolicyConfig(model="vit12_convstem_w96_cifar", out=str(tmp_path), data=str(CIFAR), epochs=3,
                       batch_size=32, limit_train=256, limit_eval=64, workers=0, alpha=0.8, beta=1.0,
                       options={"hidden": [64, 32]}, ppo=PPOConfig(epochs=4, lr_actor=3e-3, lr_critic=3e-3))
    m = train_policy(cfg, log=lambda s: None)
    h = m["history"]
    assert len(h) == 3 and all(e["kind"] == "agents" for e in h)
    assert h[-1]["mean_reward"] > h[0]["mean_reward"]
    assert h[-1]["keep_ratio"] < h[0]["keep_ratio"]
    assert h[-1]["gmacs"] < h[0]["gmacs"] or h[-1]["gmacs"] < 0.9 * leanvit.count_macs(
        leanvit.create_model("vit12_convstem_w96_cifar"), torch.zeros(1, 3, 32, 32))
    assert (tmp_path / "policy.safetensors").is_file()
    torch.manual_seed(cfg.seed)  # the random-weight model the training ran on: a policy loads only on it
    f = leanvit.adapt(leanvit.create_model("vit12_convstem_w96_cifar"), "rl4evit", hidden=[64, 32],
                      weights=str(tmp_path / "policy.safetensors"))
    assert f.method.actor[1].weight.shape == (64, 96)  # after the input LayerNorm


def test_accuracy_signals_by_hand():
    """γ of r2: 0/1 correct (the paper's), 0/1 agreement with the dense prediction, exp(-KL(dense || reduced))."""
    import math
    from leanvit.train_policy import accuracy_signal
    logits = torch.log(torch.tensor([[0.5, 0.5], [0.9, 0.1], [0.2, 0.8]]))
    dense = torch.log(torch.tensor([[0.5, 0.5], [0.2, 0.8], [0.4, 0.6]]))
    labels = torch.tensor([0, 1, 1])
    assert accuracy_signal("correct", logits, labels).tolist() == [1.0, 0.0, 1.0]  # ties: argmax picks 0
    assert accuracy_signal("agreement", logits, labels, dense).tolist() == [1.0, 0.0, 1.0]
    kl = [0.0, 0.2 * math.log(0.2 / 0.9) + 0.8 * math.log(0.8 / 0.1), 0.4 * math.log(0.4 / 0.2) + 0.6 * math.log(0.6 / 0.8)]
    assert accuracy_signal("kl", logits, labels, dense).tolist() == pytest.approx([math.exp(-k) for k in kl], rel=1e-5)
    # the rewards take it as they took correctness: r2 = γ / n
    kept = torch.ones(1, 3, 2, dtype=torch.bool)
    r = agent_rewards(kept, kept, torch.tensor([1.0, 0.5, 0.0]), alpha=0.0, beta=1.0)
    assert r[0, :, 0].tolist() == [0.5, 0.25, 0.0]


@pytest.mark.parametrize("agents, reward", [("multi", "kl"), pytest.param("single", "agreement", marks=pytest.mark.slow)])
def test_budget_is_met_with_the_actor_counted(tmp_path, agents, reward):
    """train-policy --budget on a small untrained ViT (both agent kinds, the dense-model rewards):
    alpha, PI-controlled and never negative, and then the keep-logit calibration on the held-out
    images bring the greedy policy within 5% of 0.5 x dense GMACs, the actor's MACs included
    (reported as decision_gmacs); every batch is in metrics.json's curve and in curves.png; the
    policy's options are in its file. Resuming the finished run changes nothing."""
    import json
    from leanvit.rl import PPOConfig
    from leanvit.train_policy import PolicyConfig, train_policy
    cfg = PolicyConfig(model="vit12_convstem_w96_cifar", out=str(tmp_path), data=str(CIFAR), epochs=1,
                       batch_size=32, limit_train=64, limit_eval=48, workers=0, budget=0.5, reward=reward,
                       options={"hidden": [32], "agents": agents}, ppo=PPOConfig(epochs=2, lr_actor=1e-3, lr_critic=1e-3,
                                                                                 entropy_coef=0.01))
    m = train_policy(cfg, log=lambda s: None)
    assert m["budget_met"] and abs(m["gmacs_ratio"] / 0.5 - 1) <= 0.05, m["history"]
    dense = leanvit.count_macs(leanvit.create_model("vit12_convstem_w96_cifar"), images(1))
    assert m["gmacs"] == pytest.approx(m["gmacs_ratio"] * dense, rel=1e-9) and m["dense_gmacs"] == pytest.approx(dense)
    assert 0 < m["decision_gmacs"] < m["gmacs"]
    curve = m["curve"]
    assert [c["step"] for c in curve] == [1, 2] and all(c["alpha"] >= 0 for c in curve)
    # the greedy ratio counts the actor: an untrained one keeping everything costs more than dense
    assert all(0 < c["gmacs_ratio"] < 1.5 and 0 <= c["keep"] <= 1 for c in curve)
    assert (tmp_path / "curves.png").stat().st_size > 10_000
    assert json.loads((tmp_path / "metrics.json").read_text())["curve"] == curve
    torch.manual_seed(cfg.seed)  # the random-weight model the training ran on (it seeds before building it):
    # the file records that model and loads on no other
    f = leanvit.adapt(leanvit.create_model("vit12_convstem_w96_cifar"), "rl4evit", weights=str(tmp_path / "policy.safetensors"))
    assert (f.method.agents, f.method.hidden, f.method.placement) == (agents, [32], "before")
    again = train_policy(cfg, log=lambda s: None)
    assert again["history"] == m["history"] and again["curve"] == curve


def test_single_agent_ablation_trains(tmp_path):
    """The single-agent variant (one agent takes a layer's joint action) runs the same loop."""
    from leanvit.rl import PPOConfig
    from leanvit.train_policy import PolicyConfig, train_policy
    cfg = PolicyConfig(model="vit12_convstem_w96_cifar", out=str(tmp_path), data=str(CIFAR), epochs=1,
                       batch_size=32, limit_train=64, limit_eval=32, workers=0,
                       options={"hidden": [32], "agents": "single"}, ppo=PPOConfig(epochs=2))
    m = train_policy(cfg, log=lambda s: None)
    assert m["steps"] == 2 and m["history"][0]["kind"] == "agents"
    assert 0.0 < m["history"][0]["keep_ratio"] <= 1.0
    with pytest.raises(leanvit.OptionError, match="agents must be"):
        leanvit.adapt(small_vit(), "rl4evit", agents="both")


def test_alternate_epochs_finetune_the_vit_under_frozen_agents(tmp_path):
    """With finetune_vit, epoch 1 trains the agents (ViT frozen) and epoch 2 the ViT (agents
    frozen): the exported policy equals the agents after epoch 1, the exported ViT has moved."""
    from safetensors.torch import load_file, save_file
    from leanvit.rl import PPOConfig
    from leanvit.train_policy import PolicyConfig, train_policy
    start = leanvit.create_model("vit12_convstem_w96_cifar").state_dict()
    save_file(start, tmp_path / "vit0.safetensors")
    cfg = PolicyConfig(model="vit12_convstem_w96_cifar", checkpoint=str(tmp_path / "vit0.safetensors"),
                       out=str(tmp_path / "agents"), data=str(CIFAR), epochs=1,
                       batch_size=32, limit_train=64, limit_eval=32, workers=0, options={"hidden": [32]},
                       ppo=PPOConfig(epochs=2))
    train_policy(cfg, log=lambda s: None)
    m = train_policy(PolicyConfig(**{**cfg.__dict__, "out": str(tmp_path / "both"), "epochs": 2,
                                     "finetune_vit": True, "lr_vit": 1e-3}), log=lambda s: None)
    assert [h["kind"] for h in m["history"]] == ["agents", "vit"] and m["steps"] == 4
    agents, both = load_file(tmp_path / "agents" / "policy.safetensors"), load_file(tmp_path / "both" / "policy.safetensors")
    assert agents.keys() == both.keys() and all(torch.equal(agents[k], both[k]) for k in agents)
    vit = load_file(tmp_path / "both" / "vit.safetensors")
    assert vit.keys() == start.keys() and any(not torch.equal(vit[k], start[k]) for k in vit) and not (tmp_path / "agents" / "vit.safetensors").exists()


@pytest.mark.skipif(__import__("shutil").which("torchrun") is None, reason="torchrun not on PATH")
def test_torchrun_two_processes_keep_identical_agents(tmp_path):
    """Under torchrun each process rolls out its own shard; the averaged actor/critic gradients
    keep both processes' agents identical."""
    import json
    import os
    import subprocess
    out = tmp_path / "ddp"
    cmd = ["torchrun", "--standalone", "--nproc_per_node", "2", "-m", "leanvit", "train-policy",
           "--model", "vit12_convstem_w96_cifar", "--data", str(CIFAR), "--out", str(out), "--epochs", "1",
           "--batch-size", "16", "--limit-train", "64", "--limit-eval", "32", "--workers", "0",
           "--ppo-epochs", "2", "--lr-actor", "1e-3", "--lr-critic", "1e-3", "--opt", "hidden=[32]"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == 4  # 64 images / 16 per step
    assert metrics["replica_max_abs_diff"] == 0.0
    h = metrics["history"][0]
    assert h["kind"] == "agents" and 0.0 < h["keep_ratio"] < 1.0  # rollouts over both shards
    assert (out / "train.log").read_text().count("done: greedy top-1") == 1  # only rank 0 logs


def test_shipped_policy_loads_by_name_and_reduces_tokens():
    """The MAPPO policy trained for the reference model ships in the zoo (small, with a model card)
    and loads by the model's name."""
    from leanvit.zoo import ZOO_DIR, list_method_weights
    name = "cifar10_vit12_w128"
    assert name in list_method_weights("rl4evit")
    path = ZOO_DIR / f"{name}.rl4evit.safetensors"
    assert path.stat().st_size <= 12 * 2**20
    card = (ZOO_DIR / f"{name}.rl4evit.md").read_text()
    assert "10000 images" in card and "leanvit train-policy" in card
    model = leanvit.load_model(name)
    f = leanvit.adapt(model, "rl4evit", weights=name)
    assert f.method.weights == name
    from leanvit.data import eval_transform, load_dataset
    data = load_dataset(str(CIFAR), split="test", transform=eval_transform(model), num_classes=10, limit=8)
    x = torch.stack([data[i][0] for i in range(8)])  # real test photos
    with torch.no_grad(), f.tracing() as trace:
        logits = f(x)
    assert logits.shape == (8, 10) and torch.isfinite(logits).all()
    after = tokens_per_block(trace)[-1]
    # tokens really removed (it keeps 57 of 65 on average: trained for 0.93 of dense), CLS + at least one patch
    assert after.float().mean() < 64 and (after >= 2).all()
    # on photos it costs less than dense, its actor included (not on noise)
    assert leanvit.count_macs(f, x) < leanvit.count_macs(model, x)
    with pytest.raises(leanvit.OptionError, match="shipped rl4evit weights: cifar10_vit12_w128"):
        leanvit.adapt(model, "rl4evit", weights="no_such_model")


def test_a_policy_file_without_its_options_is_refused(tmp_path):
    """A policy file that stores none of its training options (placement, activation, ...) cannot
    say how to run it: it is refused by name, not run with guessed options."""
    from leanvit.training import export_weights
    f = leanvit.adapt(small_vit(), "rl4evit", hidden=[16])
    path = tmp_path / "bare.safetensors"
    export_weights(f.method, path)
    with pytest.raises(leanvit.OptionError, match=r"bare\.safetensors stores none of the options .* train it again"):
        leanvit.adapt(small_vit(), "rl4evit", weights=str(path))


def test_bench_times_rl4evit_with_its_per_image_floor():
    """The floor keeps random tokens at the policy's per-image counts."""
    from leanvit.bench import benchmark
    f = _half_pruning_rl4evit()
    x = images(5)
    res = benchmark(f.model, [("rl4evit", "rl4evit", {})], x, repeats=1, warmup=0, progress=False)
    assert "floor_speedup" in res["methods"]["rl4evit"] and res["methods"]["rl4evit"]["gmacs"] > 0
