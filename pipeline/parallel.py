"""Fan independent jobs (shard ranges) out over Dask, or run them in this process.

One mechanism for every data-parallel stage (`shard`, `encode`, `compress`, `sample`): a job
is a picklable function call that owns its outputs (whole tars, whole Zarr shards), so the
result does not depend on how many workers ran it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from typing import Any

from pipeline.progress import progress


@contextmanager
def dask_client(workers: int, address: str | None, worker_env: list[dict[str, str]] | None = None,
                threads: int = 1):
    """A client for `address`, or a LocalCluster of `workers` processes of `threads` threads on 127.0.0.1.

    `worker_env` gives each local worker its own environment (e.g. CUDA_VISIBLE_DEVICES=i).
    """
    from distributed import Client, LocalCluster, Nanny, Scheduler, SpecCluster

    if address:
        with Client(address) as client:
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


def map_jobs(fn: Callable[..., Any], jobs: Iterable[Any], *, workers: int = 1, dask_address: str | None = None,
             desc: str = "jobs", unit: str = "jobs", weights: Callable[[Any], int] | None = None,
             worker_env: list[dict[str, str]] | None = None, threads: int = 1) -> Iterator[Any]:
    """Yield fn(job) for every job, in completion order, with a progress bar.

    In-process when workers <= 1 and no address is given (tests, a single GPU).
    `threads`: jobs one worker runs at once, so one job's I/O overlaps another's compute (an existing
    cluster at `dask_address` keeps its own thread count). `weights(job)` sizes each job for the bar.
    """
    jobs = list(jobs)
    size = weights or (lambda job: 1)
    with progress(desc, sum(size(j) for j in jobs), unit) as meter:
        if workers <= 1 and not dask_address and not worker_env:
            if threads <= 1:
                for job in jobs:
                    result = fn(job)
                    meter.advance(size(job))
                    yield result
                return
            pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=desc)
            try:
                yield from completed({pool.submit(fn, job): job for job in jobs}, as_completed, meter, size)
            finally:
                pool.shutdown(wait=True, cancel_futures=True)  # on an error: no job starts after it
            return
        from distributed import as_completed as dask_as_completed

        with dask_client(workers, dask_address, worker_env, threads) as client:
            futures = {client.submit(fn, job, pure=False): job for job in jobs}
            yield from completed(futures, dask_as_completed, meter, size)


def completed(futures: dict, in_completion_order: Callable, meter, size: Callable[[Any], int]) -> Iterator[Any]:
    """Results of `futures` (future -> job) as they finish, thread or Dask futures alike."""
    for future in in_completion_order(futures):
        result = future.result()  # re-raises a job's exception here
        meter.advance(size(futures[future]))
        yield result


def gpu_worker_env(device: str, workers: int, dask_address: str | None) -> list[dict[str, str]] | None:
    """Local workers on a CUDA device: worker i sees GPU i mod (the GPUs here) alone. None in-process, on the CPU
    or on an existing cluster (its workers keep their own environment)."""
    import torch

    gpus = torch.cuda.device_count() if str(device).startswith("cuda") else 0
    if not gpus or workers <= 1 or dask_address:
        return None
    return [{"CUDA_VISIBLE_DEVICES": str(i % gpus)} for i in range(workers)]


def cpu_workers(requested: int) -> int:
    return max(1, min(requested, os.cpu_count() or 1))
