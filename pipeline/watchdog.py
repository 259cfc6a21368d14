"""Nothing that `srcflow run` starts outlives it, even when it is killed with SIGKILL or by the OOM killer.

`guard_children()` (called once by `srcflow run`, in the main thread, before Prefect, Dask or torchrun
start) marks the process's environment with SRCFLOW_RUN_ID=<uuid>, which every exec'd descendant
inherits, and starts a watchdog process, `python -m pipeline.watchdog PARENT_PID RUN_ID`. The watchdog:

- asks the kernel for SIGTERM when its parent dies (prctl PR_SET_PDEATHSIG, Linux) and also polls
  os.getppid() (every other system, and the race before the prctl);
- every POLL_S seconds records the parent's descendants (psutil: pid and create time, so a reused pid
  is never mistaken for one of them);
- when the parent is gone, stops the recorded descendants still alive, every process of this user whose
  /proc/PID/environ holds the marker (this catches what left the tree: a double fork, a new session), and
  the descendants of both: SIGTERM, up to GRACE_S seconds, then SIGKILL. It then exits.

A normal exit of the parent fires it too; by then the run has stopped its children, so it finds nothing
and exits at once. A SIGTERM to the watchdog while its parent lives (e.g. to the whole process group) is
ignored; SIGKILL stops it. Limits: /proc/PID/environ is the environment of the last exec, so a process
fork()ed without exec, or exec'd with the marker removed, is found through the tree only: if it was a
descendant at the last poll, or is one of a process found when the parent dies. Processes of other
users, and those started by another daemon (a container of `docker run`), are not found.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil

MARKER = "SRCFLOW_RUN_ID"
POLL_S = 0.5  # how stale the recorded tree may be
GRACE_S = 5.0  # between SIGTERM and SIGKILL: a Prefect server or torchrun job stops cleanly in this time
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>

_watchdog: subprocess.Popen | None = None  # held so the running child is not reported as leaked
_guarded_pid: int | None = None


def guard_children() -> None:
    """Start this process's watchdog (once per process). Call it from the main thread: PDEATHSIG fires
    when the thread that started the watchdog exits (the watchdog then checks that its parent is gone)."""
    global _watchdog, _guarded_pid
    if _guarded_pid == os.getpid():
        return
    run_id = uuid.uuid4().hex
    os.environ[MARKER] = run_id
    # cwd: the directory holding this package, so `-m pipeline.watchdog` is this very file
    _watchdog = subprocess.Popen([sys.executable, "-m", "pipeline.watchdog", str(os.getpid()), run_id],
                                 cwd=Path(__file__).resolve().parent.parent, stdin=subprocess.DEVNULL,
                                 stdout=subprocess.DEVNULL)
    _guarded_pid = os.getpid()


# --- in the watchdog process -------------------------------------------------------------------


def watch(parent: int, run_id: str) -> None:
    """Record `parent`'s descendants until it dies, then stop them and every process marked with `run_id`."""
    # SIGTERM (PDEATHSIG, or one sent to the whole group while the parent stops) only ends the sleep below;
    # Ctrl-C and a closed terminal reach the whole group too: the parent stops its own way, we clean up after
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    _ask_for_pdeathsig()
    recorded: list[psutil.Process] = []
    me = os.getpid()
    while os.getppid() == parent:  # tested after the prctl: a parent that died before it shows here
        try:
            recorded = [p for p in psutil.Process(parent).children(recursive=True) if p.pid != me]
        except psutil.NoSuchProcess:
            break
        _sleep_unless_signalled(POLL_S)
    for _ in range(3):  # again, for anything started while the others were stopping
        targets = leftovers(recorded, run_id)
        if not targets:
            return
        stop(targets)
        recorded = []


def leftovers(recorded: list[psutil.Process], run_id: str) -> list[psutil.Process]:
    """The recorded processes still alive (same pid and create time), the marked ones, and their descendants."""
    found: dict[int, psutil.Process] = {}
    for p in [p for p in recorded if _alive(p)] + marked(run_id):
        found[p.pid] = p
        with contextlib.suppress(psutil.Error):
            found.update((c.pid, c) for c in p.children(recursive=True))
    found.pop(os.getpid(), None)
    return [p for p in found.values() if _alive(p)]


def marked(run_id: str) -> list[psutil.Process]:
    """This user's processes whose environment at exec held MARKER=run_id (Linux /proc; none elsewhere)."""
    needle = f"\0{MARKER}={run_id}\0".encode()
    uid = os.getuid()
    found = []
    try:
        pids = [int(d) for d in os.listdir("/proc") if d.isdigit()]
    except OSError:
        return []
    for pid in pids:
        try:
            if os.stat(f"/proc/{pid}").st_uid != uid:
                continue
            p = psutil.Process(pid)  # pins the create time before reading, so a reused pid is caught below
            with open(f"/proc/{pid}/environ", "rb") as f:
                environ = b"\0" + f.read()
            if needle in environ and p.is_running():
                found.append(p)
        except (OSError, psutil.Error):
            pass
    return found


def stop(processes: list[psutil.Process]) -> None:
    """SIGTERM, up to GRACE_S seconds, then SIGKILL for the survivors."""
    for p in processes:
        with contextlib.suppress(psutil.Error):
            p.terminate()  # psutil refuses a pid that was reused
    deadline = time.monotonic() + GRACE_S
    while time.monotonic() < deadline and any(_alive(p) for p in processes):
        time.sleep(0.05)
    for p in processes:
        if _alive(p):
            with contextlib.suppress(psutil.Error):
                p.kill()


def _alive(p: psutil.Process) -> bool:
    """Running and not a zombie (a zombie has exited; only its parent, or init, can reap it)."""
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _sleep_unless_signalled(seconds: float) -> None:
    if hasattr(signal, "sigtimedwait"):
        signal.sigtimedwait({signal.SIGTERM}, seconds)  # returns at once on a (blocked, pending) SIGTERM
    else:
        time.sleep(seconds)


def _ask_for_pdeathsig() -> None:
    if not sys.platform.startswith("linux"):
        return  # getppid polling only
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # the polling still notices within POLL_S


if __name__ == "__main__":
    watch(int(sys.argv[1]), sys.argv[2])
