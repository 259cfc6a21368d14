"""Multi-process training through torchrun, applied from the outside (models know nothing of DDP).

A training stage (fit_src, train_flow) whose world size -- runtime.nproc processes per node x the nodes of
train.torchrun_args (--nnodes, 1 without) -- is above 1 calls `launch(entry, payload, nproc, workdir, ...)`.
It writes the job (entry "module:function", the payload: the config as JSON and the paths the worker needs,
and a fresh attempt id) to `workdir/attempt-<id>.json`, deleting the files of earlier attempts, and runs

    python -m torch.distributed.run <--standalone | train.torchrun_args> --nproc_per_node N \
        -m pipeline.distributed workdir/attempt-<id>.json

Every other node runs torchrun with its own rendezvous arguments and no job file:

    python -m torch.distributed.run --nnodes=2 --node-rank=1 --master-addr=HEAD --master-port=29500 \
        --nproc_per_node N -m pipeline.distributed

Each worker (this module's `main`) connects to the torchrun job's key-value store (the one its process group
is built on); the launching node's workers put the job there and every other worker takes it from there, so
a joining node reads no file and can never run a failed attempt's job. Then each joins the process group (NCCL
on CUDA, gloo on the CPU, one GPU per LOCAL_RANK), calls `function(payload)` and leaves the group. Rank 0,
on whichever node the rendezvous puts it, writes; the storage root must be the same path on every node.
SIGTERM / SIGINT to the launching process are forwarded to torchrun, which forwards them to the workers
(they agree on a step, checkpoint and stop, see pipeline.training.StopSignal). Every message names the world
size as nodes x processes.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from pipeline.config import torchrun_nodes
from pipeline.device import resolve_device
from storage_schemas.success import write_atomic

REPO = Path(__file__).resolve().parent.parent
JOB_KEY = "srcflow/job"  # the job in the torchrun store, put there by the launching node's workers
JOB_WAIT = timedelta(minutes=5)  # how long a joining node's workers wait for it after the rendezvous


class LaunchError(RuntimeError):
    """The torchrun job failed; the message names the exit status and where its output went."""


class LaunchStopped(RuntimeError):
    """The launching process got SIGTERM / SIGINT and forwarded it; the workers checkpointed and stopped."""


# --- in a worker -------------------------------------------------------------------------------


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def job_size(nproc: int, torchrun_args: list[str] | None) -> tuple[int, int]:
    """(nodes, world size) of a training stage: the nodes of torchrun's --nnodes (1 without) x runtime.nproc."""
    nodes = torchrun_nodes(torchrun_args)
    return nodes, nodes * nproc


def world_text(nodes: int, nproc: int) -> str:
    """"world size 4 (2 nodes x 2 processes)": how every message names the size of a torchrun job."""
    return (f"world size {nodes * nproc} ({nodes} node{'s' * (nodes != 1)} x {nproc} "
            f"process{'es' * (nproc != 1)})")


def current_world_text(nproc: int, torchrun_args: list[str] | None) -> str:
    """world_text of the job this process is in (world size 1 outside torchrun)."""
    if world_size() == 1:
        return world_text(1, 1)
    return world_text(job_size(nproc, torchrun_args)[0], nproc)


def worker_logging(level: str, progress_mode) -> None:
    """A worker's log lines name its rank; ranks other than 0 log warnings only and show no progress bars."""
    from pipeline.progress import set_mode

    logging.basicConfig(level=level if rank() == 0 else logging.WARNING,
                        format=f"%(asctime)s %(name)s rank {rank()}: %(message)s")
    set_mode(progress_mode if rank() == 0 else False)


def gather(value) -> list:
    """`value` of every rank, in rank order (a picklable object; [value] outside a process group)."""
    if world_size() == 1:
        return [value]
    out = [None] * world_size()
    dist.all_gather_object(out, value)
    return out


def init_process_group(device: torch.device, store: dist.Store, rank: int, world_size: int) -> None:
    """Join the process group on the torchrun job's store: NCCL for a GPU, gloo for the CPU."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", store=store, rank=rank, world_size=world_size, device_id=device)
    else:
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size)


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
    """DistributedDataParallel around `module` when a process group is up, else `module` itself.

    find_unused_parameters=True, for exact resume: by default DDP rebuilds its gradient buckets after the first
    iteration of each process, in the order the gradients became ready, so a process resumed at step s would
    all-reduce step s's gradients in the first iteration's layout while the uninterrupted run used the rebuilt
    one, and with 3 or more ranks a sum in another order rounds differently (weights off by up to 5e-5 at
    world size 4).
    With it DDP keeps one bucket layout, reversed parameter order, for the whole run, at the cost of one walk
    of the autograd graph per step (every parameter is used, so none is ever skipped)."""
    if world_size() == 1:
        return module
    return nn.parallel.DistributedDataParallel(module, device_ids=[device] if device.type == "cuda" else None,
                                               find_unused_parameters=True)


def global_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance of x (rows, channels) over the rows of every rank, as one process
    computes them on the global batch, differentiable (as SyncBatchNorm's). Every rank must hold as many rows
    (the local batch)."""
    if world_size() == 1:
        return x.mean(0), x.var(0, unbiased=False)
    count = x.shape[0] * world_size()
    mean = SumOverRanks.apply(x.sum(0)) / count
    return mean, SumOverRanks.apply((x - mean).square().sum(0)) / count


class SumOverRanks(torch.autograd.Function):
    """All-reduce (sum) whose backward sums the gradient over the ranks too: every rank's loss depends on every
    rank's input. (torch.distributed.nn.functional.all_reduce, deprecated in torch 2.14.)"""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        out = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return SumOverRanks.apply(grad)


def main(argv: list[str] | None = None) -> None:
    """Worker entry, under torchrun: `python -m pipeline.distributed JOB.json` on the node that launched the job,
    `python -m pipeline.distributed` (no argument) on every node that joins it."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) > 1 or "RANK" not in os.environ:
        raise SystemExit("usage (under torchrun): python -m pipeline.distributed [JOB.json]; the launching node "
                         "passes its job file, the other nodes join without one")
    global_rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    store, _, _ = next(dist.rendezvous("env://"))
    job = share_job(store, json.loads(Path(argv[0]).read_text()) if argv else None, global_rank, size)
    where = f"{job['entry']} rank {global_rank} of {world_text(job['nodes'], job['nproc'])}, attempt {job['attempt']}"
    local = int(os.environ.get("LOCAL_WORLD_SIZE", job["nproc"]))
    if local != job["nproc"] or size != job["nodes"] * job["nproc"]:
        raise SystemExit(f"{where}: this node runs {local} processes of a world of {size}; start every node with "
                         f"--nproc_per_node={job['nproc']} (runtime.nproc) and --nnodes={job['nodes']}")
    if not argv:
        print(f"{where}: joined", file=sys.stderr, flush=True)
    module, function = job["entry"].split(":", 1)
    fn: Callable[[dict], object] = getattr(importlib.import_module(module), function)
    init_process_group(resolve_device(job["device"]), store, global_rank, size)
    try:
        fn(job["payload"])
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def share_job(store: dist.Store, job: dict | None, global_rank: int, size: int) -> dict:
    """The job of this torchrun job: put into its store by the launching node's workers (`job` given), taken
    from it by the others. Two different jobs in one rendezvous, or none within JOB_WAIT, fail in one line."""
    if job is not None:
        text = json.dumps(job, sort_keys=True)
        held = store.compare_set(JOB_KEY, "", text).decode()
        if held != text:
            raise SystemExit(f"rank {global_rank} of world size {size}: two nodes launched a job into one rendezvous "
                             f"({json.loads(held)['entry']} attempt {json.loads(held)['attempt']}, and "
                             f"{job['entry']} attempt {job['attempt']}); give each stage's nodes their own "
                             f"--rdzv-id or port")
        return job
    try:
        store.wait([JOB_KEY], JOB_WAIT)
    except dist.DistError:
        raise SystemExit(f"rank {global_rank} of world size {size}: no node launched a job into this rendezvous in "
                         f"{JOB_WAIT.seconds // 60} minutes; start the stage (`srcflow run`) on the launching node "
                         f"with the same rendezvous in train.torchrun_args") from None
    return json.loads(store.get(JOB_KEY))


# --- in the launching process --------------------------------------------------------------------


def torchrun_command(job_path: Path, nproc: int, torchrun_args: list[str] | None = None) -> list[str]:
    """The launching node's command line: `--standalone` (one node, a free local port) unless rendezvous
    arguments are given."""
    rendezvous = list(torchrun_args) if torchrun_args else ["--standalone"]
    return [sys.executable, "-m", "torch.distributed.run", *rendezvous, f"--nproc_per_node={nproc}",
            "-m", "pipeline.distributed", str(job_path)]


def launch(entry: str, payload: dict, nproc: int, workdir: Path, *, device: str,
           torchrun_args: list[str] | None = None, on_poll: Callable[[], None] | None = None,
           poll_s: float = 1.0) -> None:
    """Run `entry(payload)` on every process of the torchrun job (this node's `nproc`, and those of the nodes
    that join it through `torchrun_args`) and wait; `device` is runtime.device; `on_poll()` runs every `poll_s`
    seconds while waiting (e.g. to relay the workers' metrics file to the log). Raises LaunchStopped after a
    forwarded SIGTERM / SIGINT, LaunchError on any other failure."""
    if nproc < 1:
        raise ValueError(f"runtime.nproc must be >= 1, got {nproc}")
    nodes, _ = job_size(nproc, torchrun_args)
    size = world_text(nodes, nproc)
    attempt = uuid.uuid4().hex[:12]
    workdir.mkdir(parents=True, exist_ok=True)
    for old in workdir.glob("attempt-*.json"):  # earlier attempts' jobs: their processes are gone
        old.unlink(missing_ok=True)
    job_path = workdir / f"attempt-{attempt}.json"
    write_atomic(job_path, json.dumps({"entry": entry, "attempt": attempt, "nodes": nodes, "nproc": nproc,
                                       "device": device, "payload": payload}, indent=1))
    cmd = torchrun_command(job_path, nproc, torchrun_args)
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
        raise LaunchStopped(f"{entry}: stopped by signal {forwarded[0]} (forwarded to the torchrun job, {size}, "
                            f"attempt {attempt}; exit status {proc.returncode})")
    if proc.returncode != 0:
        raise LaunchError(f"{entry}: the torchrun job ({size}, attempt {attempt}) failed with exit status "
                          f"{proc.returncode}; its workers' errors are above in stderr (command: {' '.join(cmd)})")
    job_path.unlink()  # done: the output keeps no launch files (a failed attempt's stays until the next one)
    with contextlib.suppress(OSError):
        workdir.rmdir()


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


if __name__ == "__main__":
    main()
