"""Scale-out on a simulated cluster: an external `dask scheduler` and `dask worker` processes on 127.0.0.1, a real
Prefect server, and a store shared by "hosts" (lease locks, forced rebuilds without renameat2's exchange).

Every process started here is stopped by its id (tests.test_prefect.stop).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
import zarr
from typer.testing import CliRunner

from pipeline import artifacts
from pipeline.artifacts import ArtifactStore
from pipeline.config import config_dict
from pipeline.parallel import NoWorkersError
from srcflow.cli import app
from stages.runner import run_pipeline
from tests.conftest import REPO
from tests.test_prefect import PREFECT, STATES, free_port, stop, wait_healthy

DASK = str(Path(sys.executable).with_name("dask"))
SHARDS = 16  # the `stores` encode: 128 rows, 8 per shard


def dask_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **extra}


class Cluster:
    """An external Dask cluster: `dask scheduler` and `dask worker`s as subprocesses, each in its own process group."""

    def __init__(self, tmp_path: Path):
        self.tmp, self.procs = tmp_path, []
        port = free_port()
        self.address = f"tcp://127.0.0.1:{port}"
        self.scheduler = self.start("scheduler", [DASK, "scheduler", "--host", "127.0.0.1", "--port", str(port),
                                                  "--no-dashboard"], dask_env())

    def start(self, name: str, command: list[str], env: dict[str, str]) -> subprocess.Popen:
        with open(self.tmp / f"{name}.log", "w") as log:
            proc = subprocess.Popen(command, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        self.procs.append(proc)
        return proc

    def worker(self, name: str, *options: str, **env: str) -> subprocess.Popen:
        return self.start(name, [DASK, "worker", self.address, "--name", name, "--nthreads", "1", "--host",
                                 "127.0.0.1", "--no-dashboard", "--memory-limit", "0", "--local-directory",
                                 str(self.tmp / name), *options], dask_env(**env))

    def wait_for_workers(self, n: int) -> None:
        from distributed import Client

        with Client(self.address, timeout=60) as client:
            client.wait_for_workers(n, timeout=120)

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text()[-3000:]

    def stop(self) -> None:
        """Each process by its group: Dask's on SIGTERM (well under a second; SIGINT takes ~10 s), Prefect's on SIGINT
        (tests.test_prefect.stop); the workers before the scheduler, the Prefect worker before its server."""
        for proc in reversed(self.procs):
            stop(proc, signal.SIGTERM if proc.args[0] == DASK else signal.SIGINT)


@pytest.fixture
def cluster(tmp_path):
    c = Cluster(tmp_path)
    try:
        yield c
    finally:
        c.stop()


def features(manifest) -> dict[str, np.ndarray]:
    group = zarr.open_group(str(manifest.dir / "features.zarr"), mode="r")
    return {name: arr[...] for name, arr in group.arrays()}


def files_of(directory: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(directory.glob("*.npz"))}


def test_jobs_on_an_external_cluster_resolve_their_device_in_their_worker_and_record_it(stores, cluster):
    """Two workers pinned to two (simulated) GPUs by their own CUDA_VISIBLE_DEVICES; the launching process (this
    one, GPU-less) ships only the configured device name. Each job's placement is in the stage's metrics, and the
    store is the one a single in-process run writes."""
    for gpu in ("0", "1"):
        cluster.worker(f"gpu-{gpu}", CUDA_VISIBLE_DEVICES=gpu)
    cluster.wait_for_workers(2)
    cfg = stores("external", "runtime.device=auto", f"runtime.dask_address={cluster.address}", until="shard")
    encode = run_pipeline(cfg, until="encode")["encode"]

    ran_on = encode.metrics["jobs_ran_on"]
    assert {(r["worker"], r["cuda_visible_devices"]) for r in ran_on} == {("gpu-0", "0"), ("gpu-1", "1")}, ran_on
    assert all(r["device"] == "cpu" and r["host"] for r in ran_on)  # auto, on a worker whose GPU is simulated
    assert sum(r["jobs"] for r in ran_on) == SHARDS
    reference = stores("in-process", until="encode")  # the same config, its jobs run one by one in this process
    in_process = run_pipeline(reference, until="encode")["encode"]
    assert in_process.fingerprint == encode.fingerprint
    assert in_process.metrics["jobs_ran_on"][0]["worker"] == "in-process"
    a, b = features(encode), features(in_process)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)

    # `cuda` is resolved by each job in its worker: the GPU-less launcher does not refuse it, the worker does
    cuda = stores("external-cuda", "runtime.device=cuda", "runtime.memory_check=false",
                  f"runtime.dask_address={cluster.address}", until="shard")
    with pytest.raises(ValueError, match=r"device 'cuda' requested but .* on \S+ \(Dask worker gpu-[01]\)"):
        run_pipeline(cuda, until="encode")


def test_a_cluster_that_loses_its_last_worker_fails_after_the_wait_and_a_rerun_keeps_the_committed_shards(
        stores, cluster, caplog):
    # the only worker dies (SIGKILL, no nanny to restart it) right after the third shard is committed
    preload = REPO / "tests" / "dask_preloads" / "kill_after_commits.py"
    killed = cluster.worker("doomed", "--no-nanny", "--preload", str(preload), SRCFLOW_TEST_KILL_AFTER="3")
    cluster.wait_for_workers(1)
    cfg = stores("lost-worker", f"runtime.dask_address={cluster.address}", "runtime.dask_worker_wait=3",
                 until="shard")
    started = time.monotonic()
    with caplog.at_level(logging.INFO, logger="srcflow"), pytest.raises(NoWorkersError) as failure:
        run_pipeline(cfg, until="encode")
    message = str(failure.value)
    assert killed.wait(timeout=30) == -signal.SIGKILL, cluster.log("doomed")
    assert "\n" not in message and f"the Dask cluster at {cluster.address} has had no workers for 3 s" in message
    assert "runtime.dask_worker_wait" in message and f"of {SHARDS} jobs not done" in message
    assert time.monotonic() - started < 60
    assert "has no workers; waiting up to 3 s" in caplog.text  # said before failing

    commits = Path(cfg.storage.root) / "encode"
    (out,) = [d for d in commits.iterdir() if d.is_dir()]
    committed = files_of(out / "commits")
    assert len(committed) >= 3
    cluster.worker("rescue")
    cluster.wait_for_workers(1)
    encode = run_pipeline(cfg, until="encode")["encode"]
    after = files_of(encode.dir / "commits")
    assert len(after) == SHARDS and {k: after[k] for k in committed} == committed  # not one committed shard redone
    assert sum(r["jobs"] for r in encode.metrics["jobs_ran_on"]) == SHARDS - len(committed)
    reference = run_pipeline(stores("lost-worker-reference", until="encode"), until="encode")["encode"]
    a, b = features(encode), features(reference)
    assert all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("worker, gpus, gpu", [
    ("0", 8, 0), ("11", 8, 3), ("gpu-node-3-5", 8, 5), ("SLURMCluster-12-7", 8, 7), ("SLURMCluster-12", 8, 4),
    ("tcp://10.0.0.5:40321", 1, 0), ("anything", 1, 0)])
def test_a_dask_worker_that_sees_several_gpus_takes_the_one_its_index_names(worker, gpus, gpu):
    """LocalCluster workers are named 0..n-1, `dask worker --nworkers N --name NAME` and dask-jobqueue's
    processes=N name theirs NAME-0..NAME-(N-1); a worker pinned by CUDA_VISIBLE_DEVICES sees one GPU."""
    from pipeline.device import worker_gpu

    assert worker_gpu(gpus, worker) == gpu


def test_a_dask_worker_without_an_index_that_sees_several_gpus_is_refused():
    from pipeline.device import worker_gpu

    with pytest.raises(ValueError, match=r"Dask worker 'tcp://10.0.0.5:40321' on \S+ sees 8 GPUs and none is its own"):
        worker_gpu(8, "tcp://10.0.0.5:40321")  # `dask worker` without --name: every such worker would use GPU 0


@pytest.mark.parametrize("root", ["s3://bucket/srcflow", "gs://bucket/x", "file:///tmp/x"])
def test_a_url_storage_root_is_refused_in_one_line(root):
    r = CliRunner().invoke(app, ["status", "--set", f"storage.root={root}"])
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    line = " ".join(r.output.split())  # rich wraps the one line at the terminal's width
    assert f"storage.root: {root.split('://')[0]}:// roots are not supported" in line and root in line


# --- the lease lock, held by a process of another "host" ------------------------------------------

HOLDER = """
import json, os, socket, sys, time
from pathlib import Path
if sys.argv[2] != "here":
    socket.gethostname = lambda: sys.argv[2]  # this process plays a node of the cluster
from pipeline import artifacts
artifacts.LEASE_SECONDS, artifacts.HEARTBEAT_SECONDS = float(sys.argv[3]), float(sys.argv[3]) / 6
store = artifacts.ArtifactStore(sys.argv[1])
with store.lock("encode", "f" * 64):
    out = store.open_output("encode", "f" * 64)
    (out.path / "rows.bin").write_bytes(b"rows")
    print("held", flush=True)
    go = Path(sys.argv[1]) / "go"
    while not go.exists():
        time.sleep(0.05)
    time.sleep(1.5)  # a resumed holder's heartbeat sees that the lease is another run's
    try:
        store.commit(out, code_version="1", semantic={}, upstream={}, external={}, started=artifacts.now(),
                     metrics={})
    except artifacts.LockLost as e:
        print(e, flush=True)
        sys.exit(3)
"""


def hold(root: Path, host: str, lease: float) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(root), host, str(lease)], cwd=REPO,
                            env=dask_env(), stdout=subprocess.PIPE, text=True, start_new_session=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def try_lock(store: ArtifactStore, got: threading.Event) -> threading.Thread:
    def take() -> None:
        with store.lock("encode", "f" * 64):
            got.set()

    thread = threading.Thread(target=take, daemon=True)
    thread.start()
    return thread


def test_a_live_lease_on_another_host_is_respected_and_a_stale_one_taken_over(tmp_path, monkeypatch, caplog):
    lease = 2.0
    monkeypatch.setattr(artifacts, "LEASE_SECONDS", lease)
    monkeypatch.setattr(artifacts, "HEARTBEAT_SECONDS", lease / 6)
    holder = hold(tmp_path, "node-b", lease)
    try:
        got = threading.Event()
        with caplog.at_level(logging.INFO, logger="srcflow"):
            waiter = try_lock(ArtifactStore(tmp_path), got)
            assert not got.wait(3 * lease)  # node-b heartbeats: its lease holds, whatever a local pid check says
            assert "another run is writing" in caplog.text and f"(host node-b, pid {holder.pid})" in caplog.text
            os.killpg(holder.pid, signal.SIGSTOP)  # node-b freezes: no more heartbeats
            stopped = time.monotonic()
            assert got.wait(4 * lease)
            assert time.monotonic() - stopped >= lease * 0.9  # only once the lease lapsed
        waiter.join(timeout=10)
        (tmp_path / "go").touch()
        os.killpg(holder.pid, signal.SIGCONT)  # node-b wakes up: it must not commit what it no longer holds
        assert holder.wait(timeout=30) == 3
        assert "lost the lock" in holder.stdout.read()
        assert not list((tmp_path / "encode").glob("*/_SUCCESS.json"))
    finally:
        if holder.poll() is None:
            os.killpg(holder.pid, signal.SIGKILL)
            holder.wait()


def test_a_dead_holder_on_this_host_is_taken_over_at_once(tmp_path):
    holder = hold(tmp_path, "here", artifacts.LEASE_SECONDS)
    os.killpg(holder.pid, signal.SIGKILL)
    holder.wait()
    got = threading.Event()
    started = time.monotonic()
    try_lock(ArtifactStore(tmp_path), got).join(timeout=30)
    assert got.is_set() and time.monotonic() - started < 10 < artifacts.LEASE_SECONDS  # no lease to sit out


def test_a_temp_file_of_another_host_is_removed_only_once_stale(tmp_path):
    store = ArtifactStore(tmp_path)
    out = store.open_output("encode", "e" * 64)
    live = out.path / ".rows.bin.tmp-12345-678-node-b"
    dead = out.path / ".cols.bin.tmp-12345-679-node-b"
    live.write_bytes(b"being written")
    dead.write_bytes(b"abandoned")
    old = time.time() - artifacts.TEMP_STALE_SECONDS - 60
    os.utime(dead, (old, old))
    store.open_output("encode", "e" * 64)  # pid 12345 means nothing here: its age decides
    assert live.exists() and not dead.exists()


# --- a forced rebuild where renameat2 cannot exchange (NFS, Lustre) -------------------------------


def build(store: ArtifactStore, content: bytes, rebuild: bool = False):
    out = store.open_output("fit_src", "a" * 64, rebuild=rebuild)
    (out.path / "src.bin").write_bytes(content)
    return store.commit(out, code_version="1", semantic={}, upstream={}, external={}, started=artifacts.now(),
                        metrics={})


def test_a_forced_rebuild_without_exchange_never_shows_readers_a_missing_output(tmp_path, monkeypatch):
    store = ArtifactStore(tmp_path)
    build(store, b"old")
    monkeypatch.setattr(artifacts, "exchange", lambda a, b: False)
    real_rename = os.rename

    def slow_rename(src, dst):
        real_rename(src, dst)
        if artifacts.ASIDE in Path(dst).name:
            time.sleep(1.0)  # the window between the two renames, widened

    monkeypatch.setattr(os, "rename", slow_rename)
    seen, swapping = [], threading.Event()

    def reader() -> None:
        while not swapping.is_set():
            if list((tmp_path / "fit_src").glob(f".*{artifacts.ASIDE}*")):
                seen.append(store.check("fit_src", "a" * 64).state)

    thread = threading.Thread(target=reader)
    thread.start()
    with store.lock("fit_src", "a" * 64):
        build(store, b"new", rebuild=True)
    swapping.set()
    thread.join()
    assert seen and set(seen) == {"done"}, seen  # a reader in the window waited for the new output
    assert (store.stage_dir("fit_src", "a" * 64) / "src.bin").read_bytes() == b"new"


def test_a_swap_killed_between_its_renames_is_finished_by_the_next_lock_holder(tmp_path, monkeypatch):
    store = ArtifactStore(tmp_path)
    build(store, b"old")
    monkeypatch.setattr(artifacts, "exchange", lambda a, b: False)
    monkeypatch.setattr(artifacts, "SWAP_WAIT_SECONDS", 0.2)
    real_rename = os.rename

    def dies_after_the_first(src, dst):
        if artifacts.ASIDE not in Path(dst).name:
            raise KeyboardInterrupt  # killed with the old output aside and the new one complete
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", dies_after_the_first)
    with pytest.raises(KeyboardInterrupt):
        build(store, b"new", rebuild=True)
    monkeypatch.setattr(os, "rename", real_rename)
    assert store.check("fit_src", "a" * 64).state != "done"
    with store.lock("fit_src", "a" * 64):
        pass
    assert store.check("fit_src", "a" * 64).state == "done"
    assert (store.stage_dir("fit_src", "a" * 64) / "src.bin").read_bytes() == b"new"
    assert not list((tmp_path / "fit_src").glob(".*"))


# --- srcflow-dask on a real Prefect server, its jobs on an external cluster ------------------------


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_srcflow_dask_runs_the_stages_in_the_flow_and_their_jobs_on_the_external_cluster(stores, cluster, tmp_path):
    for i in range(2):
        cluster.worker(f"ext-{i}")
    cfg = stores("srcflow-dask", "runtime.workers=2", until="shard")  # a LocalCluster of 2, were there no cluster
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(config_dict(cfg)))
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_API_URL": api,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", "PREFECT_WORKER_QUERY_SECONDS": "1",
           "PREFECT_LOGGING_EXTRA_LOGGERS": "srcflow", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    server = cluster.start("server", [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                           {k: v for k, v in env.items() if k != "PREFECT_API_URL"})
    wait_healthy(api, server)
    cluster.wait_for_workers(2)

    def prefect(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([PREFECT, *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=300)

    for args in (("work-pool", "create", "srcflow", "--type", "process", "--overwrite"), ("--no-prompt", "deploy",
                                                                                           "--all")):
        r = prefect(*args)
        assert r.returncode == 0, r.stdout + r.stderr
    # the worker's environment names the cluster; started after the server, stopped before it (cluster.stop)
    cluster.start("prefect-worker", [PREFECT, "worker", "start", "--pool", "srcflow"],
                  env | {"SRCFLOW_HOME": str(REPO), "SRCFLOW_DASK_ADDRESS": cluster.address})
    r = prefect("deployment", "run", "srcflow/srcflow-dask", "--watch", "--param", f"config={config}",
                "--param", "until=encode")
    assert r.returncode == 0, r.stdout[-3000:] + cluster.log("prefect-worker")
    q = subprocess.run([sys.executable, "-c", STATES], env=env, capture_output=True, text=True, timeout=120)
    run = json.loads(q.stdout)
    assert run["flow"] == "Completed" and set(run["tasks"]) == {"shard", "encode"}, run

    encode = run_pipeline(cfg, until="encode")["encode"]  # done: read from the store
    ran_on = encode.metrics["jobs_ran_on"]
    # every job ran on the external workers: no LocalCluster was started for runtime.workers=2, nor in a worker
    assert {r["worker"] for r in ran_on} == {"ext-0", "ext-1"} and sum(r["jobs"] for r in ran_on) == SHARDS, ran_on
