"""Cost per MAC of an MLP whose rows run different first-k widths (PRANCE's per-image MLP widths
under packed execution), against the full-width MLP on all rows, in one run.

    python benchmarks/archive/mlp_width_groups.py [--rows 1040] [--dim 128] [--hidden 512]

Rows are sorted by width and split into four equal groups (widths 512, 384, 256, 128 of 512):
  grouped:   one fc1-GELU-fc2 per group on its contiguous rows (what leanvit runs);
  staircase: per width level, fc1-GELU on the rows whose width reaches it, accumulated into fc2.
efficiency = (full time / variant time) / (full MACs / variant MACs); 2 threads, median of 50.
"""
import argparse
import time

import torch
import torch.nn.functional as F


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1040)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=512)
    args = ap.parse_args()
    torch.set_num_threads(2)
    T, C, H = args.rows, args.dim, args.hidden
    g = torch.Generator().manual_seed(0)
    W1, b1, W2, b2 = (torch.randn(*s, generator=g) for s in ((H, C), (H,), (C, H), (C,)))
    x = torch.randn(T, C, generator=g)
    widths = [H, 3 * H // 4, H // 2, H // 4]  # rows sorted by width, widest first
    starts = [i * T // 4 for i in range(5)]
    sliced = {w: (W1[:w].contiguous(), b1[:w].contiguous(), W2[:, :w].contiguous()) for w in widths}
    levels, prev = [], 0
    for j, w in enumerate(sorted(widths)):  # level j: rows [0, end) have a width >= w
        levels.append((starts[4 - j], W1[prev:w].contiguous(), b1[prev:w].contiguous(), W2[:, prev:w].contiguous()))
        prev = w

    def full():
        return F.linear(F.gelu(F.linear(x, W1, b1)), W2, b2)

    def grouped():
        return torch.cat([F.linear(F.gelu(F.linear(x[starts[i]:starts[i + 1]], *sliced[w][:2])), sliced[w][2], b2)
                          for i, w in enumerate(widths)])

    def staircase():
        out = b2.expand(T, C).clone()
        for end, w1, bb1, w2 in levels:
            out[:end].addmm_(F.gelu(F.linear(x[:end], w1, bb1)), w2.t())
        return out

    torch.testing.assert_close(grouped(), staircase(), rtol=1e-3, atol=1e-2)

    def median_time(f, n=50):
        with torch.inference_mode():
            for _ in range(5):
                f()
            ts = []
            for _ in range(n):
                t0 = time.perf_counter()
                f()
                ts.append(time.perf_counter() - t0)
        return sorted(ts)[n // 2]

    macs_ratio = (T * H) / sum((starts[i + 1] - starts[i]) * w for i, w in enumerate(widths))
    print(f"rows {T}, dim {C}, hidden {H}, widths {widths} on a quarter of the rows each, 2 threads, "
          f"median of 50, {time.strftime('%Y-%m-%d')}")
    for _ in range(3):
        tf, tg, ts = median_time(full), median_time(grouped), median_time(staircase)
        print(f"full {tf * 1e3:.3f} ms  grouped {tg * 1e3:.3f} ms (efficiency {tf / tg / macs_ratio:.2f})  "
              f"staircase {ts * 1e3:.3f} ms (efficiency {tf / ts / macs_ratio:.2f})")


if __name__ == "__main__":
    main()
