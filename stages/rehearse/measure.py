"""One stage of a rehearsal, run and measured in a fresh process:

    python -m stages.rehearse.measure REQUEST.json RESULT.json

REQUEST holds the rehearsal's config (a dict) and the stage's name; RESULT gets the wall seconds of the stage
(its module imported first, so they are the stage's own), its metrics and bytes written, the process's resident
high-water mark (VmHWM: what this stage and the imports it needs held at their peak, as a Dask or torchrun worker of
the real run would hold it; any child process's peak too) and, on CUDA, torch's peak of allocated device memory.
A stage that fails writes its one-line error instead (exit status 1).
"""

from __future__ import annotations

import importlib
import json
import logging
import resource
import sys
import time
from contextlib import contextmanager
from pathlib import Path


def peak_rss_bytes() -> int:
    """This process's resident high-water mark (Linux VmHWM; ru_maxrss elsewhere, in KiB on Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and its finished children."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


@contextmanager
def log_to_stderr():
    """The srcflow log's INFO lines on stderr while it lasts (a rehearsal's stdout may hold its JSON)."""
    logger = logging.getLogger("srcflow")
    handler, level = logging.StreamHandler(sys.stderr), logger.level
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel("INFO")
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def one_line(stage: str, e: BaseException) -> str:
    text = (str(e).strip().splitlines() or [""])[0]
    kind = "" if isinstance(e, (ValueError, OSError)) else f"{type(e).__name__}: "
    return f"{stage}: {kind}{text}" if not text.startswith(f"{stage}:") else text


def main(request_path: str, result_path: str) -> int:
    started = time.perf_counter()
    request = json.loads(Path(request_path).read_text())
    stage = request["stage"]
    result: dict = {"stage": stage}
    device = None
    try:
        from pipeline.config import validate_config
        from stages.runner import plan, run_stage

        cfg = validate_config(request["config"], source="the rehearsal config")
        planned = next(p for p in plan(cfg, stage) if p.name == stage)
        importlib.import_module(f"stages.{stage}")  # torch and the stage's libraries: not the stage's seconds
        import torch

        from pipeline.device import resolve_device

        device = resolve_device(cfg.runtime.device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        result["startup_seconds"] = time.perf_counter() - started
        result["rss_before_bytes"] = peak_rss_bytes()
        t0, cpu0 = time.perf_counter(), cpu_seconds()
        manifest = run_stage(planned, cfg)
        result["seconds"] = time.perf_counter() - t0
        result["cpu_seconds"] = cpu_seconds() - cpu0  # beside `seconds`: how much of the machine the stage had
        result["metrics"] = manifest.metrics
        result["bytes_written"] = manifest.bytes
        result["path"] = str(planned.path)
    except Exception as e:
        result["error"] = one_line(stage, e)
    result["peak_rss_bytes"] = peak_rss_bytes()
    result["children_peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    if device is not None and device.type == "cuda":
        import torch

        result["peak_device_bytes"] = torch.cuda.max_memory_allocated(device)
        result["peak_device_reserved_bytes"] = torch.cuda.max_memory_reserved(device)
    Path(result_path).write_text(json.dumps(result, default=str))
    return 1 if "error" in result else 0


if __name__ == "__main__":
    with log_to_stderr():
        status = main(*sys.argv[1:3])
    sys.exit(status)
