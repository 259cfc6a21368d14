"""Where a stage computes and in what arithmetic: the device a config names, mixed precision, torch.compile.

Nothing here knows about training or data; every stage (training and inference) calls these.
"""

from __future__ import annotations

import os
import re
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch


def resolve_device(name: str) -> torch.device:
    """The device a config names, resolved in the process that computes on it: "auto" (CUDA when this process sees
    a GPU, else CPU), "cpu", "cuda" or "cuda:<i>". A bare "cuda" or "auto" means this process's GPU: cuda:LOCAL_RANK
    under torchrun; in a Dask worker that sees several GPUs, the one `worker_gpu` gives it (made current, so pinned
    host memory and streams land there too); else the current one (a worker pinned by CUDA_VISIBLE_DEVICES sees one)."""
    if name not in ("auto", "cpu", "cuda") and not name.startswith("cuda:"):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:<i>', got {name!r}")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but torch.cuda.is_available() is False on {where()} "
                         f"(no GPU visible or a CPU-only torch build); use device=cpu or auto")
    if name.startswith("cuda:"):
        return torch.device(name)
    if "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    from pipeline.parallel import dask_worker_name

    worker = dask_worker_name()
    if worker is None:
        return torch.device("cuda", torch.cuda.current_device())
    index = worker_gpu(torch.cuda.device_count(), worker)
    torch.cuda.set_device(index)  # per thread: each job's thread resolves its device
    return torch.device("cuda", index)


WORKER_INDEX = re.compile(r"(?:^|-)(\d+)$")  # `3`, `gpu-node-3`, `SLURMCluster-12-3`: the worker's index on its node


def worker_gpu(gpus: int, worker: str) -> int:
    """The GPU of Dask worker `worker` among the `gpus` it sees. With one (pinned by CUDA_VISIBLE_DEVICES: `dask cuda
    worker`, SLURM's GPU binding, a LocalCluster of `runtime.workers`), that one. With several, GPU i mod gpus for a
    worker named `i` or `NAME-i`, the names a LocalCluster, `dask worker --nworkers N --name NAME` and dask-jobqueue's
    `processes=N` give; a worker without an index is refused: every such worker would compute on GPU 0."""
    if gpus <= 1:
        return 0
    index = WORKER_INDEX.search(worker)
    if index is None:
        raise ValueError(f"Dask worker {worker!r} on {socket.gethostname()} sees {gpus} GPUs and none is its own: "
                         f"start one worker per GPU (CUDA_VISIBLE_DEVICES=i per worker, `dask worker --nworkers "
                         f"{gpus} --name HOST` or `dask cuda worker`; README \"Scale-out\")")
    return int(index.group(1)) % gpus


def where() -> str:
    """This host, and the Dask worker when in one, for messages."""
    from pipeline.parallel import dask_worker_name

    worker = dask_worker_name()
    return socket.gethostname() + (f" (Dask worker {worker})" if worker is not None else "")


def autocast(device: torch.device | str):
    """bf16 autocast on CUDA (no loss scaling needed), a no-op context on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


@contextmanager
def inference_precision(device: torch.device | str, precision: str) -> Iterator[None]:
    """The arithmetic of a frozen encoder's forward (encode.precision), on any device, for the `with` block only:
      fp32: float32 with TF32 matmuls and convolutions on CUDA, as RAE runs its encoder (src/train.py,
            src/sample.py: torch.backends.cuda.matmul.allow_tf32 = True; train_stage1.py --precision fp32). The
            flags are process-wide, so they are set for the block and restored after it (tf32): what runs next in
            the process (compress, likelihoods, the Bayes classifier) computes in strict fp32 whatever ran before;
      bf16: bf16 autocast (CUDA and CPU), ~0.4% relative error per DINOv2-B token against fp32."""
    device = torch.device(device)
    if precision == "bf16":
        with torch.autocast(device.type, dtype=torch.bfloat16):
            yield
        return
    if precision != "fp32":
        raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
    with tf32() if device.type == "cuda" else nullcontext():
        yield


FRESH_PROCESS = {"cuda.matmul.allow_tf32": False, "cudnn.allow_tf32": True}  # torch's defaults


def precision_flags() -> dict[str, bool]:
    """The process-wide TF32 flags, torch.backends' legacy ones (as RAE sets them; torch refuses a mix of these and
    the newer fp32_precision API in one process)."""
    return {"cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "cudnn.allow_tf32": torch.backends.cudnn.allow_tf32}


def set_precision_flags(flags: dict[str, bool]) -> None:
    torch.backends.cuda.matmul.allow_tf32 = flags["cuda.matmul.allow_tf32"]
    torch.backends.cudnn.allow_tf32 = flags["cudnn.allow_tf32"]


class _SharedTF32:
    """TF32 on while at least one holder is inside: encode's jobs run forwards in threads at once, so the flags are
    set by the first to enter and restored by the last to leave (never turned off under another's forward)."""

    def __init__(self):
        self.lock, self.holders, self.saved = threading.Lock(), 0, None

    @contextmanager
    def __call__(self) -> Iterator[None]:
        with self.lock:
            if self.holders == 0:
                self.saved = precision_flags()
                set_precision_flags(dict.fromkeys(FRESH_PROCESS, True))
            self.holders += 1
        try:
            yield
        finally:
            with self.lock:
                self.holders -= 1
                if self.holders == 0:
                    set_precision_flags(self.saved)


tf32 = _SharedTF32()


@contextmanager
def fresh_numerics() -> Iterator[None]:
    """A stage's arithmetic as in a fresh process (torch's default TF32 flags), whatever ran before it in this one;
    the caller's flags are restored afterwards. stages.runner runs every stage inside it."""
    saved = precision_flags()
    set_precision_flags(FRESH_PROCESS)
    try:
        yield
    finally:
        set_precision_flags(saved)


def compile_enabled(setting: str | bool, device: torch.device | str) -> bool:
    """A `compile: auto | true | false` key: auto compiles on CUDA only (inductor on the CPU needs a C++
    compiler and minutes of compile time for seconds of training)."""
    return torch.device(device).type == "cuda" if setting == "auto" else bool(setting)
