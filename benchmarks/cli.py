"""What the CLI costs when there is nothing to do, as JSON: `srcflow --help`, `srcflow status` and a no-op
`srcflow run` (every stage done), each a fresh process, median of `--repeats`. Also the no-op run through
Prefect (`--prefect`: the ephemeral server starts and every stage shows as Cached), and whether planning
imported torch.

    python benchmarks/cli.py [--config configs/smoke.yaml] [--repeats 3]

The config's stages must be done: the benchmark runs `srcflow run` once, untimed, if they are not.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

SRCFLOW = [sys.executable, "-m", "srcflow.cli"]


def timed(args: list[str], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(SRCFLOW + args, check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return round(statistics.median(times), 2)


def plan_imports_torch(config: str) -> bool:
    code = ("import sys; from pipeline.config import load_config; from stages.runner import plan; "
            f"plan(load_config({config!r})); print('torch' in sys.modules)")
    return subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                          text=True).stdout.strip().endswith("True")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/smoke.yaml")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("PREFECT_HOME", str(Path(".prefect").absolute()))
    subprocess.run([*SRCFLOW, "run", "--config", args.config], check=True, capture_output=True)  # all done now
    config = ["--config", args.config]
    result = {
        "benchmark": "cli",
        "config": args.config,
        "cpu_count": os.cpu_count(),
        "repeats": args.repeats,
        "help_s": timed(["--help"], args.repeats),
        "status_s": timed(["status", *config], args.repeats),
        "noop_run_s": timed(["run", *config], args.repeats),
        "noop_run_prefect_s": timed(["run", "--prefect", *config], args.repeats),
        "plan_imports_torch": plan_imports_torch(args.config),
    }
    result["noop_run_minus_status_s"] = round(result["noop_run_s"] - result["status_s"], 2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
