"""What a token-reduction method is: an object asked, at its decision layers, to reduce the tokens.

A method reads what it needs from the block's attention (:class:`AttentionView`, computed on
demand so unused scores cost nothing) and returns a new :class:`~leanvit.tokens.TokenState`.
Methods register themselves by name; options are validated when the method is built.
"""
from __future__ import annotations

import abc
import contextlib
import copy
import inspect
import math
import threading
import weakref
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Tuple, Type

import torch
from torch import Tensor

from ..tokens import TokenState


class OptionError(ValueError):
    """A method option is unknown or out of range."""


@dataclass(frozen=True)
class ModelInfo:
    """What a method may need to know about the model it is bound to."""

    depth: int
    n_prefix: int
    n_tokens: int  # at the input, including prefix tokens
    num_heads: int
    embed_dim: int
    has_cls: bool = True  # a CLS token at index 0
    mlp_hidden: int = 0  # MLP width of the first block
    channel_elastic: bool = True  # every block's heads and MLP neurons can be sliced (elastic.sliceable)
    # the model itself, for what its weights say (a learned method's file records the model it was trained for)
    model: Optional[object] = field(default=None, compare=False, repr=False)


class lazy:
    """A value computed on first read and kept on the instance, like ``functools.cached_property``
    but without its lock, which torch.compile cannot trace (Python 3.11)."""

    def __init__(self, f: Callable):
        self.f, self.name = f, f.__name__

    def __set_name__(self, owner, name: str) -> None:
        self.name = name

    def __get__(self, obj, owner=None):
        if obj is None:
            return self
        value = obj.__dict__[self.name] = self.f(obj)
        return value


class AttentionView:
    """The block's attention, as a decision may read it. Everything is computed lazily.

    q, k, v: (B, H, N, d), padding included. ``heads`` (B,): with per-image channel widths, the
    heads image i ran with (its q, k, v are zero beyond them); None: all H for every image.

    The runtime sets, per view: ``has_cls`` (token 0 is a CLS token); ``pool_attention``, for a
    model without one whose head is an attention pool (MAP), a function giving the (B, N)
    attention of the head's pooled query over the current tokens; and ``note_macs``, when
    tracing, to count what the CLS substitute costs (see :attr:`cls_attn`).
    """

    has_cls: bool = True
    pool_attention: Optional[Callable[[], Tensor]] = None
    note_macs: Optional[Callable[..., None]] = None

    def __init__(self, q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], n_prefix: int,
                 heads: Optional[Tensor] = None):
        self.q, self.k, self.v, self.bias, self.n_prefix, self.heads = q, k, v, bias, n_prefix, heads

    @lazy
    def _head_weights(self) -> Optional[Tensor]:
        """(B, H, 1) 1 for the heads an image ran with, 0 beyond; None when it ran with all."""
        if self.heads is None:
            return None
        return (torch.arange(self.q.shape[1], device=self.q.device)[None, :] < self.heads[:, None])[..., None].to(self.q.dtype)

    def _mean_over_heads(self, t: Tensor) -> Tensor:
        if self._head_weights is None:
            return t.mean(dim=1)
        return (t * self._head_weights.reshape(t.shape[:2] + (1,) * (t.dim() - 2))).sum(dim=1) \
            / self.heads.reshape((-1,) + (1,) * (t.dim() - 2)).to(t.dtype)

    @lazy
    def cls_attn(self) -> Tensor:
        """(B, H, N) post-softmax attention of the CLS query, with the block's bias (zero for heads
        an image did not run).

        A model without a CLS token gets a substitute: with an attention-pool head, the attention
        of the head's pooled query (the same in every head: the pool's head mean); otherwise the
        mean attention each token receives over all real queries, each query weighted by the
        patches it stands for (the CLS-free reading of "how much the image attends to a token").
        Both are counted in the MACs: the substitute costs a full N² attention map, or the pool's
        key projection, where the CLS row costs next to nothing."""
        if self.has_cls:
            q, k = self.q[:, :, :1], self.k
            logits = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
            if self.bias is not None:
                logits = logits + self.bias
            a = logits.softmax(dim=-1)[:, :, 0]
        elif self.pool_attention is not None:
            a = self.pool_attention()[:, None].expand(-1, self.q.shape[1], -1)
        else:
            a = self._received()
        return a if self._head_weights is None else a * self._head_weights

    def _received(self) -> Tensor:
        """(B, H, N) mean attention each key receives over the real queries, weighted by size."""
        B, H, N, d = self.q.shape
        logits = (self.q * d ** -0.5) @ self.k.transpose(-2, -1)
        if self.bias is not None:
            logits = logits + self.bias
        a = logits.softmax(dim=-1)
        if self.bias is None:
            received = a.mean(dim=2)
        else:  # exp(bias) is each token's size, zero for padding: the weight of its query
            w = self.bias.exp().reshape(B, 1, N, 1).to(a.dtype)
            received = (a * w).sum(dim=2) / w.sum(dim=2)
        if self.note_macs is not None:  # QKᵀ over each image's own tokens; padded: as executed
            n = N if self.bias is None else (self.bias.reshape(B, N) > float("-inf")).sum(1)
            heads = H if self.heads is None else self.heads
            self.note_macs(n * n * d * heads, float(N * N * d * H))
        return received

    @lazy
    def cls_attn_mean(self) -> Tensor:
        """(B, N) CLS attention averaged over the heads each image ran with (EViT's score)."""
        return self._mean_over_heads(self.cls_attn)

    @lazy
    def key_mean(self) -> Tensor:
        """(B, N, D) keys averaged over heads: ToMe's similarity metric."""
        return self._mean_over_heads(self.k)

    @lazy
    def v_norm(self) -> Tensor:
        """(B, N) L2 norm of each token's value vector over all heads."""
        return torch.linalg.vector_norm(self.v, dim=(1, 3))  # over heads and their channels, no copy

    @lazy
    def significance(self) -> Tensor:
        """(B, n_patches) ATS significance (sum over heads of CLS attention) x ||V||, summing to 1."""
        p = self.n_prefix
        s = self.cls_attn.sum(dim=1)[:, p:] * self.v_norm[:, p:]
        return s / s.sum(dim=1, keepdim=True)


class Reduction(abc.ABC):
    """Base class of every method. Subclasses set ``name`` and implement ``reduce``.

    ``position`` says where a decision layer sits in its block: ``"attention"`` (after the
    attention residual, before the MLP: EViT, ToMe, PPT, ATS) or ``"block"`` (after the whole
    block, i.e. between blocks: RL4EViT's and DynamicViT's pruning layers). Learned methods are
    also ``nn.Module``s, so their parameters live in the adapted model's ``state_dict``.
    """

    name: str = ""
    position: str = "attention"

    def bind(self, info: ModelInfo) -> None:
        """Check the options against the model; called once by :func:`leanvit.adapt`."""
        self.info = info

    @abc.abstractmethod
    def decision_layers(self) -> Iterable[int]:
        """Blocks after whose attention this method reduces tokens."""

    def begin(self, batch: int) -> None:
        """Called at the start of every forward."""

    def block_widths(self, layer: int) -> Optional[Tuple[Optional[int], Optional[int]]]:
        """(attention heads, MLP neurons) block ``layer`` runs with, first-k sliced; None (or a
        None entry) for the full width. Only channel-elastic methods override this."""
        return None

    def decision_macs(self, layer: int, state: TokenState) -> Optional[Tensor]:
        """(B,) MACs per image of the method's own decision network at ``layer`` (a policy or
        predictor run on the tokens of ``state``, the state ``reduce`` is about to see), counted
        as :mod:`leanvit.flops` counts the ViT: its linear layers per token. None (the default):
        nothing to count (parameter-free scoring). Called only when tracing; the padded count
        asks again with the padding taken as tokens (``state.replace(valid=None)``)."""
        return None

    @abc.abstractmethod
    def reduce(self, layer: int, state: TokenState, attn: Optional[AttentionView]) -> TokenState:
        """The reduced tokens; what runs after the decision sees only these. ``attn`` is the
        block's attention for ``position == "attention"``, None for ``"block"``."""

    def prepare_layers(self) -> Iterable[int]:
        """Blocks before which :meth:`prepare` is called (``depth``: before the head); none by default."""
        return ()

    def prepare(self, runner, layer: int, state: TokenState) -> TokenState:
        """Look at the tokens before block ``layer`` and return them with decisions for the blocks
        to come (per-image widths ``state.heads``/``state.hidden``, or a ``state.plan`` that a later
        ``reduce`` carries out). ``runner`` runs blocks for a method that needs a look ahead
        (:meth:`LeanViT.run` from ``layer``, PRANCE's Result-to-Go)."""
        return state

    # --- what callers may ask every method (neutral defaults) ------------------------------
    def reset_stats(self) -> None:
        """Forget what :meth:`stats` reports (an evaluation calls it before its first batch)."""

    def stats(self) -> Dict[str, object]:
        """JSON-ready statistics of the forwards since :meth:`reset_stats`, under the keys the
        result files use (PPT: ``prune_fraction_per_layer``); empty when there are none."""
        return {}

    def why_not_static(self) -> Optional[str]:
        """None if every forward of this method has the same shapes and no host synchronisation
        (fixed token counts and widths: ``torch.compile(fullgraph=True)`` and ONNX export work);
        else a one-line reason (per-image counts, host-side randomness, ...). Checked by export."""
        return None

    def extra_loss(self) -> Optional[Tensor]:
        """A term a training with this method active adds to its loss, from the last training
        forward (DynamicViT's keep-ratio loss); None: nothing to add."""
        return None

    def extra_repr(self) -> str:
        return ""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"


REGISTRY: Dict[str, Type[Reduction]] = {}


def register(cls: Type[Reduction]) -> Type[Reduction]:
    REGISTRY[cls.name] = cls
    return cls


def list_methods() -> List[str]:
    return sorted(REGISTRY)


def build_method(name: str, **options) -> Reduction:
    """Build a registered method, rejecting unknown options with the list of known ones."""
    if name not in REGISTRY:
        raise OptionError(f"unknown method {name!r}; known methods: {', '.join(list_methods())}")
    cls = REGISTRY[name]
    params = inspect.signature(cls.__init__).parameters
    known = [p for p in params if p != "self"]
    unknown = [o for o in options if o not in known]
    if unknown:
        raise OptionError(f"method {name!r} has no option {', '.join(map(repr, unknown))}; "
                          f"its options are: {', '.join(known) or '(none)'}")
    return cls(**options)


# --- option checks shared by methods ---------------------------------------------------------
def check_layers(name: str, layers: Iterable[int], depth: int) -> Tuple[int, ...]:
    if isinstance(layers, (int, float)) and not isinstance(layers, bool):
        layers = (layers,)  # layers=3: one block
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Iterable) or \
            not all(_integral(l) for l in layers):
        raise OptionError(f"{name}: layers must be a list of block indices (integers), got {layers!r}")
    layers = tuple(sorted({int(l) for l in layers}))
    bad = [l for l in layers if not 0 <= l < depth]
    if bad:
        raise OptionError(f"{name}: layers {bad} out of range for a model with {depth} blocks (0..{depth - 1})")
    return layers


def check_rate(name: str, option: str, value, low: float = 0.0, high: float = 1.0) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise OptionError(f"{name}: {option} must be a number, got {value!r}") from None
    if not low < value <= high:
        raise OptionError(f"{name}: {option} must be in ({low}, {high}], got {value}")
    return value


def check_number(name: str, option: str, value, low: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= low:
        raise OptionError(f"{name}: {option} must be a number >= {low}, got {value!r}")
    return float(value)


def load_weights(method, path: str, what: str) -> None:
    """Load a learned method's own parameters (actor, predictors, ...) from a safetensors file,
    or, given the name of a shipped reference model, the weights shipped for it
    (``zoo/<model>.<method>.safetensors``). The weights must be floating point and finite, and
    a file that records the model it was trained for (:func:`file_metadata`) loads only on a
    model with the same weights (up to casts): on another one its decisions would be wrong."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    from ..models import ModelError, check_weights
    from ..zoo import list_method_weights, method_weights_path
    path = method_weights_path(path, method.name)
    shipped = ", ".join(list_method_weights(method.name)) or "none"
    try:
        weights = load_file(path)
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
        check_weights(weights, method.state_dict(), f"{method.name}: {what} {path}")
        check_trained_for(method, path, what, meta)
        method.load_state_dict(weights)
    except (OptionError, ModelError) as e:
        raise OptionError(str(e)) from None
    except Exception as e:  # missing, not safetensors (SafetensorError), or another model's weights
        raise OptionError(f"{method.name}: cannot load {what} {path}: {e} "
                          f"(reference models with shipped {method.name} weights: {shipped})") from None


# what a learned method's file records about the model it was trained for (safetensors metadata)
TRAINED_FOR, TRAINED_FOR_WEIGHTS = "trained_for", "trained_for_weights"


def file_metadata(method) -> Dict[str, str]:
    """The metadata a learned method's weights file is written with: the options it was trained
    with (``options_metadata()``, where it has one) and the model it was trained for, that is the
    model it is bound to: its name and a sketch of its weights (:func:`leanvit.models.weights_sketch`)."""
    import json
    from ..models import model_name
    meta = dict(method.options_metadata()) if hasattr(method, "options_metadata") else {"method": method.name}
    model = getattr(getattr(method, "info", None), "model", None)
    if model is not None:
        meta[TRAINED_FOR] = model_name(model)
        meta[TRAINED_FOR_WEIGHTS] = json.dumps(_sketch(model), separators=(",", ":"))
    return meta


_SKETCHES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _sketch(model) -> dict:
    """The model's weights sketch, computed again only when a tensor changed (data pointer, version)."""
    from ..models import weights_sketch
    key = tuple((t.data_ptr(), t._version, t.dtype) for t in model.state_dict().values())
    cached = _SKETCHES.get(model)
    if cached is None or cached[0] != key:
        cached = _SKETCHES[model] = (key, weights_sketch(model))
    return cached[1]


def check_trained_for(method, path: str, what: str, meta: Dict[str, str]) -> None:
    """Refuse a method's weights trained for another model than the one it is bound to, naming both.
    A file that records no model (written before files recorded one) cannot be checked: it loads."""
    import json
    from ..models import model_name, sketch_difference
    model = getattr(getattr(method, "info", None), "model", None)
    if model is None or TRAINED_FOR_WEIGHTS not in meta:
        return
    try:
        trained = json.loads(meta[TRAINED_FOR_WEIGHTS])
    except json.JSONDecodeError as e:
        raise OptionError(f"{method.name}: {what} {path}: its metadata {TRAINED_FOR_WEIGHTS} is not JSON ({e})") from None
    difference = sketch_difference(trained, _sketch(model))
    if difference:
        trained_for = meta.get(TRAINED_FOR, "another model")
        raise OptionError(f"{method.name}: {what} {path} were trained for {trained_for}, not for this model "
                          f"{model_name(model)} (its weights have {difference}); run them on {trained_for}, or "
                          "pass weights trained for this model")


def _integral(value) -> bool:
    """An integer, or a float that is one (3.0): not a bool, 3.7, inf or nan."""
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value) \
        and int(value) == value


def check_int(name: str, option: str, value, low: int = 0, high: Optional[int] = None) -> int:
    if not _integral(value) or value < low or (high is not None and value > high):
        bound = f"in {low}..{high}" if high is not None else f">= {low}"
        raise OptionError(f"{name}: {option} must be an integer {bound}, got {value!r}")
    return int(value)


# --- host randomness of forwards in several threads ------------------------------------------------
_SEED_LOCK = threading.Lock()
_FORWARDS = threading.local()  # per thread: {method: the generator of its forward running in this thread}


def start_forward_draws(method, generator: torch.Generator) -> None:
    """At the start of a forward (``begin``): draw the forward's own seed from ``generator`` and
    give this thread a generator seeded with it, which :func:`forward_generator` returns. Forwards
    in several threads on one model then draw whole, reproducible sequences (one seed each), not
    numbers taken in turns from one shared generator."""
    with _SEED_LOCK:
        seed = int(torch.randint(1 << 62, (1,), generator=generator))
    if getattr(_FORWARDS, "generators", None) is None:
        _FORWARDS.generators = weakref.WeakKeyDictionary()
    _FORWARDS.generators[method] = torch.Generator().manual_seed(seed)


def forward_generator(method, fallback: torch.Generator) -> torch.Generator:
    """The generator of ``method``'s forward in this thread (``fallback`` outside a forward)."""
    generators = getattr(_FORWARDS, "generators", None)
    return generators.get(method, fallback) if generators is not None else fallback


# --- forwards that leave no trace on a method ------------------------------------------------
def _snapshot(obj) -> dict:
    """The attributes of a method, copied so that a diagnostic forward leaves no trace
    (PPT's prune statistics, the random method's generator, ...)."""
    saved = {}
    for k, v in vars(obj).items():
        if isinstance(v, torch.Generator):
            saved[k] = (v, v.get_state())
        elif isinstance(v, (dict, list, set)):
            try:
                saved[k] = (v, copy.deepcopy(v))
            except Exception:  # not copyable: keep the reference only
                saved[k] = (v, None)
        else:
            saved[k] = (v, None)
    return saved


def _restore(obj, saved: dict) -> None:
    """Put back every attribute (the same objects, with their saved contents) and drop new ones."""
    for k in [k for k in vars(obj) if k not in saved]:
        delattr(obj, k)
    for k, (v, content) in saved.items():
        if content is not None:
            if isinstance(v, torch.Generator):
                v.set_state(content)
            elif isinstance(v, dict):
                v.clear()
                v.update(content)
            elif isinstance(v, list):
                v[:] = content
            else:
                v.clear()
                v |= content
        setattr(obj, k, v)


@contextlib.contextmanager
def leaves_no_trace(method):
    """A forward inside (a warm-up, a diagnostic) leaves the method as it was: statistics,
    random generators and any attribute it sets are put back afterwards, also on error."""
    saved = _snapshot(method)
    try:
        yield
    finally:
        _restore(method, saved)
