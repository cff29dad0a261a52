"""Where a computation runs: the device, the mixed precision, and the processes of a run.

    device = select_device("cuda")            # a torch.device, or a DeviceError saying what is missing
    check_amp(device, "bf16")
    with autocast(device, "bf16"): logits = runner(images.to(device))
    rank, world = init_distributed(device)    # under torchrun: nccl with one process per GPU, else gloo
    correct, total = all_sum([correct, total])  # summed over the processes (as is, alone)

Every command that runs a model takes ``--device`` and ``--amp`` through these. Only the CPU
path is tested on the machine leanvit is developed on; the CUDA and MPS paths are written the
same way (a device fixture runs the tests on every device present).
"""
from __future__ import annotations

import atexit
import contextlib
import os
from typing import List, Optional, Sequence

import torch
import torch.distributed as dist

DEVICE_HELP = ("where the model runs: cpu, cuda, cuda:N or mps (default: cuda when available, else cpu; "
               "under torchrun, cuda means cuda:LOCAL_RANK)")
AMP_HELP = ("mixed precision (autocast): off (default), bf16 or fp16. On a CPU, bf16 pays off only with bf16 "
            "instructions (AMX or AVX-512 BF16): without them it is slower than fp32, about 4x on a CPU with "
            "AVX2 only (compare with leanvit bench --amp). fp16 needs CUDA")
AMP = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class DeviceError(ValueError):
    """A device or precision this machine does not have."""


def local_rank() -> int:
    """This process's index on its node (torchrun's LOCAL_RANK; 0 alone)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def _cuda_missing() -> str:
    if torch.version.cuda is None:
        return "this PyTorch is built without CUDA"
    return "no CUDA GPU is visible (torch.cuda.is_available() is False)"


def select_device(name: Optional[str] = None) -> torch.device:
    """``name`` (cpu, cuda, cuda:N, mps; None: cuda when available, else cpu) as a device that is
    present. A bare ``cuda`` is this process's GPU: cuda:LOCAL_RANK under torchrun."""
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise DeviceError(f"--device {name!r} is not a device; use cpu, cuda, cuda:N or mps") from None
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {name}: {_cuda_missing()}; use --device cpu")
        index = local_rank() if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise DeviceError(f"--device {name}: GPU {index} does not exist ({torch.cuda.device_count()} visible)")
        return torch.device("cuda", index)
    if device.type == "mps":
        if not torch.backends.mps.is_available():
            raise DeviceError(f"--device {name}: MPS (Apple GPU) is not available here; use --device cpu")
        return device
    raise DeviceError(f"--device {name}: leanvit runs on cpu, cuda and mps, not {device.type}")


def check_amp(device: torch.device, amp: str) -> None:
    """``amp`` (off, bf16, fp16) can run on ``device``; a :class:`DeviceError` says why not."""
    if amp not in AMP:
        raise DeviceError(f"--amp {amp!r}: use one of {', '.join(AMP)}")
    if amp == "fp16" and device.type != "cuda":
        raise DeviceError(f"--amp fp16 needs CUDA (the device is {device}); use --amp bf16 or off")
    if amp == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise DeviceError(f"--amp bf16: {torch.cuda.get_device_name(device)} has no bfloat16; use --amp fp16")
    if AMP[amp] is not None and not torch.amp.is_autocast_available(device.type):
        raise DeviceError(f"--amp {amp}: this PyTorch has no autocast for {device.type}; use --amp off")


def autocast(device: torch.device, amp: str = "off"):
    """A context in which forwards run at ``amp`` precision on ``device`` (nothing for ``off``)."""
    dtype = AMP[amp]
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def pin_memory(device: torch.device) -> bool:
    """Whether loaders should pin their batches: host-to-GPU copies from pinned memory are
    asynchronous."""
    return device.type == "cuda"


def module_device(module: torch.nn.Module) -> torch.device:
    """The device of a module's first parameter or buffer (cpu when it has none)."""
    for t in (*module.parameters(), *module.buffers()):
        return t.device
    return torch.device("cpu")


# --- processes --------------------------------------------------------------------------------------
def init_distributed(device: Optional[torch.device] = None):
    """(rank, world size). Under torchrun (WORLD_SIZE > 1) the process group is formed once: nccl
    when the processes run on GPUs (each on its own, cuda:LOCAL_RANK), gloo on CPUs."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        cuda = device.type == "cuda" if device is not None else torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(device if device is not None else local_rank())
        dist.init_process_group("nccl" if cuda else "gloo")
        # Gloo's worker threads still alive at interpreter teardown abort the process (SIGABRT,
        # "terminate called without an active exception"): leave the group while Python is whole.
        atexit.register(_leave_group)
    rank = dist.get_rank() if dist.is_initialized() else 0
    return rank, world


def _leave_group():
    if dist.is_initialized():
        dist.destroy_process_group()


def is_main() -> bool:
    """Process 0 (or the only one): the process that prints and writes files."""
    return not dist.is_initialized() or dist.get_rank() == 0


def _reduced(values: Sequence[float], op) -> List[float]:
    on = "cuda" if dist.is_initialized() and dist.get_backend() == "nccl" else "cpu"  # nccl reduces GPU tensors
    t = torch.tensor(values, dtype=torch.float64, device=on)
    if dist.is_initialized():
        dist.all_reduce(t, op=op)
    return t.tolist()


def all_sum(values: Sequence[float]) -> List[float]:
    """``values`` summed over the processes, as floats (float64: integer counts stay exact)."""
    return _reduced(values, dist.ReduceOp.SUM)


def all_max(values: Sequence[float]) -> List[float]:
    """The largest of ``values`` over the processes, element by element."""
    return _reduced(values, dist.ReduceOp.MAX)


def all_gather(obj) -> list:
    """Every process's ``obj`` (picklable), in rank order; ``[obj]`` alone."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
