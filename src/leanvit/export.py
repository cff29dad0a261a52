"""ONNX export of an adapted model, and running the exported file with onnxruntime.

Only methods with fixed shapes export (``Reduction.why_not_static()`` is None): dense, tome,
evit, ppt (both branches computed, each image picks its own), random with ``fixed=true``,
channels, dynamicvit at inference. Per-image token counts (ats, rl4evit, prance) would need the
host to read tensor values mid-graph; they are refused with the reason. The batch axis is dynamic.

Needs the ``export`` extra: ``pip install leanvit[export]`` (onnx, onnxruntime, onnxscript).
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from .device import module_device
from .methods.base import leaves_no_trace
from .runtime import LeanViT

EXTRA = "pip install 'leanvit[export]' (onnx, onnxruntime, onnxscript)"


class ExportError(ValueError):
    """The runner cannot be exported (a per-image method, a missing package); the message says why."""


def why_not_exportable(runner: LeanViT) -> Optional[str]:
    """None if ``runner`` (in eval mode) exports with static shapes, else the one-line reason."""
    if not isinstance(runner, LeanViT):
        return f"export takes a leanvit runner (leanvit.adapt(model, method)), got {type(runner).__name__}"
    if runner.masked:
        return "a masked runner (training execution) does not export; export the inference runner"
    if runner.track_source:
        return "source tracking (token maps) does not export; set track_source=False"
    reason = runner.method.why_not_static()
    return None if reason is None else f"method {runner.method.name!r} cannot be exported with static shapes: {reason}"


def _require(*modules: str) -> None:
    import importlib
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            raise ExportError(f"ONNX export needs the python package {name!r}: {EXTRA}") from None


@contextlib.contextmanager
def _inference(runner: LeanViT):
    """The runner in eval mode, its method's state (statistics, generators) put back afterwards."""
    was_training = runner.training
    runner.eval()
    try:
        with leaves_no_trace(runner.method), torch.no_grad():
            yield
    finally:
        runner.train(was_training)


def export_onnx(runner: LeanViT, path: Union[str, Path], input_size: Optional[Sequence[int]] = None,
                opset: Optional[int] = None) -> Path:
    """Write ``runner`` (a dense or statically reduced model) to the ONNX file ``path``: input
    ``images`` (batch, C, H, W) with a dynamic batch axis, output ``logits`` (batch, classes).
    ``input_size`` (C, H, W): default, the model's own. Exported in eval mode, on the runner's
    device. Raises :class:`ExportError` for what cannot be exported, naming why."""
    with _inference(runner):
        reason = why_not_exportable(runner)
    if reason:
        raise ExportError(reason)
    _require("onnx", "onnxscript")
    size = tuple(input_size or runner.pretrained_cfg.get("input_size") or (3, *runner.model.patch_embed.img_size))
    images = torch.randn(2, *size, device=module_device(runner))  # batch 2: a batch of 1 would be specialised
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    batch = torch.export.Dim("batch", min=1, max=65536)
    with _inference(runner):
        try:
            program = torch.onnx.export(runner, (images,), dynamo=True, input_names=["images"],
                                        output_names=["logits"], dynamic_shapes={"images": {0: batch}},
                                        opset_version=opset, optimize=True, verbose=False)
        except Exception as e:  # the exporter's own failure: keep its first line
            first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
            raise ExportError(f"torch.onnx.export of {runner.method!r} failed: {first}") from e
    program.save(str(path))
    return path


def onnx_session(path: Union[str, Path], threads: Optional[int] = None):
    """An onnxruntime CPU session of the exported file (``threads``: intra-op threads)."""
    _require("onnxruntime")
    import onnxruntime as ort
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_onnx(session, images: Tensor) -> Tensor:
    """Logits of ``images`` (B, C, H, W) from an exported model: a session or the file's path."""
    if isinstance(session, (str, Path)):
        session = onnx_session(session)
    out = session.run(["logits"], {"images": images.detach().cpu().float().numpy()})[0]
    return torch.from_numpy(out)
