"""Fan independent jobs (shard ranges) out over Dask, or run them in this process.

One mechanism for every data-parallel stage (`shard`, `encode`, `compress`, `sample`): a job
is a picklable function call that owns its outputs (whole tars, whole Zarr shards), so the
result does not depend on how many workers ran it.

Where a job computes is decided where it runs: it gets the configured device name
(`runtime.device`) and resolves it in its worker (`pipeline.device.resolve_device`), so a
GPU-less launching node never picks the workers' device. Each job reports its placement (host,
worker, device, CUDA_VISIBLE_DEVICES), which the stages record in their metrics.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

from pipeline.progress import progress

log = logging.getLogger("srcflow")
IN_PROCESS = "in-process"  # the worker name of jobs run by the launching process itself
POLL_SECONDS = 5.0  # how often a run with no job finishing checks that its Dask cluster still has workers


class NoWorkersError(TimeoutError):
    """The Dask cluster had no workers for `runtime.dask_worker_wait` seconds."""


@dataclass(frozen=True, order=True)
class Placement:
    """Where one job ran: its host, its Dask worker (or `in-process`), the device it resolved there and that
    worker's CUDA_VISIBLE_DEVICES (None when unset)."""

    host: str
    worker: str
    device: str
    cuda_visible_devices: str | None


@dataclass(frozen=True)
class PlacedJob:
    """`fn(job)` where it runs, with its Placement: `device` (a config's device name, or None for CPU-only jobs) is
    resolved here, in the worker, before the job starts (a worker without the GPU it needs fails in one line)."""

    fn: Callable[[Any], Any]
    device: str | None

    def __call__(self, job: Any) -> tuple[Any, Placement]:
        if self.device:
            from pipeline.device import resolve_device  # torch: not imported by CPU-only jobs (shard)

            device = str(resolve_device(self.device))
        else:
            device = "cpu"
        worker = dask_worker_name()
        placement = Placement(socket.gethostname(), IN_PROCESS if worker is None else worker, device,
                              os.environ.get("CUDA_VISIBLE_DEVICES"))
        return self.fn(job), placement


def dask_worker_name() -> str | None:
    """The name of the Dask worker running this task, or None outside one."""
    if "distributed" not in sys.modules:  # never imported: not a Dask worker
        return None
    from distributed import get_worker

    try:
        return str(get_worker().name)
    except ValueError:
        return None


def runs_here(runtime) -> bool:
    """Whether map_jobs runs a stage's jobs in this process (one worker, no Dask cluster)."""
    return runtime.workers <= 1 and not runtime.dask_address


def launcher_device(runtime) -> str:
    """The device of the process that launches a stage's jobs: theirs when they run here; on Dask the CPU, where the
    launcher only loads the models to check them (a GPU-less login node launches GPU jobs, and a LocalCluster's
    launcher holds no GPU memory its workers need)."""
    from pipeline.device import resolve_device

    return str(resolve_device(runtime.device)) if runs_here(runtime) else "cpu"


def jobs_device(runtime) -> str:
    """What the launcher knows of its jobs' device before they run: resolved, when they run here; else the configured
    name (`cpu` is the CPU on every worker; `auto` and `cuda` are each worker's to resolve)."""
    return launcher_device(runtime) if runs_here(runtime) else runtime.device


def ran_on_metric(ran_on: Counter) -> list[dict]:
    """A stage's `jobs_ran_on` metric: one entry per placement, with its job count."""
    return [{**asdict(p), "jobs": n} for p, n in sorted(ran_on.items())]


@contextmanager
def dask_client(workers: int, address: str | None, worker_env: list[dict[str, str]] | None = None,
                threads: int = 1):
    """A client for `address`, or a LocalCluster of `workers` processes of `threads` threads on 127.0.0.1.

    `worker_env` gives each local worker its own environment (e.g. CUDA_VISIBLE_DEVICES=i).
    """
    from distributed import Client, LocalCluster, Nanny, Scheduler, SpecCluster

    if address:
        try:
            client = Client(address)
        except OSError as e:  # an unreachable scheduler: distributed's timeout names the address
            raise OSError(f"runtime.dask_address: cannot reach the Dask scheduler at {address} "
                          f"({str(e).splitlines()[0]})") from None
        with client:
            yield client
        return
    if worker_env:
        workers_spec = {
            i: {"cls": Nanny, "options": {"nthreads": threads, "env": env, "host": "127.0.0.1"}}
            for i, env in enumerate(worker_env)
        }
        scheduler = {"cls": Scheduler, "options": {"host": "127.0.0.1", "dashboard_address": None}}
        cluster = SpecCluster(workers=workers_spec, scheduler=scheduler, silence_logs=40)
    else:
        cluster = LocalCluster(n_workers=workers, threads_per_worker=threads, processes=True,
                               host="127.0.0.1", dashboard_address=None, silence_logs=40)
    with cluster, Client(cluster) as client:
        yield client


def map_jobs(fn: Callable[..., Any], jobs: Iterable[Any], *, runtime=None, workers: int | None = None,
             device: str | None = None, desc: str = "jobs", unit: str = "jobs",
             weights: Callable[[Any], int] | None = None, threads: int = 1,
             ran_on: Counter | None = None) -> Iterator[Any]:
    """Yield fn(job) for every job, in completion order, with a progress bar.

    `runtime` (the config's runtime section; None: in this process) says where: in-process when `workers` (default
    runtime.workers) <= 1 and no runtime.dask_address is given (tests, a single GPU), else on a LocalCluster of
    `workers` processes (one GPU each, round robin) or the cluster at runtime.dask_address. `device`: the config's
    device name, resolved by each job where it runs (None: CPU-only jobs). `threads`: jobs one worker runs at once, so
    one job's I/O overlaps another's compute (an existing cluster keeps its own thread count). `weights(job)` sizes
    each job for the bar. `ran_on` counts the jobs per Placement.

    On Dask, a cluster without workers (at the start, or after losing its last one) is reported at once and fails
    after runtime.dask_worker_wait seconds; each result is released once received, so a worker lost later never
    makes Dask recompute jobs whose results (and commits) are in.
    """
    jobs = list(jobs)
    size = weights or (lambda job: 1)
    address = runtime.dask_address if runtime is not None else None
    workers = workers if workers is not None else (runtime.workers if runtime is not None else 1)
    ran_on = Counter() if ran_on is None else ran_on
    placed = PlacedJob(fn, device)
    with progress(desc, sum(size(j) for j in jobs), unit) as meter:
        if runtime is None or (workers <= 1 and not address):
            if threads <= 1:
                for job in jobs:
                    result, where = placed(job)
                    ran_on[where] += 1
                    meter.advance(size(job))
                    yield result
                return
            pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=desc)
            try:
                yield from completed({pool.submit(placed, job): job for job in jobs}, meter, size, ran_on)
            finally:
                pool.shutdown(wait=True, cancel_futures=True)  # on an error: no job starts after it
            return
        worker_env = gpu_worker_env(device, workers) if not address else None
        with dask_client(workers, address, worker_env, threads) as client:
            futures = {client.submit(placed, job, pure=False): job for job in jobs}
            watch = WorkerWatch(client, desc, runtime.dask_worker_wait, len(jobs))
            watch(len(futures))  # says at once when there is no worker
            yield from completed(futures, meter, size, ran_on, idle=watch,
                                 poll=min(POLL_SECONDS, runtime.dask_worker_wait / 4))


def completed(futures: dict, meter, size: Callable[[Any], int], ran_on: Counter,
              idle: Callable[[int], None] | None = None, poll: float = POLL_SECONDS) -> Iterator[Any]:
    """Results of `futures` (future -> job) as they finish, thread or Dask futures alike. A result is dropped
    (released) once received; `idle(jobs pending)` is called whenever none finishes for `poll` seconds."""
    finished: queue.SimpleQueue = queue.SimpleQueue()
    for future in futures:
        future.add_done_callback(finished.put)
    while futures:
        try:
            future = finished.get(timeout=poll)
        except queue.Empty:
            if idle is not None:
                idle(len(futures))
            continue
        result, where = future.result()  # re-raises a job's exception here
        job = futures.pop(future)
        if hasattr(future, "release"):
            future.release()  # a Dask result: the scheduler forgets it (a lost worker's copy is not recomputed)
        ran_on[where] += 1
        meter.advance(size(job))
        yield result


class WorkerWatch:
    """Called while a Dask run waits: says once when the cluster has no worker, and fails in one line when it has had
    none for `wait` seconds (runtime.dask_worker_wait)."""

    def __init__(self, client, desc: str, wait: float, total: int):
        self.client, self.desc, self.wait, self.total = client, desc, wait, total
        self.since: float | None = None

    def __call__(self, pending: int) -> None:
        if self.client.nthreads():
            if self.since is not None:
                log.info("%s: Dask workers joined; going on", self.desc)
            self.since = None
            return
        address = self.client.scheduler.address
        if self.since is None:
            self.since = time.monotonic()
            log.warning("%s: the Dask cluster at %s has no workers; waiting up to %g s for one "
                        "(runtime.dask_worker_wait)", self.desc, address, self.wait)
        elif time.monotonic() - self.since >= self.wait:
            raise NoWorkersError(f"{self.desc}: the Dask cluster at {address} has had no workers for {self.wait:g} s "
                                 f"(runtime.dask_worker_wait); {pending} of {self.total} jobs not done, the committed "
                                 f"ones are kept: start workers and run again")


def gpu_worker_env(device: str | None, workers: int) -> list[dict[str, str]] | None:
    """A LocalCluster on a CUDA device: worker i sees GPU i mod (the GPUs of this node) alone. None on the CPU."""
    if not device or device == "cpu" or workers <= 1:
        return None
    import torch

    gpus = torch.cuda.device_count()
    return [{"CUDA_VISIBLE_DEVICES": str(i % gpus)} for i in range(workers)] if gpus else None


def cpu_workers(requested: int) -> int:
    return max(1, min(requested, os.cpu_count() or 1))
