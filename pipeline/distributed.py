"""Multi-process training through torchrun, applied from the outside (models know nothing of DDP).

A training stage with `runtime.nproc > 1` calls `launch(entry, payload, nproc, workdir)`: it writes
the payload (the config as JSON and the paths the worker needs) to `workdir/launch.json` and runs

    python -m torch.distributed.run --standalone --nproc_per_node N -m pipeline.distributed ENTRY launch.json

where ENTRY is "module:function". Each worker process (this module's `main`) joins the process group
(NCCL on CUDA, gloo on the CPU, one GPU per LOCAL_RANK), calls `function(payload)` and leaves the
group. SIGTERM / SIGINT to the launching process are forwarded to torchrun, which forwards them to
the workers (they checkpoint and stop, see pipeline.training.StopSignal).

Multi-node: replace `--standalone` by torchrun's rendezvous arguments (`train.torchrun_args`, e.g.
--nnodes=2 --node-rank=0 --rdzv-backend=c10d --rdzv-endpoint=HEAD:29500) on the node that runs the
stage, and start the same worker command on every other node with its own --node-rank; the
storage root must be shared; rank 0 writes.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from storage_schemas.success import write_atomic

REPO = Path(__file__).resolve().parent.parent


class LaunchError(RuntimeError):
    """The torchrun job failed; the message names the exit status and where its output went."""


class LaunchStopped(RuntimeError):
    """The launching process got SIGTERM / SIGINT and forwarded it; the workers checkpointed and stopped."""


# --- in a worker -------------------------------------------------------------------------------


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def init_process_group(device: torch.device) -> None:
    """Join the torchrun job (RANK / WORLD_SIZE / MASTER_ADDR from its environment): NCCL for a GPU, gloo
    for the CPU. No-op outside torchrun."""
    if "RANK" not in os.environ or dist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """The mean of `value` over all ranks (a copy; `value` itself unchanged)."""
    if world_size() == 1:
        return value.clone()
    out = value.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / world_size()


class Calls(nn.Module):
    """`Calls(model, "nll_per_dim")(x, y)` is `model.nll_per_dim(x, y)` as a forward pass, so that DDP (which
    synchronizes gradients through forward hooks) can wrap a loss that is not the model's forward."""

    def __init__(self, module: nn.Module, method: str):
        super().__init__()
        self.module, self.method = module, method

    def forward(self, *args, **kwargs):
        return getattr(self.module, self.method)(*args, **kwargs)


def data_parallel(module: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel around `module` when a process group is up, else `module` itself."""
    if world_size() == 1:
        return module
    return nn.parallel.DistributedDataParallel(module, device_ids=[device] if device.type == "cuda" else None)


def main(argv: list[str] | None = None) -> None:
    """Worker entry: `python -m pipeline.distributed MODULE:FUNCTION PAYLOAD.json` (under torchrun)."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or ":" not in argv[0]:
        raise SystemExit("usage: python -m pipeline.distributed MODULE:FUNCTION PAYLOAD.json")
    module, function = argv[0].split(":", 1)
    payload = json.loads(Path(argv[1]).read_text())
    fn: Callable[[dict], object] = getattr(importlib.import_module(module), function)
    try:
        fn(payload)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# --- in the launching process --------------------------------------------------------------------


def torchrun_command(entry: str, payload_path: Path, nproc: int, torchrun_args: list[str] | None = None) -> list[str]:
    """The command line of the job: `--standalone` (one node, a free local port) unless rendezvous
    arguments are given."""
    rendezvous = list(torchrun_args) if torchrun_args else ["--standalone"]
    return [sys.executable, "-m", "torch.distributed.run", *rendezvous, f"--nproc_per_node={nproc}",
            "-m", "pipeline.distributed", entry, str(payload_path)]


def launch(entry: str, payload: dict, nproc: int, workdir: Path, *, torchrun_args: list[str] | None = None,
           on_poll: Callable[[], None] | None = None, poll_s: float = 1.0) -> None:
    """Run `entry(payload)` in `nproc` torchrun processes and wait; `on_poll()` runs every `poll_s` seconds
    while waiting (e.g. to relay the workers' metrics file to the log). Raises LaunchStopped after a
    forwarded SIGTERM / SIGINT, LaunchError on any other failure."""
    if nproc < 1:
        raise ValueError(f"runtime.nproc must be >= 1, got {nproc}")
    workdir.mkdir(parents=True, exist_ok=True)
    payload_path = workdir / "launch.json"
    write_atomic(payload_path, json.dumps(payload, indent=1))
    cmd = torchrun_command(entry, payload_path, nproc, torchrun_args)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))}
    proc = subprocess.Popen(cmd, env=env)
    forwarded: list[int] = []

    def forward(signum, frame):
        forwarded.append(signum)
        proc.send_signal(signal.SIGTERM)

    previous = {}
    if _main_thread():
        previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while proc.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=poll_s)
            if on_poll is not None:
                on_poll()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if proc.poll() is None:  # an exception in on_poll: do not leave the job running
            proc.terminate()
            proc.wait()
    if forwarded:
        raise LaunchStopped(f"{entry}: stopped by signal {forwarded[0]} (forwarded to the {nproc} torchrun "
                            f"workers, exit status {proc.returncode})")
    if proc.returncode != 0:
        raise LaunchError(f"{entry}: the torchrun job ({nproc} processes) failed with exit status "
                          f"{proc.returncode}; its traceback is above in stderr (command: {' '.join(cmd)})")


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


if __name__ == "__main__":
    main()
