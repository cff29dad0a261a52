"""Why RL4EViT's actor needs MAPPO's input LayerNorm on the reference model (issue 19).

The actor reads the residual stream after block 2 (the decision before block 3), which no norm
has touched: its tokens have norms of about 70. Built as train-policy builds it (cheap actor
hidden=[64], MAPPO's orthogonal init, gain sqrt(2) on the tanh layer), how many of the hidden
layer's pre-activations start saturated (|z| > 2: tanh'(z) < 0.07), with and without the input
LayerNorm? 32 images of the embedded CIFAR-10 sample, seed 0.

    python benchmarks/archive/rl4evit_saturation.py > benchmarks/results/rl4evit_v2/saturation.json
"""
import json

import torch

import leanvit
from leanvit.data import EMBEDDED_CIFAR10, eval_transform, load_dataset
from leanvit.rl import orthogonal_init

torch.manual_seed(0)
model = leanvit.load_model("cifar10_vit12_w128")
ds = load_dataset(EMBEDDED_CIFAR10, split="test", transform=eval_transform(model), limit=32)
x = torch.stack([ds[i][0] for i in range(len(ds))])
with torch.inference_mode():
    h = model._pos_embed(model.patch_embed(x))
    for blk in model.blocks[:3]:
        h = blk(h)
    tokens = h[:, 1:]
out = dict(images=len(ds), token_norm_mean=float(tokens.norm(dim=-1).mean()),
           per_dim_std_median=float(tokens.std(dim=(0, 1)).median()))
for norm in (False, True):
    actor = leanvit.adapt(model, "rl4evit", hidden=[64], input_norm=norm).method.actor
    orthogonal_init(actor, 0.01)
    first = actor[:2] if norm else actor[:1]  # up to the first linear layer's output
    with torch.inference_mode():
        z = first(tokens)
    out[f"input_norm={str(norm).lower()}"] = dict(pre_activation_std=float(z.std()),
                                                   saturated_fraction=float((z.abs() > 2).float().mean()))
print(json.dumps(out, indent=1))
