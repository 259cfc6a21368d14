"""The real Prefect path: server on 127.0.0.1, process work pool, deployment, worker, `deployment run --watch`.

One end-to-end run of the smoke chain, then a second run in which every stage shows as Cached.
Every process started here is stopped by its id.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import REPO

PREFECT = str(Path(sys.executable).with_name("prefect"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen) -> None:
    """SIGINT to the process group we started, then SIGKILL if it does not go."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, "prefect server exited during start-up"
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"prefect server at {url} not healthy after {timeout} s")


STATES = """
import asyncio, json, sys
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.client.schemas.sorting import FlowRunSort
async def main():
    async with get_client() as c:
        runs = await c.read_flow_runs(sort=FlowRunSort.START_TIME_DESC, limit=1)
        tasks = await c.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[runs[0].id])))
        print(json.dumps({"flow": runs[0].state.name, "tasks": {t.name: t.state.name for t in tasks}}))
asyncio.run(main())
"""


@pytest.mark.e2e
@pytest.mark.timeout(900)
def test_deployment_runs_the_smoke_chain_on_a_real_server_then_caches(tmp_path, tiny_root):
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_API_URL": api,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", "PREFECT_WORKER_QUERY_SECONDS": "1",
           "PREFECT_LOGGING_EXTRA_LOGGERS": "srcflow", "PYTHONPATH": str(REPO)}
    server_env = {k: v for k, v in env.items() if k != "PREFECT_API_URL"}
    server = subprocess.Popen([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              env=server_env, cwd=tmp_path, start_new_session=True,
                              stdout=open(tmp_path / "server.log", "w"), stderr=subprocess.STDOUT)
    worker = None
    try:
        wait_healthy(api, server)
        run = lambda *args: subprocess.run([PREFECT, *args], env=env, cwd=REPO, capture_output=True, text=True,  # noqa: E731
                                           timeout=600)
        r = run("work-pool", "create", "srcflow", "--type", "process", "--overwrite")
        assert r.returncode == 0, r.stdout + r.stderr
        r = run("--no-prompt", "deploy", "--all")
        assert r.returncode == 0, r.stdout + r.stderr
        worker = subprocess.Popen([PREFECT, "worker", "start", "--pool", "srcflow"], env=env, cwd=REPO,
                                  start_new_session=True, stdout=open(tmp_path / "worker.log", "w"),
                                  stderr=subprocess.STDOUT)
        overrides = [f"storage.root={tmp_path / 'artifacts'}", f"data.root={tiny_root}", "data.generate_tiny=null",
                     "data.resolution=32", "decoder.patch_size=4", "runtime.progress=false",
                     f"evaluate.inception_weights={tiny_root.parent / 'standin-inception.pth'}",
                     # the chain's code path, not its quality: a few steps of each training stage
                     "fit_decoder.steps=20", "src.steps=20", "train.steps=20", "sample.per_class=2",
                     "sample.cfg_scale=[1.0]", "reference.max_images=16", "reference.pr_images=16",
                     "evaluate.kid_subset_size=8"]
        params = ["--param", f"overrides={json.dumps(overrides)}"]
        states = []
        for _ in range(2):
            r = run("deployment", "run", "srcflow/srcflow-full", "--watch", *params)
            assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:] + (tmp_path / "worker.log").read_text()[-3000:]
            q = subprocess.run([sys.executable, "-c", STATES], env=env, capture_output=True, text=True, timeout=120)
            assert q.returncode == 0, q.stderr
            states.append(json.loads(q.stdout))
        first, second = states
        assert first["flow"] == "Completed" and set(first["tasks"].values()) == {"Completed"}
        assert second["flow"] == "Completed" and set(second["tasks"].values()) == {"Cached"}
        assert set(second["tasks"]) == set(first["tasks"]) and "shard" in first["tasks"]

        # the prefect-dask deployment: the stages as tasks on a Dask LocalCluster, into a fresh store
        dask_overrides = [f"storage.root={tmp_path / 'artifacts-dask'}", *overrides[1:]]
        r = run("deployment", "run", "srcflow/srcflow-dask", "--watch", "--param",
                f"overrides={json.dumps(dask_overrides)}", "--param", "until=encode")
        assert r.returncode == 0, r.stdout[-3000:] + (tmp_path / "worker.log").read_text()[-3000:]
        q = subprocess.run([sys.executable, "-c", STATES], env=env, capture_output=True, text=True, timeout=120)
        dask_run = json.loads(q.stdout)
        assert dask_run["flow"] == "Completed" and dask_run["tasks"] == {"shard": "Completed", "encode": "Completed"}
        assert list((tmp_path / "artifacts-dask" / "encode").glob("*/_SUCCESS.json"))
    finally:
        if worker is not None:
            stop(worker)  # the worker before the server
        stop(server)
