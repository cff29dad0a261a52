"""Which patches do RL4EViT policies keep at their first decision? (issue 19)

For each policy file: on N class-balanced *training* images (they only describe the policies;
no choice is made on them), the actor's keep
margin (keep logit - prune logit) of every patch at the first decision layer, against
  - the patch's pixel standard deviation (flat background patches have little),
  - the CLS attention the patch gets in the block before the decision (EViT's score),
as the mean over images of the Spearman rank correlation, and the mean pixel std of kept and of
pruned patches (greedy: margin > 0). The reference model's 8x8 tokens each cover 4x4 pixels.

    python benchmarks/archive/rl4evit_what_it_keeps.py POLICY.safetensors ... > benchmarks/results/rl4evit_v2/what_it_keeps.json
"""
import argparse
import json

import torch
import torch.nn.functional as F

import leanvit
from leanvit.data import eval_transform, load_dataset


def ranks(t):
    return t.argsort(dim=1).argsort(dim=1).float()


def spearman(a, b):
    """(B, P) x (B, P) -> mean over rows of the rank correlation."""
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(1, keepdim=True), rb - rb.mean(1, keepdim=True)
    return float(((ra * rb).sum(1) / (ra.norm(dim=1) * rb.norm(dim=1))).mean())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("policies", nargs="+")
    ap.add_argument("--data", default="../shared/data/cifar10-jpeg.tar.gz")
    ap.add_argument("--images", type=int, default=500)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = leanvit.load_model("cifar10_vit12_w128")
    ds = load_dataset(args.data, split="train", transform=eval_transform(model), num_classes=10, limit=args.images)
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    patch_std = F.unfold(x, kernel_size=4, stride=4).reshape(len(ds), 3 * 16, -1).std(dim=1)  # (B, 64)
    out = dict(images=len(ds), split="train", policies={})
    for path in args.policies:
        method = leanvit.adapt(model, "rl4evit", weights=path).method
        first = method.decision_layers()[0]  # the decision after this block
        with torch.inference_mode():
            h = model._pos_embed(model.patch_embed(x))
            for blk in model.blocks[:first]:
                h = blk(h)
            blk = model.blocks[first]
            q, k, _ = blk.attn.qkv(blk.norm1(h)).reshape(h.shape[0], h.shape[1], 3, blk.attn.num_heads, -1) \
                .permute(2, 0, 3, 1, 4).unbind(0)
            cls_attn = ((q[:, :, :1] * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)).softmax(-1)[:, :, 0].mean(1)[:, 1:]
            h = blk(h)
            logits = method.actor(h[:, 1:])
        margin = logits[..., 1] - logits[..., 0]
        keep = margin > 0
        out["policies"][path] = dict(
            placement=method.placement, input_norm=method.input_norm, decision_after_block=first,
            kept_fraction=float(keep.float().mean()),
            spearman_margin_vs_pixel_std=spearman(margin, patch_std),
            spearman_margin_vs_cls_attention=spearman(margin, cls_attn),
            pixel_std_kept=float(patch_std[keep].mean()), pixel_std_pruned=float(patch_std[~keep].mean()))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
