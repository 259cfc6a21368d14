"""Where a stage computes and in what arithmetic: the device a config names, mixed precision, torch.compile.

Nothing here knows about training or data; every stage (training and inference) calls these.
"""

from __future__ import annotations

import os
from contextlib import nullcontext

import torch


def resolve_device(name: str) -> torch.device:
    """The device a config names: "auto" (CUDA when available, else CPU), "cpu", "cuda" or "cuda:<i>".
    Under torchrun (LOCAL_RANK set) a bare "cuda" or "auto" means this process's GPU, cuda:LOCAL_RANK."""
    if name not in ("auto", "cpu", "cuda") and not name.startswith("cuda:"):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:<i>', got {name!r}")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but torch.cuda.is_available() is False "
                         f"(no GPU visible or a CPU-only torch build); use device=cpu or auto")
    if name.startswith("cuda:"):
        return torch.device(name)
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())))


def autocast(device: torch.device | str):
    """bf16 autocast on CUDA (no loss scaling needed), a no-op context on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def inference_precision(device: torch.device | str, precision: str):
    """The arithmetic of a frozen model's forward (encode.precision), on any device:
      fp32: float32 with TF32 matmuls and convolutions on CUDA, as RAE runs its encoder (src/train.py,
            src/sample.py: torch.backends.cuda.matmul.allow_tf32 = True; train_stage1.py --precision fp32).
            Process-wide, like RAE's: jobs in threads share it, and nothing else here wants strict fp32;
      bf16: bf16 autocast (CUDA and CPU), ~0.4% relative error per DINOv2-B token against fp32."""
    device = torch.device(device)
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision != "fp32":
        raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return nullcontext()


def compile_enabled(setting: str | bool, device: torch.device | str) -> bool:
    """A `compile: auto | true | false` key: auto compiles on CUDA only (inductor on the CPU needs a C++
    compiler and minutes of compile time for seconds of training)."""
    return torch.device(device).type == "cuda" if setting == "auto" else bool(setting)
