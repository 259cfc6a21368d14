"""The real Prefect path: server on 127.0.0.1, process work pool, deployment, worker, `deployment run --watch`.

One end-to-end run of the smoke chain, then a second run in which every stage shows as Cached; before it, the pull
steps of prefect.yaml on a fresh `git clone` (the deployment names no path of the deploying checkout), and the
images of the published reports. Every process started here is stopped by its id.
"""

import base64
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from flows.full import inline_images
from stages import STAGES
from tests.conftest import REPO

PREFECT = str(Path(sys.executable).with_name("prefect"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen, sig: int = signal.SIGINT) -> None:
    """`sig` to the process group we started, then SIGKILL if it does not go."""
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
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


def test_inline_images_embeds_every_relative_image_and_leaves_urls(tmp_path):
    """What both published reports (evaluate's report.md, a sweep's summary.md with plots/...) go through."""
    grid, plot = b"\x89PNG grid", b"\x89PNG plot"
    (tmp_path / "plots").mkdir()
    (tmp_path / "grid-cfg1.0.png").write_bytes(grid)
    (tmp_path / "plots" / "fid-vs-src.dim.png").write_bytes(plot)
    table = "# report\n\n| a | b |\n|---|---|\n\n"
    markdown = (table + "![samples, cfg 1.0](grid-cfg1.0.png)\n![plots/fid-vs-src.dim.png](plots/fid-vs-src.dim.png)\n"
                "![logo](https://example.org/logo.png)\n")

    def data(png: bytes) -> str:
        return "data:image/png;base64," + base64.b64encode(png).decode()

    assert inline_images(markdown, tmp_path) == (
        table + f"![samples, cfg 1.0]({data(grid)})\n![plots/fid-vs-src.dim.png]({data(plot)})\n"
        "![logo](https://example.org/logo.png)\n")
    with pytest.raises(FileNotFoundError, match=r"missing\.png"):
        inline_images("![x](missing.png)", tmp_path)


def test_a_large_image_is_embedded_as_a_bounded_jpeg_preview(tmp_path):
    import io

    import numpy as np
    from PIL import Image

    from flows.full import EMBED_AS_IS_BYTES, PREVIEW_SIDE

    noise = np.random.default_rng(0).integers(0, 256, (600, 3000, 3), dtype=np.uint8)  # ~5 MB of PNG
    Image.fromarray(noise).save(tmp_path / "grid-cfg1.0.png")
    assert (tmp_path / "grid-cfg1.0.png").stat().st_size > EMBED_AS_IS_BYTES
    (src,) = re.findall(r"\]\((data:[^)]+)\)", inline_images("![grid](grid-cfg1.0.png)", tmp_path))
    assert src.startswith("data:image/jpeg;base64,")
    preview = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
    assert preview.size == (PREVIEW_SIDE, round(PREVIEW_SIDE * 600 / 3000)) and preview.format == "JPEG"


PULL = """
import asyncio, inspect, json, os, sys
from prefect.deployments.steps.core import run_steps
from prefect.flows import load_flow_from_entrypoint
start, out = os.getcwd(), []
for steps, entrypoint in json.loads(sys.argv[1]):
    os.chdir(start)
    os.chdir(asyncio.run(run_steps(steps))["directory"])  # as Prefect's load_flow_from_flow_run does with it
    flow = load_flow_from_entrypoint(entrypoint)
    import pipeline.config
    out.append({"directory": os.getcwd(), "flow": flow.name, "flow_file": inspect.getfile(flow.fn),
                "pipeline": pipeline.config.__file__})
print(json.dumps(out))
"""


def git_clone(dest: Path) -> Path:
    if not (REPO / ".git").exists():
        pytest.skip("the repository is not a git checkout")
    subprocess.run(["git", "clone", "-q", str(REPO), str(dest)], check=True, timeout=120)
    return dest


def run_pull_steps(jobs: list[tuple[list, str]], cwd: Path, **env: str) -> list[dict]:
    """Each (pull steps, entrypoint): the steps, then the entrypoint's import, in a fresh process started in `cwd`,
    as a worker's flow run does them, with nothing of this checkout on the path."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SRCFLOW_HOME")} | env
    # the pull steps start Prefect's temporary server, whose 20 s start-up limit a busy machine misses (as srcflow's)
    env.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    r = subprocess.run([sys.executable, "-c", PULL, json.dumps(jobs)], cwd=cwd, env=env, check=False,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.splitlines()[-1])


def test_deployments_run_from_srcflow_home_or_a_git_clone_not_the_deploying_checkout(tmp_path):
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    clone = git_clone(tmp_path / "srcflow-clone")
    elsewhere = tmp_path / "worker-cwd"
    elsewhere.mkdir()
    assert "$PWD" not in (REPO / "prefect.yaml").read_text()
    deployments = spec["deployments"]
    got = run_pull_steps([(d.get("pull", spec["pull"]), d["entrypoint"]) for d in deployments], elsewhere,
                         SRCFLOW_HOME=str(clone))
    for d, run in zip(deployments, got, strict=True):
        assert Path(run["directory"]) == clone and run["flow"] == "srcflow", d["name"]
        assert Path(run["flow_file"]) == clone / d["entrypoint"].split(":")[0]
        assert Path(run["pipeline"]).is_relative_to(clone)  # the clone's code, not an installed copy
    # the git alternative: a fresh clone per flow run, in the run's own directory
    (run,) = run_pull_steps([(spec["definitions"]["pull"]["git-clone"], "flows/full.py:srcflow")], elsewhere,
                            SRCFLOW_GIT_URL=str(clone))
    fresh = Path(run["directory"])
    assert fresh.parent == elsewhere and (fresh / ".git").is_dir() and Path(run["pipeline"]).is_relative_to(fresh)


STATES = """
import asyncio, json, sys
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.client.schemas.sorting import FlowRunSort
async def main():
    async with get_client() as c:
        runs = await c.read_flow_runs(sort=FlowRunSort.START_TIME_DESC, limit=1)
        tasks = await c.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[runs[0].id])))
        names = {t.id: t.name for t in tasks}  # the graph's edges: a task run's inputs that are task runs
        edges = sorted({(names.get(i.id, str(i.id)), t.name) for t in tasks for inputs in t.task_inputs.values()
                        for i in inputs if i.input_type == "task_run"})
        print(json.dumps({"flow": runs[0].state.name, "tasks": {t.name: t.state.name for t in tasks},
                          "edges": edges}))
asyncio.run(main())
"""


PULL_STEPS = """
import asyncio, json
from prefect.client.orchestration import get_client
async def main():
    async with get_client() as c:
        print(json.dumps((await c.read_deployment_by_name("srcflow/srcflow-full")).pull_steps))
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
    with open(tmp_path / "server.log", "w") as log:  # the server writes to its own copy of the descriptor
        server = subprocess.Popen([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                                  env=server_env, cwd=tmp_path, start_new_session=True, stdout=log,
                                  stderr=subprocess.STDOUT)
    worker = None
    try:
        wait_healthy(api, server)
        run = lambda *args: subprocess.run([PREFECT, *args], env=env, cwd=REPO, capture_output=True, text=True,  # noqa: E731
                                           timeout=600)
        r = run("work-pool", "create", "srcflow", "--type", "process", "--overwrite")
        assert r.returncode == 0, r.stdout + r.stderr
        r = run("--no-prompt", "deploy", "--all")
        assert r.returncode == 0, r.stdout + r.stderr
        q = subprocess.run([sys.executable, "-c", PULL_STEPS], env=env, check=False, capture_output=True, text=True,
                           timeout=120)
        assert json.loads(q.stdout) == [{"prefect.deployments.steps.set_working_directory": {
            "directory": "{{ $SRCFLOW_HOME }}"}}], q.stderr  # stored as written: resolved on the worker
        # the worker, elsewhere, finds the code through SRCFLOW_HOME
        with open(tmp_path / "worker.log", "w") as log:
            worker = subprocess.Popen([PREFECT, "worker", "start", "--pool", "srcflow"],
                                      env=env | {"SRCFLOW_HOME": str(REPO)}, cwd=tmp_path, start_new_session=True,
                                      stdout=log, stderr=subprocess.STDOUT)
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
            worker_log = (tmp_path / "worker.log").read_text()[-3000:]
            assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:] + worker_log
            q = subprocess.run([sys.executable, "-c", STATES], env=env, capture_output=True, text=True, timeout=120)
            assert q.returncode == 0, q.stderr
            states.append(json.loads(q.stdout))
        first, second = states
        assert first["flow"] == "Completed" and set(first["tasks"].values()) == {"Completed"}
        assert second["flow"] == "Completed" and set(second["tasks"].values()) == {"Cached"}
        assert set(second["tasks"]) == set(first["tasks"]) and "shard" in first["tasks"]
        # the run graph draws the stage table's edges, and no others (fit_decoder runs: no decoder.weights)
        table = sorted([u, s.name] for s in STAGES for u in s.upstream)
        assert first["edges"] == second["edges"] == table, (first["edges"], table)

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


def test_no_deployment_entrypoint_file_shadows_a_package_of_the_repo():
    """A flow run loads its entrypoint file as the module of its stem (prefect's load_script_as_module): a file
    named like a package of the repo (`srcflow.py`, `pipeline.py`) would stand in for that package there."""
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    stems = {Path(d["entrypoint"].split(":")[0]).stem for d in spec["deployments"]}
    packages = {p.parent.name for p in REPO.glob("*/__init__.py")}
    assert stems and "srcflow" in packages and not stems & packages
