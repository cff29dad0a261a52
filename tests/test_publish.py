"""Model cards: one layout for every shipped file (leanvit.publish)."""
import json

from leanvit.publish import markdown_table, model_card, publish_rl4evit, write_card


def test_markdown_table_and_card_layout(tmp_path):
    t = markdown_table(["a", "b"], "lr", [("x", 1), ("y", 2)])
    assert t.splitlines() == ["| a | b |", "|---|---:|", "| x | 1 |", "| y | 2 |"]
    card = model_card("m", "about it", "import leanvit", "numbers", "commands")
    heads = [line for line in card.splitlines() if line.startswith("#")]
    assert heads == ["# m", "## Measured", "## How it was trained (2-core x86_64 VM, no GPU)"]
    assert "```python\nimport leanvit\n```" in card
    path = write_card("m", card, zoo=tmp_path)
    assert path.read_text() == card and not list(tmp_path.glob("*.tmp"))


def test_rl4evit_card_from_the_recorded_results(tmp_path):
    res, runs, zoo = tmp_path / "res", tmp_path / "runs", tmp_path / "zoo"
    for d in (res / "sweep", runs / "multi_a0.07", zoo):
        d.mkdir(parents=True)
    policy = f"{runs}/multi_a0.07/policy.safetensors"
    (res / "sweep" / "results.json").write_text(json.dumps(dict(
        dense=dict(top1=75.47, gmacs=0.1777), date="2026-11-23", threads=2, batch_size=250,
        rows=[dict(method="rl4evit", label=f"weights={policy}", n_images=10000, top1=75.06, gmacs=0.1663,
                   speedup=1.21)])))
    (runs / "multi_a0.07" / "metrics.json").write_text(json.dumps(dict(
        steps=90, history=[dict(elapsed_s=3000)],
        config=dict(alpha=0.07, beta=1, batch_size=64, limit_train=9600,
                    ppo=dict(epochs=15, lr_actor=5e-5, lr_critic=5e-5, clip=0.2, gamma=0.99, lam=0.95)))))
    (res / "counts.txt").write_text(f"{policy}: mean tokens per block (2000 images): "
                                    + " ".join(["65.0"] * 4 + ["52.6"] * 3 + ["44.4"] * 3 + ["10.1"] * 2) + "\n")
    (zoo / "cifar10_vit12_w128.rl4evit.safetensors").write_bytes(b"\0" * 2 ** 20)
    card = publish_rl4evit("0.07", results=str(res), runs=str(runs), zoo=zoo)
    assert (zoo / "cifar10_vit12_w128.rl4evit.md").read_text() == card
    assert "**Top-1 on CIFAR-10 (JPEG) test, 10000 images: 75.06%** (dense 75.47%)" in card
    assert "(0.936 of dense 0.1777" in card and "keeps 52.6, 44.4, 10.1 tokens" in card
    assert "--alpha 0.07" in card and "Weights: fp32, 1.0 MB" in card and "1.21x" in card
