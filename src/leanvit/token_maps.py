"""Token maps: which input patches each token stands for after every decision, drawn as a grid
(one row per method, one column per decision layer, a few images), with each object's box when the
data has boxes.

    from leanvit.token_maps import token_maps
    token_maps({"tome": tome, "ppt": ppt}, images, "runs/maps.png",
               image_mean=(0.485, 0.456, 0.406), image_std=(0.229, 0.224, 0.225))

Figures are drawn on matplotlib's Agg canvas directly (no pyplot, no display).
"""
from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass
from typing import List, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from .device import module_device
from .methods.base import leaves_no_trace
from .report import new_figure, save_figure
from .runtime import LeanViT


# --------------------------------------------------------------------------- token states per layer
@dataclass
class LayerTokens:
    """The tokens of a batch right after one decision (``layer`` -1: the input tokens).

    source: (B, N, N0) which input tokens each token stands for (cumulative from the input);
    valid:  (B, N) bool, or None when no image has padding; size: (B, N) or None (all 1).
    """

    layer: int
    n_prefix: int
    source: Tensor
    valid: Optional[Tensor] = None
    size: Optional[Tensor] = None

    def counts(self) -> Tensor:
        """(B,) real tokens per image (prefix included)."""
        if self.valid is None:
            return torch.full((self.source.shape[0],), self.source.shape[1], dtype=torch.long)
        return self.valid.sum(1)


def record_token_states(runner: LeanViT, images: Tensor) -> List[LayerTokens]:
    """Run ``runner`` on ``images`` (inference mode, tracing with token sources) and return the
    token state after each of its decisions, in order, from the runner's trace.

    The method's statistics and random generators and the runner's ``last_state`` are restored
    afterwards, so later forwards are as if this one had not happened.
    """
    last_state = runner.last_state
    try:
        with leaves_no_trace(runner.method), torch.inference_mode(), runner.tracing(track_source=True) as trace:
            runner(images.to(module_device(runner)))
    finally:
        runner.last_state = last_state
    return token_states_of(trace, runner.n_prefix)


def token_states_of(trace: List[dict], n_prefix: int) -> List[LayerTokens]:
    """The token state after each decision recorded in ``trace`` (a :meth:`LeanViT.tracing` with
    token sources), in order, on the host."""
    return [LayerTokens(layer=rec["layer"], n_prefix=n_prefix,  # on the host, where figures are drawn
                        **{k: None if v is None else v.cpu() for k, v in rec["tokens"].items()})
            for rec in trace if rec.get("tokens") is not None]


# --------------------------------------------------------------------------- token maps
def _grid_side(n_patches: int) -> int:
    g = int(math.isqrt(max(n_patches, 0)))
    if g * g != n_patches or g == 0:
        raise ValueError(f"token maps need a square patch grid; the model has {n_patches} patches")
    return g


def _check_square_input(runner: LeanViT, images: Tensor) -> None:
    """Refuse a non-square patch grid even when its patch count happens to be a square."""
    ps = getattr(runner.model.patch_embed, "patch_size", None)
    if ps is None:
        return
    ph, pw = (ps, ps) if isinstance(ps, int) else tuple(ps)
    gh, gw = images.shape[-2] // ph, images.shape[-1] // pw
    if gh != gw:
        raise ValueError(f"token maps need a square patch grid; these images give {gh}x{gw} patches")


def _display_images(images: Tensor, mean, std) -> np.ndarray:
    """(B, H, W, 3) float in [0, 1]."""
    x = images.detach().float().cpu()
    if mean is not None and std is not None:
        m = torch.as_tensor(mean, dtype=x.dtype).reshape(1, -1, 1, 1)
        s = torch.as_tensor(std, dtype=x.dtype).reshape(1, -1, 1, 1)
        x = x * s + m
    else:  # min-max per image
        lo = x.flatten(1).min(1).values.reshape(-1, 1, 1, 1)
        hi = x.flatten(1).max(1).values.reshape(-1, 1, 1, 1)
        x = (x - lo) / (hi - lo).clamp_min(1e-12)
    x = x.clamp(0, 1).permute(0, 2, 3, 1).numpy()
    if x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    return x[..., :3]


def _group_colors(n: int, seed: int) -> np.ndarray:
    """``n`` distinct colours: golden-ratio hue steps from a random start, alternating shades."""
    start = np.random.default_rng(seed).random()
    cols = [colorsys.hsv_to_rgb((start + 0.618034 * k) % 1.0, 0.9 if k % 2 == 0 else 0.6,
                                1.0 if k % 3 != 2 else 0.75) for k in range(n)]
    return np.asarray(cols, dtype=np.float64).reshape(n, 3)


def _patch_layout(rec: LayerTokens, b: int, g: int):
    """(owner (g, g) int token index or -1 if pruned, merged (g, g) bool, tokens real)."""
    p = rec.n_prefix
    src = rec.source[b].float().cpu()
    if rec.valid is not None:
        src = src[rec.valid[b].cpu()]  # padding rows are copies of real tokens: ignore them
    src = src[:, p:] > 0.5  # (N_real, g*g): patches each real token covers
    covered = src.any(0)
    owner = torch.where(covered, src.float().argmax(0), torch.full_like(covered, -1, dtype=torch.long))
    merged_token = src.sum(1) > 1
    merged = covered & merged_token[owner.clamp_min(0)]
    return owner.reshape(g, g).numpy(), merged.reshape(g, g).numpy(), src.shape[0]


def _render(img: np.ndarray, owner: np.ndarray, merged: np.ndarray, seed: int) -> np.ndarray:
    H, W, _ = img.shape
    g = owner.shape[0]
    rows, cols = (np.arange(H) * g) // H, (np.arange(W) * g) // W
    own = owner[rows][:, cols]
    mer = merged[rows][:, cols]
    out = img.copy()
    pruned = own < 0
    gray = img.mean(-1, keepdims=True)
    out = np.where(pruned[..., None], 0.06 + 0.22 * gray, out)
    if mer.any():
        groups = np.unique(owner[merged])
        colors = _group_colors(len(groups), seed)
        lut = np.zeros((int(owner.max()) + 1, 3))
        lut[groups] = colors
        tint = lut[np.where(mer, own, 0)]
        out = np.where(mer[..., None], 0.5 * img + 0.5 * tint, out)
    return np.clip(out, 0, 1)


def _group_edges(owner: np.ndarray, merged: np.ndarray, H: int, W: int) -> list:
    """Line segments (in pixels) between neighbouring patches of different tokens where at
    least one of them is a merged group: the outlines of the merged groups."""
    g = owner.shape[0]
    ph, pw = H / g, W / g
    segs = []
    for r in range(g):
        for c in range(g):
            if c + 1 < g and owner[r, c] != owner[r, c + 1] and (merged[r, c] or merged[r, c + 1]):
                segs.append([((c + 1) * pw, r * ph), ((c + 1) * pw, (r + 1) * ph)])
            if r + 1 < g and owner[r, c] != owner[r + 1, c] and (merged[r, c] or merged[r + 1, c]):
                segs.append([(c * pw, (r + 1) * ph), ((c + 1) * pw, (r + 1) * ph)])
    return segs


def _state_at(records: List[LayerTokens], layer: int, identity: LayerTokens) -> LayerTokens:
    """The tokens in effect after block ``layer``: its last decision at or before it."""
    best = identity
    for rec in records:
        if rec.layer <= layer:
            best = rec
    return best


_MAP_PANEL, _MAP_LABEL, _MAP_GAP, _MAP_TITLE = 1.1, 1.3, 0.06, 0.24  # inches
_MAP_BLOCK_GAP, _MAP_MARGIN, _MAP_DPI, _MAP_MAX_WIDTH = 0.35, 0.12, 120, 1600  # inches, dots/inch, pixels
_MAP_CAPTION = ("dark: pruned patches  ·  same colour, outlined: patches merged into one token  ·  "
                "untinted: patches kept as single tokens")
_MAP_BOX_CAPTION = "  ·  white frame: object box"


def _box_in_panel(box, W: float, H: float):
    """(left, top, width, height) in the panel's pixels of ``box``, ``(x0, y0, x1, y1)`` as fractions
    of the image (the data's convention, see ``ClutteredImages``), clipped to the image."""
    x0, y0, x1, y1 = (min(max(float(v), 0.0), 1.0) for v in box)
    return x0 * W, y0 * H, (x1 - x0) * W, (y1 - y0) * H


def _draw_box(ax, box, W: float, H: float) -> None:
    """The object's box as a white frame with a black rim: one patch, legible over the image and
    over any group colour; above the token outlines so that they never hide it, and unclipped so
    that a box along the image's edge keeps its whole frame (it spills a pixel into the gap)."""
    from matplotlib import patheffects
    from matplotlib.patches import Rectangle
    left, top, width, height = _box_in_panel(box, W, H)
    ax.add_patch(Rectangle((left, top), width, height, fill=False, edgecolor="white", linewidth=1.0, zorder=5,
                           clip_on=False, path_effects=[patheffects.withStroke(linewidth=2.2, foreground="black")]))


def _map_rows(runners: Mapping[str, LeanViT], images: Tensor, layers: Optional[Sequence[int]]):
    """(patch grid side, [(runner name, [(panel title, LayerTokens), ...]), ...]): one row per runner."""
    B = images.shape[0]
    rows, g = [], None
    for name, runner in runners.items():
        records = record_token_states(runner, images)
        n0 = records[0].source.shape[-1] if records else None
        if layers is not None:
            if n0 is None:  # no decision ran: every token is its own input token
                n0 = runner.n_prefix + runner.model.patch_embed.num_patches
            eye = torch.eye(n0).expand(B, n0, n0)
            identity = LayerTokens(layer=-1, n_prefix=runner.n_prefix, source=eye)
            chosen = [(f"after block {int(l)}", _state_at(records, int(l), identity)) for l in layers]
        else:
            chosen = [(f"block {rec.layer}", rec) for rec in records]
        if n0 is not None:
            side = _grid_side(n0 - runner.n_prefix)
            if g is not None and side != g:
                raise ValueError(f"runners disagree on the patch grid ({g}x{g} vs {side}x{side})")
            g = side
        rows.append((name, chosen))
    return g, rows


def _draw_map_panel(ax, img: np.ndarray, rec: LayerTokens, b: int, g: int, seed: int, title: str) -> None:
    H, W = img.shape[:2]
    owner, merged, n_real = _patch_layout(rec, b, g)
    ax.imshow(_render(img, owner, merged, seed=seed), extent=(0, W, H, 0), interpolation="nearest")
    ax.vlines([W * k / g for k in range(1, g)], 0, H, colors="white", linewidths=0.3, alpha=0.45)
    ax.hlines([H * k / g for k in range(1, g)], 0, W, colors="white", linewidths=0.3, alpha=0.45)
    segs = _group_edges(owner, merged, H, W)
    if segs:
        from matplotlib.collections import LineCollection
        ax.add_collection(LineCollection(segs, colors="black", linewidths=0.9, alpha=0.8))
    ax.set_xlim(0, W)
    ax.set_ylim(H, 0)
    ax.set_title(f"{n_real} tokens" if title is None else f"{title}: {n_real} tok", fontsize=6.5, pad=2)
    ax.set_axis_off()


def _map_geometry(n_images: int, n_rows: int, n_cols: int):
    """Panel size, image blocks across and down, figure width and height (inches): as many image
    blocks side by side as fit in the maximum width, panels shrunk when one block alone is wider."""
    max_w = _MAP_MAX_WIDTH / _MAP_DPI - 2 * _MAP_MARGIN
    panel = min(_MAP_PANEL, (max_w - _MAP_LABEL) / max(n_cols, 1) - _MAP_GAP)
    block_w = _MAP_LABEL + n_cols * (panel + _MAP_GAP)
    block_h = (1 + n_rows) * (panel + _MAP_TITLE)  # the input image, then one row per method
    across = max(1, min(n_images, int((max_w + _MAP_BLOCK_GAP) // (block_w + _MAP_BLOCK_GAP))))
    down = math.ceil(n_images / across)
    width = 2 * _MAP_MARGIN + across * block_w + (across - 1) * _MAP_BLOCK_GAP
    height = 2 * _MAP_MARGIN + down * block_h + (down - 1) * _MAP_BLOCK_GAP
    return panel, across, block_w, block_h, width, height


def _token_map_figure(disp: np.ndarray, g: int, rows, boxes: Optional[Tensor] = None) -> object:
    """The figure of :func:`token_maps`: for each image a block with the input on top and below it
    one row per method, one column per decision layer; blocks side by side, then stacked. With
    ``boxes`` ((B, 4) fractions of the image), each panel of an image frames its object's box."""
    import textwrap
    B = disp.shape[0]
    n_cols = max([len(panels) for _, panels in rows] + [1])
    panel, across, block_w, block_h, width, height = _map_geometry(B, len(rows), n_cols)
    legend = _MAP_CAPTION + (_MAP_BOX_CAPTION if boxes is not None else "")
    caption = textwrap.wrap(legend, max(int(width * 15), 20))
    caption_h = 0.16 * len(caption) + 0.06
    height += caption_h
    fig = new_figure(width, height)
    titles = [[title for title, _ in panels] for _, panels in rows]
    shared = titles[0] if titles and all(t == titles[0] for t in titles) else None  # then column headers

    def axes(x: float, y: float):  # x, y of the panel's top-left corner in inches from the top-left
        return fig.add_axes([x / width, 1 - (y + panel) / height, panel / width, panel / height])

    for b in range(B):
        x0 = _MAP_MARGIN + (b % across) * (block_w + _MAP_BLOCK_GAP)
        y0 = _MAP_MARGIN + (b // across) * (block_h + _MAP_BLOCK_GAP) + _MAP_TITLE
        ax = axes(x0 + max(_MAP_LABEL - panel - _MAP_GAP, 0.0), y0)  # in the label column
        H, W = disp[b].shape[:2]
        ax.imshow(disp[b], extent=(0, W, H, 0), interpolation="nearest")
        ax.set_title(f"image {b + 1}: input", fontsize=7, pad=2)
        ax.set_axis_off()
        panels_of_image = [ax]
        for c, title in enumerate(shared or []):  # in the row of the input, beside it: free space
            x = x0 + _MAP_LABEL + c * (panel + _MAP_GAP) + panel / 2
            fig.text(x / width, 1 - (y0 + panel) / height, title, ha="center", va="bottom", fontsize=7)
        for r, (name, panels) in enumerate(rows):
            y = y0 + (1 + r) * (panel + _MAP_TITLE)
            label = "\n".join(textwrap.wrap(name, 19)[:3])
            fig.text((x0 + _MAP_LABEL - 0.08) / width, 1 - (y + panel / 2) / height, label,
                     ha="right", va="center", fontsize=7)
            for c, (title, rec) in enumerate(panels):
                panels_of_image.append(axes(x0 + _MAP_LABEL + c * (panel + _MAP_GAP), y))
                _draw_map_panel(panels_of_image[-1], disp[b], rec, b, g,
                                seed=1000 * b + 100 * r + c, title=None if shared else title)
        if boxes is not None:
            for ax in panels_of_image:
                _draw_box(ax, boxes[b], W, H)
    fig.text(0.5, 0.04 / height, "\n".join(caption), ha="center", va="bottom", fontsize=7, color="0.3")
    return fig


def token_maps(runners: Mapping[str, LeanViT], images: Tensor, path, layers: Optional[Sequence[int]] = None,
               image_mean=None, image_std=None, max_images: int = 4, boxes: Optional[Tensor] = None) -> str:
    """Draw which patches each method keeps, merges and prunes, layer by layer.

    For each image (the first ``max_images``) a block: the input on top, then one row per runner
    (in order), one column per decision layer. With ``layers``, each runner gets one panel per
    listed block instead, showing the tokens in effect after that block (its latest decision so
    far), so that methods line up by depth. Blocks sit side by side up to 1,600 pixels, then stack.
    In a panel, pruned patches (covered by no token) are dark grey, patches merged into one token
    share a colour (50% over the image), single patches are shown as they are. ``images`` are
    normalised; ``image_mean``/``image_std`` undo that for display (otherwise each image is
    min-max scaled). ``boxes``: optional (B, 4) object boxes, ``(x0, y0, x1, y1)`` as fractions of
    the image as the data gives them (``Batch.boxes``), framed on every panel of their image.
    Needs a square patch grid (ValueError). Each runner runs once on the images in its current
    train/eval mode (see :func:`record_token_states`). Writes a PNG, returns ``path``.
    """
    if images.dim() != 4:
        raise ValueError(f"expected a batch of images (B, C, H, W), got {tuple(images.shape)}")
    images = images[:max(int(max_images), 1)]
    if boxes is not None:
        if boxes.dim() != 2 or boxes.shape[1] != 4 or boxes.shape[0] < len(images):
            raise ValueError(f"expected a box (x0, y0, x1, y1) per image, got boxes {tuple(boxes.shape)} "
                             f"for {len(images)} images")
        boxes = boxes[:len(images)].detach().float().cpu()
    for runner in runners.values():
        _check_square_input(runner, images)
    g, rows = _map_rows(runners, images, layers)
    fig = _token_map_figure(_display_images(images, image_mean, image_std), g, rows, boxes=boxes)
    return save_figure(fig, path, dpi=_MAP_DPI)
