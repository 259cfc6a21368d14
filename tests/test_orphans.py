"""No orphans: whatever `srcflow run` starts dies with it, even on kill -9 of `srcflow run` alone.

A synthetic tree checks the watchdog's mechanism (children started by subprocess, by fork without exec,
and a double-forked daemon in its own session); an end-to-end run checks the ephemeral Prefect server
and its port; a normal run leaves nothing behind. Every process is checked by pid and create time, and
every process a test starts is stopped by pid whatever happens.
"""

import os
import signal
import socket
import subprocess
import sys
import time
import uuid

import psutil
import pytest
import yaml

from pipeline.config import config_dict
from pipeline.watchdog import POLL_S
from tests.conftest import REPO

TAG = "SRCFLOW_TEST_TAG"  # set by a test in the environment of what it starts: every exec'd descendant has it

TREE = """
import os, subprocess, sys, time
from pipeline.watchdog import guard_children

guard_children()
pids = [subprocess.Popen(["sleep", "600"]).pid]
child = os.fork()
if child == 0:  # no exec: no marker in /proc/PID/environ, found through the recorded tree only
    time.sleep(600)
    os._exit(0)
pids.append(child)
# a daemon: its parent exits at once, it is in its own session and no longer a descendant
daemon = subprocess.run([sys.executable, "-c", "import subprocess; print(subprocess.Popen(['sleep', '600'], "
                         "start_new_session=True, stdout=subprocess.DEVNULL).pid)"],
                        stdout=subprocess.PIPE, text=True, check=True)
pids.append(int(daemon.stdout))
print(*pids, flush=True)
time.sleep(600)
"""


def tagged(tag: str) -> list[psutil.Process]:
    """The live processes whose environment at exec held TAG=tag."""
    found = []
    for p in psutil.process_iter():
        try:
            if p.environ().get(TAG) == tag and alive(p):
                found.append(p)
        except psutil.Error:
            pass
    return found


def alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE  # is_running compares the create time
    except psutil.Error:
        return False


def cmdline(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline())
    except psutil.Error:  # gone meanwhile
        return ""


def wait_gone(processes: list[psutil.Process], timeout: float) -> float:
    """Seconds until none of `processes` is alive; fails naming the survivors after `timeout`."""
    started = time.monotonic()
    while any(alive(p) for p in processes):
        if time.monotonic() - started > timeout:
            pytest.fail(f"still alive {timeout:.0f} s after the kill: "
                        + "; ".join(cmdline(p) for p in processes if alive(p)))
        time.sleep(0.05)
    return time.monotonic() - started


def kill_all(processes: list[psutil.Process]) -> None:
    for p in processes:
        if alive(p):
            p.kill()


def environment(tag: str, **extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), TAG: tag, **extra}
    env.pop("SRCFLOW_RUN_ID", None)  # a guarded test process's own marker
    return env


@pytest.mark.timeout(60)
def test_kill_9_of_the_parent_alone_stops_its_children_forked_children_and_daemons():
    tag = uuid.uuid4().hex
    bystander = psutil.Process(subprocess.Popen(["sleep", "600"]).pid)  # not the parent's: must survive
    parent = subprocess.Popen([sys.executable, "-c", TREE], cwd=REPO, env=environment(tag), stdout=subprocess.PIPE,
                              text=True)
    started: list[psutil.Process] = []
    try:
        started = [psutil.Process(int(pid)) for pid in parent.stdout.readline().split()]
        assert len(started) == 3, started
        watchdog = [p for p in psutil.Process(parent.pid).children() if "-m pipeline.watchdog" in cmdline(p)]
        assert len(watchdog) == 1
        started += watchdog
        time.sleep(3 * POLL_S)  # the watchdog has recorded the tree, and the daemon has left it

        parent.kill()
        parent.wait()
        seconds = wait_gone(started, timeout=15)
        print(f"kill -9 -> all gone: {seconds:.2f} s")
        assert tagged(tag) == []
        assert alive(bystander)
    finally:
        kill_all(started + tagged(tag) + [bystander])
        if parent.poll() is None:
            parent.kill()
            parent.wait()


def srcflow_run(make_config, tmp_path, prefect_home, tag: str) -> subprocess.Popen:
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(config_dict(make_config())))
    env = environment(tag, PREFECT_HOME=str(prefect_home), SRCFLOW_CACHE_DIR=str(tmp_path / "cache"),
                      # a loaded 2-core machine: the ephemeral server may take long to start
                      PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180")
    env.pop("PREFECT_API_URL", None)  # the ephemeral server, not a running one
    return subprocess.Popen([sys.executable, "-m", "srcflow.cli", "run", "--config", str(config),
                             "--until", "encode"], cwd=REPO, env=env, stdout=open(tmp_path / "run.log", "w"),
                            stderr=subprocess.STDOUT)


def listening_port(p: psutil.Process) -> int | None:
    try:
        ports = [c.laddr.port for c in p.net_connections("tcp") if c.status == psutil.CONN_LISTEN]
    except psutil.Error:
        return None
    return ports[0] if ports else None


@pytest.mark.e2e
@pytest.mark.timeout(400)
def test_kill_9_of_srcflow_run_stops_its_prefect_server_and_frees_its_port(make_config, tmp_path, prefect_home):
    tag = uuid.uuid4().hex
    run = srcflow_run(make_config, tmp_path, prefect_home, tag)
    descendants: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 240
        server, port = None, None
        while port is None:
            assert run.poll() is None, (tmp_path / "run.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no Prefect server listening after 240 s"
            time.sleep(0.1)
            descendants = psutil.Process(run.pid).children(recursive=True)
            server = next((p for p in descendants if "-m uvicorn" in cmdline(p)), None)
            port = server and listening_port(server)
        descendants = psutil.Process(run.pid).children(recursive=True)
        assert any("-m pipeline.watchdog" in cmdline(p) for p in descendants)

        run.kill()  # the srcflow process alone
        run.wait()
        seconds = wait_gone(descendants, timeout=30)
        print(f"kill -9 -> server and all descendants gone: {seconds:.2f} s")
        assert tagged(tag) == []
        with socket.socket() as s:
            # the port is free again: no socket listens on it (SO_REUSEADDR, as a server restarting binds: the
            # closed connections' TIME_WAIT entries refuse a plain bind for a minute, which made this flaky)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))
    finally:
        kill_all(descendants + tagged(tag))
        if run.poll() is None:
            run.kill()
            run.wait()


@pytest.mark.e2e
@pytest.mark.timeout(500)
def test_a_normal_run_returns_at_once_and_leaves_no_process_behind(make_config, tmp_path, prefect_home):
    tag = uuid.uuid4().hex
    run = srcflow_run(make_config, tmp_path, prefect_home, tag)
    try:
        assert run.wait(timeout=400) == 0, (tmp_path / "run.log").read_text()[-3000:]
        seconds = wait_gone(tagged(tag), timeout=5)  # the watchdog, woken by PDEATHSIG, finds nothing to stop
        print(f"after a normal exit, the watchdog is gone in {seconds:.2f} s")
        assert tagged(tag) == []
        log = (tmp_path / "run.log").read_text()
        assert "Traceback" not in log and "watchdog" not in log, log[-3000:]
    finally:
        kill_all(tagged(tag))
        if run.poll() is None:
            os.kill(run.pid, signal.SIGKILL)
            run.wait()
