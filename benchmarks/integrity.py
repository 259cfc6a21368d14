"""The cost of the store's integrity checks, as JSON: commit (CRC-32C of every file), the fast check
(`status`, before every read of an upstream: each listed file's size) and `verify --deep` (every checksum).

    python benchmarks/integrity.py [--gb 1] [--files 16] [--small 2000] [--dir DIR]

A synthetic stage output of `--files` large files holding `--gb` GB together, plus `--small` 4 KB files
(a row store's Zarr metadata and commit markers), under DIR (default: a temp dir). Deep checks are
timed warm (page cache) and, where this process may drop the page cache (root on Linux), cold.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from pipeline.artifacts import ArtifactStore, now


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def drop_page_cache() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, default=1.0)
    ap.add_argument("--files", type=int, default=16)
    ap.add_argument("--small", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=None)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        store, fp = ArtifactStore(tmp), "b" * 64
        out = store.open_output("bench", fp)
        size = int(args.gb * 1e9 / args.files)
        block = os.urandom(1 << 24)
        for i in range(args.files):
            with open(out.path / f"big-{i:04d}.bin", "wb") as f:
                for _ in range(size // len(block)):
                    f.write(block)
                f.write(block[:size % len(block)])
        (out.path / "small").mkdir()
        for i in range(args.small):
            (out.path / "small" / f"{i:06d}").write_bytes(os.urandom(4096))
        total = args.files * size + args.small * 4096

        started = time.perf_counter()
        store.commit(out, code_version="1", semantic={}, upstream={}, external={}, started=now(), metrics={})
        commit_s = time.perf_counter() - started
        fast_s = timed(lambda: store.check("bench", fp), args.repeats)
        deep_warm_s = timed(lambda: store.check("bench", fp, deep=True), args.repeats)
        deep_cold_s = None
        if drop_page_cache():
            started = time.perf_counter()
            store.check("bench", fp, deep=True)
            deep_cold_s = time.perf_counter() - started
        gb, files = total / 1e9, args.files + args.small + 1
        print(json.dumps({
            "benchmark": "integrity", "bytes": total, "files": files,
            "commit_s": round(commit_s, 3), "commit_s_per_gb": round(commit_s / gb, 3),
            "fast_check_s": round(fast_s, 4), "fast_check_us_per_file": round(fast_s / files * 1e6, 2),
            "deep_verify_warm_s": round(deep_warm_s, 3), "deep_verify_warm_s_per_gb": round(deep_warm_s / gb, 3),
            "deep_verify_cold_s_per_gb": round(deep_cold_s / gb, 3) if deep_cold_s is not None else None,
            "cold": "page cache dropped before one deep check" if deep_cold_s is not None else
                    "not measured: cannot drop the page cache here",
        }, indent=2))


if __name__ == "__main__":
    main()
