"""Multi-node training: torchrun "nodes" on 127.0.0.1 (gloo, CPU), each a separate `torch.distributed.run` process.

The launching node is the stage itself (train_flow.run / run_pipeline in this process, as `srcflow run` runs it,
with `train.torchrun_args`); every other node is started here as `python -m torch.distributed.run ... -m
pipeline.distributed`, as the README's recipe starts it, and takes the job from the rendezvous. Static rendezvous
(--master-addr/--master-port) and c10d are both used. The tests that train through torchrun nodes take 50-60 s of
CPU each and are marked e2e (`make test`); the launch checks and the job exchange are fast.
"""

import os
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import psutil
import pytest
import torch
import torch.distributed as dist

from pipeline import distributed
from pipeline.data.features import load_normalizer, open_features, read_features
from pipeline.distributed import LaunchError, share_job
from stages.fit_src import load_src
from stages.runner import run_pipeline
from tests.conftest import REPO
from tests.test_prefect import free_port
from tests.test_train_flow import compress, train, trajectory  # noqa: F401  (compress: the module's codes fixture)

STREAMED = "train.in_memory_limit_gb=0"  # windows read from the store, so that the rows each rank reads count

# A joining node's worker that kills its node (its torchrun agent, then itself) in step 8, after the checkpoint of
# step 5: a node failure mid-training. `--no-python`: torchrun runs this command instead of `python -m ...`.
KILL_NODE = """
import os, signal, time
from pathlib import Path
from pipeline import distributed
from stages import train_flow
real = train_flow.step_noise
def noise(seed, step, *args):
    if step == 8:
        Path(os.environ["KILLED_AT"]).write_text(str(time.time()))
        os.kill(os.getppid(), signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)
    return real(seed, step, *args)
train_flow.step_noise = noise
distributed.main([])
"""


def static(port: int, node_rank: int) -> list[str]:
    return ["--nnodes=2", f"--node-rank={node_rank}", "--master-addr=127.0.0.1", f"--master-port={port}"]


def c10d(port: int, nodes: int = 2) -> list[str]:
    return [f"--nnodes={nodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=srcflow-test"]


def rendezvous(args: list[str]) -> str:
    return f"train.torchrun_args=[{','.join(args)}]"


def start_node(args: list[str], log: Path, nproc: int = 1, worker: str | None = None, env=None) -> subprocess.Popen:
    """A joining node: torchrun with its rendezvous arguments and no job, in its own session."""
    command = [sys.executable, "-m", "torch.distributed.run", *args, f"--nproc-per-node={nproc}"]
    command += ["--no-python", sys.executable, "-c", worker] if worker else ["-m", "pipeline.distributed"]
    with open(log, "w") as out:
        return subprocess.Popen(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})


def stop_node(proc: subprocess.Popen) -> None:
    """Kill a node that is still running: its torchrun agent and workers (their own sessions), by pid."""
    if proc.poll() is None:
        for p in [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]:
            p.kill()
    proc.wait(timeout=30)


def same_bytes(a: Path, b: Path, name: str = "flow.safetensors") -> bool:
    return (a / name).read_bytes() == (b / name).read_bytes()


@pytest.fixture(scope="module")
def world_two(compress, tmp_path_factory):  # noqa: F811
    """The reference: one node of two processes (`runtime.nproc=2`, torchrun --standalone), streamed."""
    out = tmp_path_factory.mktemp("one-node-of-two")
    return train(compress, out, "runtime.nproc=2", STREAMED), out


def test_a_joining_node_takes_the_job_from_the_rendezvous_and_one_rendezvous_holds_one_job(monkeypatch):
    job = {"entry": "stages.train_flow:train_worker", "attempt": "a1", "nodes": 2, "nproc": 1, "payload": {}}
    store = dist.HashStore()
    assert share_job(store, job, 0, 2) == job == share_job(store, None, 1, 2)  # launching node, joining node
    with pytest.raises(SystemExit, match=r"two nodes launched a job into one rendezvous \(stages.train_flow:"
                                         r"train_worker attempt a1, and stages.fit_src:train_worker attempt b2\)"):
        share_job(store, {**job, "entry": "stages.fit_src:train_worker", "attempt": "b2"}, 0, 2)
    monkeypatch.setattr(distributed, "JOB_WAIT", timedelta(seconds=0.2))
    with pytest.raises(SystemExit, match="rank 1 of world size 2: no node launched a job into this rendezvous"):
        share_job(dist.HashStore(), None, 1, 2)


# --- train_flow ---------------------------------------------------------------------------------------------


@pytest.mark.e2e
def test_two_nodes_of_one_process_train_to_the_bytes_of_one_node_of_two(compress, world_two, tmp_path):  # noqa: F811
    port = free_port()
    node = start_node(static(port, 1), tmp_path / "node1.log")
    try:
        metrics = train(compress, tmp_path / "out", "runtime.nproc=1", STREAMED, rendezvous(static(port, 0)))
        assert node.wait(timeout=60) == 0, (tmp_path / "node1.log").read_text()[-3000:]
    finally:
        stop_node(node)
    reference_metrics, reference = world_two
    assert metrics["world_size"] == 2 and same_bytes(tmp_path / "out", reference)
    assert trajectory(tmp_path / "out") == trajectory(reference)
    # each rank read exactly its share: 12 steps x 4 rows of the batch of 8, one view per image
    assert metrics["rows_read_per_rank"] == reference_metrics["rows_read_per_rank"] == [12 * 4, 12 * 4]
    assert not (tmp_path / "out" / "launch").exists() and not (tmp_path / "out" / "checkpoints").exists()
    assert "joined" in (tmp_path / "node1.log").read_text()


@pytest.mark.e2e
def test_a_killed_node_fails_the_other_fast_and_the_rerun_resumes_bit_identically(compress, world_two,  # noqa: F811
                                                                                  tmp_path):
    out, killed_at = tmp_path / "out", tmp_path / "killed_at"
    port = free_port()
    node = start_node(c10d(port), tmp_path / "node1.log", worker=KILL_NODE, env={"KILLED_AT": str(killed_at)})
    try:
        with pytest.raises(LaunchError) as failed:
            train(compress, out, STREAMED, rendezvous(c10d(port)))
        failed_at = time.time()
        node.wait(timeout=30)
    finally:
        stop_node(node)
    message = str(failed.value)
    assert "\n" not in message and "world size 2 (2 nodes x 1 process)" in message, message
    assert failed_at - float(killed_at.read_text()) < 30  # not a collective timeout (gloo's default is 30 minutes)
    assert [p.name for p in (out / "checkpoints").glob("ckpt-*.pt")] == ["ckpt-00000005.pt"]
    failed_job = list((out / "launch").glob("attempt-*.json"))
    assert len(failed_job) == 1 and failed_job[0].stem.removeprefix("attempt-") in message

    port = free_port()  # the rerun: both nodes again, a new rendezvous
    node = start_node(c10d(port), tmp_path / "node1-rerun.log")
    try:
        train(compress, out, STREAMED, rendezvous(c10d(port)))
        assert node.wait(timeout=60) == 0, (tmp_path / "node1-rerun.log").read_text()[-3000:]
    finally:
        stop_node(node)
    _, reference = world_two
    assert same_bytes(out, reference) and trajectory(out) == trajectory(reference)
    assert not failed_job[0].exists()  # the failed attempt's job went when the next attempt started


@pytest.mark.e2e
def test_resume_after_a_node_failure_at_world_size_four_is_bit_identical(compress, tmp_path):  # noqa: F811
    """World size 4 (2 nodes x 2 processes), where a sum of gradients in another order rounds differently: the
    rerun after a killed node ends on the bytes of an uninterrupted run of one node of 4 processes. The log
    window of step 8 spans the checkpoint of step 5 (train.log_every=4), so the per-rank sums resume too."""
    four = ("runtime.nproc=2", STREAMED, "train.log_every=4", "train.batch_size=8")
    reference = train(compress, tmp_path / "one-node-of-four", "runtime.nproc=4", *four[1:])
    out, port = tmp_path / "out", free_port()
    node = start_node(static(port, 1), tmp_path / "node1.log", nproc=2, worker=KILL_NODE,
                      env={"KILLED_AT": str(tmp_path / "killed_at")})
    try:
        with pytest.raises(LaunchError, match=r"world size 4 \(2 nodes x 2 processes\)"):
            train(compress, out, *four, rendezvous(static(port, 0)))
    finally:
        stop_node(node)
    port = free_port()
    node = start_node(static(port, 1), tmp_path / "node1-rerun.log", nproc=2)
    try:
        metrics = train(compress, out, *four, rendezvous(static(port, 0)))
        assert node.wait(timeout=60) == 0
    finally:
        stop_node(node)
    assert metrics["world_size"] == reference["world_size"] == 4
    assert same_bytes(out, tmp_path / "one-node-of-four")
    assert trajectory(out) == trajectory(tmp_path / "one-node-of-four")


def test_a_joining_node_with_another_process_count_is_refused_in_one_line(compress, tmp_path):  # noqa: F811
    port = free_port()
    node = start_node(static(port, 1), tmp_path / "node1.log", nproc=2)
    try:
        with pytest.raises(LaunchError, match=r"world size 2 \(2 nodes x 1 process\)"):
            train(compress, tmp_path / "out", rendezvous(static(port, 0)))
        assert node.wait(timeout=60) != 0
    finally:
        stop_node(node)
    log = (tmp_path / "node1.log").read_text()
    assert "this node runs 2 processes of a world of 3; start every node with --nproc_per_node=1" in log


# --- fit_src --------------------------------------------------------------------------------------------------


@pytest.mark.e2e
def test_fit_src_trains_data_parallel_on_one_or_two_nodes(stores, tmp_path):
    """fit_src under DDP: two nodes of one process give the bytes of one node of two, and both compute what one
    process computes (the global batch, its rows of one noise draw, the global batch's code statistics) up to
    the order of float sums: the same codes to 1e-5, where per-rank statistics (BatchNorm without its sync) are
    7e-4 off. (Weights are not compared one by one: batch normalization cancels encoder.proj_out.bias, so its
    gradient is pure rounding, which Adam scales up to a random walk of ~lr per step; the calibrated code_mean
    absorbs it in the codes, and the round trip keeps P_d^T of it, ~1.5e-5 here.)"""
    learned = ("src.noise_sigma=0.2", "src.steps=8", "src.log_every=4")
    one = run_pipeline(stores("src-one", *learned), until="fit_src")
    two = run_pipeline(stores("src-two", *learned, "runtime.nproc=2"), until="fit_src")["fit_src"]
    port = free_port()
    node = start_node(static(port, 1), tmp_path / "node1.log")
    try:
        nodes = run_pipeline(stores("src-nodes", *learned, rendezvous(static(port, 0))), until="fit_src")["fit_src"]
        assert node.wait(timeout=60) == 0, (tmp_path / "node1.log").read_text()[-3000:]
    finally:
        stop_node(node)
    assert same_bytes(nodes.dir, two.dir, "src.safetensors") and nodes.metrics == two.metrics

    store = one["encode"].dir / "features.zarr"
    group, _ = open_features(store)
    z = load_normalizer(store)(read_features(group, slice(0, 32)))
    single, parallel = load_src(one["fit_src"]), load_src(two)
    with torch.no_grad():
        torch.testing.assert_close(parallel.encode(z), single.encode(z), rtol=0, atol=1e-5)
        torch.testing.assert_close(parallel(z)[1], single(z)[1], rtol=0, atol=5e-5)  # + P_d^T (that bias's walk)
    for key in ("src/feature_mse", "src/noisy_feature_mse", "src/psnr_vs_rae"):
        assert two.metrics[key] == pytest.approx(one["fit_src"].metrics[key], rel=1e-6)
