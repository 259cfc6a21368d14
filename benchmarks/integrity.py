"""The cost of the store's integrity checks, as JSON.

`store`: commit (CRC-32C of every file), the fast check (`status`, before every read of an upstream: each listed
file's size) and `verify --deep` (every checksum), on a synthetic stage output of `--files` large files holding
`--gb` GB together, plus `--small` 4 KB files (a row store's Zarr metadata and commit markers). Deep checks are
timed warm (page cache) and, where this process may drop the page cache (root on Linux), cold.

`read`: the checks made where bytes are read (pipeline/integrity.py), each reader with them and without:
- `zarr_read`: a features-shaped array (`--rows` rows of 256 tokens x 768 float16, 16-row chunks in 256-row
  shards), read shard by shard (compress, Dask) and chunk by random chunk (fit_decoder, the shuffle windows): the
  layout without chunk checksums (schema 1), with Zarr's crc32c codec per chunk (schema 2, the choice), and schema 1
  with each shard file's CRC-32C checked against its record before it is read (the alternative);
- `encode_reader`: the JPEGs of `--images` photo-like images (~100 KB, 500x375) read from their shard tars, each
  checked against its manifest sha256 (`iter_jpegs`), against the same reads unchecked; beside the PIL decode and
  ADM crop of the same JPEGs on one core, which the reader feeds;
- `compress_reader`: compress's read of a feature shard (features, labels, keys, view, split), both layouts;
- `train_flow_reader`: train_flow's streamed batches (`code_batches`, shuffle windows read from codes.zarr, a
  rank's rows as their bytes alone), codes of 256 tokens x 32 float32: schema 1 and 2 (those rows unchecked) and
  3 (each row against its row CRC-32C);
- `weights`: a `--weights-mb` safetensors file loaded as before (by path) and from bytes checked against a
  CRC-32C record (a store output's) or a sha256 (an external input).
All read figures are per CPU second of the reading process (`interleaved`: the least of `--repeats`, the variants in
turns), warm (page cache): the checks' CPU cost at its largest share; cold reads add the same disk time to both
sides.

    python benchmarks/integrity.py [--part store|read|all] [--gb 1] [--rows 512] [--images 512] [--dir DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

if not __package__:  # run as a script: benchmarks.encode's photo-like data set is imported as a package
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.artifacts import ArtifactStore, file_crc32c, now


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved(fns: dict, repeats: int) -> dict[str, float]:
    """The CPU seconds of each function (this process, all its threads), the least of `repeats` calls made in turns
    after one untimed round (the page cache filled). Reads from the page cache are CPU work; on a shared machine
    wall time measures the neighbours as much as the code."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for round_ in range(repeats + 1):
        for name, fn in fns.items():
            start = time.process_time()
            fn()
            if round_:
                times[name].append(time.process_time() - start)
    return {name: min(t) for name, t in times.items()}


def drop_page_cache() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def store_checks(args, tmp: Path) -> dict:
    store, fp = ArtifactStore(tmp / "store"), "b" * 64
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
    return {
        "bytes": total, "files": files,
        "commit_s": round(commit_s, 3), "commit_s_per_gb": round(commit_s / gb, 3),
        "fast_check_s": round(fast_s, 4), "fast_check_us_per_file": round(fast_s / files * 1e6, 2),
        "deep_verify_warm_s": round(deep_warm_s, 3), "deep_verify_warm_s_per_gb": round(deep_warm_s / gb, 3),
        "deep_verify_cold_s_per_gb": round(deep_cold_s / gb, 3) if deep_cold_s is not None else None,
        "cold": "page cache dropped before one deep check" if deep_cold_s is not None else
                "not measured: cannot drop the page cache here",
    }


# --- the read path ---------------------------------------------------------------------------------


def row_store(path: Path, layout, rows: int, tokens: int, channels: int, dtype: str, schema: int) -> Path:
    """A features- or codes-shaped row store (256-row shards of 16-row chunks) of random rows, in schema 2's layout
    (chunk CRC-32Cs) or schema 1's, written by the stages' own writer."""
    from pipeline.data.zarr_store import create_row_store, write_rows, write_small_array
    from storage_schemas.zarr_layouts import FEATURES

    rng = np.random.default_rng(0)
    name = "features" if layout is FEATURES else "codes"
    attrs = {"splits": {"train": [0, rows], "val": [rows, rows]}, "views": ["plain"], "grid_size": 16,
             **({"encoder": "bench", "weights_sha256": "", "resolution": 256, "input_size": 224, "crop": "",
                 "normalization": "", "logical_dtype": dtype, "source_fingerprint": "", "stats_count": rows}
                if name == "features" else {"features_fingerprint": "", "src_fingerprint": ""})}
    create_row_store(path, layout, rows, rows_per_shard=256, rows_per_chunk=16,
                     row_shapes={name: ((tokens, channels), dtype)}, attrs=attrs, schema=schema)
    for start in range(0, rows, 256):
        n = min(256, rows - start)
        write_rows(path, start, {name: rng.standard_normal((n, tokens, channels)).astype(dtype),
                                 "labels": (np.arange(start, start + n) % 10).astype(np.int32),
                                 "key": np.array([f"n{i:09d}" for i in range(start, start + n)]),
                                 "view": np.zeros(n, np.uint8), "split": np.zeros(n, np.uint8)})
    stats = ("stats_mean", "stats_var") if name == "features" else ("code_mean", "code_std")
    for stat in stats:
        dims = ("channel", "y", "x") if name == "features" else ("code_channel",)
        write_small_array(path, stat, np.ones((channels, 16, 16) if name == "features" else (channels,)), dims)
    return path


def zarr_read(args, tmp: Path) -> dict:
    from pipeline.integrity import open_checked
    from storage_schemas.zarr_layouts import FEATURES

    rows, tokens, channels = args.rows, 256, 768
    v1 = row_store(tmp / "v1.zarr", FEATURES, rows, tokens, channels, "float16", schema=1)
    v2 = row_store(tmp / "v2.zarr", FEATURES, rows, tokens, channels, "float16", schema=2)
    row_mb = tokens * channels * 2 / 1e6
    shards = range(0, rows, 256)
    chunks = np.random.default_rng(1).integers(0, rows // 16, args.random_chunks)

    def shard_file(store: Path, start: int) -> Path:
        return store / "features" / "c" / str(start // 256) / "0" / "0"

    def sequential(store: Path, records: bool):
        arr = open_checked(store)["features"]
        for start in shards:
            if records:  # the alternative: the shard file's CRC-32C against its record, then the read
                file_crc32c(shard_file(store, start))
            arr[start:start + 256]

    def random_chunks(store: Path, records: bool):
        arr, verified = open_checked(store)["features"], set()
        for k in chunks:
            if records and k * 16 // 256 not in verified:  # a row needs its whole shard checked first
                file_crc32c(shard_file(store, k * 16))
                verified.add(k * 16 // 256)
            arr[k * 16:(k + 1) * 16]

    out = {"rows": rows, "row_shape": [tokens, channels], "dtype": "float16", "mb": round(rows * row_mb, 1)}
    for pattern, fn, mb in (("sequential_mb_per_cpu_s", sequential, rows * row_mb),
                            ("random_chunks_mb_per_cpu_s", random_chunks, len(chunks) * 16 * row_mb)):
        seconds = interleaved({"v1_plain": lambda fn=fn: fn(v1, False), "v2_chunk_crc32c": lambda fn=fn: fn(v2, False),
                               "v1_shard_records": lambda fn=fn: fn(v1, True)}, args.repeats)
        out[pattern] = {k: round(mb / s, 1) for k, s in seconds.items()}
        out[pattern.replace("mb_per_cpu_s", "ratio_to_plain")] = {k: round(seconds["v1_plain"] / s, 3)
                                                              for k, s in seconds.items()}
    return out


def encode_reader(args, tmp: Path) -> dict:
    """The shard set of `--images` photo-like JPEGs (the shard stage on hard links to 32 distinct ones)."""
    from benchmarks.encode import REPO, photo_folder, replicate
    from pipeline.config import load_config
    from pipeline.data.shards import decode_crop, iter_jpegs, jpeg_members, manifest_rows
    from stages.runner import run_pipeline

    photo_folder(tmp / "photos", classes=8, per_class=4)
    replicate(tmp / "photos", tmp / "imagenet", args.images)
    cfg = load_config(REPO / "configs" / "smoke.yaml", [
        f"storage.root={tmp / 'artifacts'}", f"data.root={tmp / 'imagenet'}", "data.generate_tiny=null",
        "runtime.progress=false", "shard.workers=1", "shard.samples_per_shard=128"])
    shard_dir = run_pipeline(cfg, until="shard")["shard"].dir
    rows = manifest_rows(shard_dir, ("train",))
    by_tar: dict[str, dict[str, str]] = {}
    for r in rows:
        by_tar.setdefault(str(shard_dir / "shards" / r["shard"]), {})[r["key"]] = r["sha256"]

    def checked():
        return sum(len(jpeg) for tar, wanted in by_tar.items() for _, jpeg in iter_jpegs([tar], wanted))

    def unchecked():  # the same member reads, without the sha256
        total = 0
        for tar, wanted in by_tar.items():
            members = jpeg_members(tar)
            with open(tar, "rb") as f:
                for key in wanted:
                    offset, size = members[key]
                    total += len(os.pread(f.fileno(), size, offset))
        return total

    total = checked()
    seconds = interleaved({"unchecked": unchecked, "sha256_checked": checked}, args.repeats)
    jpegs = [jpeg for tar, wanted in list(by_tar.items())[:1] for _, jpeg in iter_jpegs([tar], wanted)][:64]
    decode_s = interleaved({"decode": lambda: [decode_crop(j, 256) for j in jpegs]}, 1)["decode"] / len(jpegs)
    per_image = {k: s / len(rows) for k, s in seconds.items()}
    return {"images": len(rows), "mean_jpeg_kb": round(total / len(rows) / 1e3, 1),
            "images_per_cpu_s": {k: round(1 / s) for k, s in per_image.items()},
            "mb_per_cpu_s": {k: round(total / s / 1e6, 1) for k, s in seconds.items()},
            "ratio_to_unchecked": round(seconds["unchecked"] / seconds["sha256_checked"], 3),
            "decode_pil_crop256_images_per_cpu_s": round(1 / decode_s, 1),
            "check_share_of_read_plus_decode": round((per_image["sha256_checked"] - per_image["unchecked"])
                                                     / (per_image["sha256_checked"] + decode_s), 4)}


def compress_reader(args, tmp: Path) -> dict:
    from pipeline.data.features import open_features
    from storage_schemas.zarr_layouts import FEATURES, array_name

    rows, tokens, channels = args.rows, 256, 768
    stores = {"v1_plain": tmp / "v1.zarr", "v2_chunk_crc32c": tmp / "v2.zarr"}  # zarr_read's, when it ran
    for schema, store in ((1, stores["v1_plain"]), (2, stores["v2_chunk_crc32c"])):
        if not store.exists():
            row_store(store, FEATURES, rows, tokens, channels, "float16", schema)

    def read(store: Path):
        group, _ = open_features(store)
        for start in range(0, rows, 256):
            for name in ("features", "labels", "key", "view", "split"):
                group[array_name(group, name)][start:start + 256]

    seconds = interleaved({k: lambda s=s: read(s) for k, s in stores.items()}, args.repeats)
    mb = rows * tokens * channels * 2 / 1e6
    return {"rows": rows, "mb_per_cpu_s": {k: round(mb / s, 1) for k, s in seconds.items()},
            "rows_per_cpu_s": {k: round(rows / s) for k, s in seconds.items()},
            "ratio_to_plain": round(seconds["v1_plain"] / seconds["v2_chunk_crc32c"], 3)}


def train_flow_reader(args, tmp: Path) -> dict:
    from pipeline.data.batches import WindowShuffle
    from pipeline.data.codes import TrainCodes, code_batches
    from storage_schemas.zarr_layouts import CODES

    rows, tokens, dim, batch, steps = args.code_rows, 256, 32, 256, args.steps
    out = {"rows": rows, "row_shape": [tokens, dim], "batch": batch, "steps": steps}
    # a rank's rows of each window are read as their bytes alone (zarr_store.read_rows): v1 and v2 unchecked,
    # v3 each row against its row CRC-32C
    stores = {name: row_store(tmp / f"codes-{name}.zarr", CODES, rows, tokens, dim, "float32", schema)
              for name, schema in (("v1_plain", 1), ("v2_chunk_crc32c", 2), ("v3_row_crc32c", 3))}

    def stream(store: Path):
        data = TrainCodes(store, in_memory_limit_gb=0)  # streamed: shuffle windows read from the store
        schedule = WindowShuffle(data.n, batch, 0, block=data.block, window=4 * batch)
        for _ in code_batches(data, schedule, 0, range(steps), prefetch=2):
            pass

    seconds = interleaved({name: lambda s=s: stream(s) for name, s in stores.items()}, args.repeats)
    mb = steps * batch * tokens * dim * 4 / 1e6
    out["steps_per_cpu_s"] = {k: round(steps / s, 1) for k, s in seconds.items()}
    out["mb_per_cpu_s"] = {k: round(mb / s, 1) for k, s in seconds.items()}
    out["ratio_to_plain"] = {k: round(seconds["v1_plain"] / seconds[k], 3) for k in stores if k != "v1_plain"}
    return out


def weights(args, tmp: Path) -> dict:
    import crc32c
    import safetensors.torch
    import torch

    path = tmp / "weights.safetensors"
    n = int(args.weights_mb * 1e6 / 4 / 64)
    safetensors.torch.save_file({f"w{i}": torch.randn(n) for i in range(64)}, str(path))
    mb = path.stat().st_size / 1e6

    def touched(state: dict) -> None:  # load_file maps the file: a model's load_state_dict reads every byte
        for t in state.values():
            t.sum()

    def by_path():
        touched(safetensors.torch.load_file(str(path)))

    def crc_record():  # pipeline.integrity.read_verified + training.load_safetensors
        data = path.read_bytes()
        crc32c.crc32c(data)
        touched(safetensors.torch.load(data))

    def sha256_digest():  # pipeline.integrity.read_with_sha256, an external input
        data = path.read_bytes()
        hashlib.sha256(data).hexdigest()
        touched(safetensors.torch.load(data))

    seconds = interleaved({"by_path": by_path, "crc32c_checked": crc_record, "sha256_checked": sha256_digest},
                          args.repeats)
    return {"mb": round(mb, 1), "mb_per_cpu_s": {k: round(mb / s, 1) for k, s in seconds.items()},
            "cpu_seconds": {k: round(s, 3) for k, s in seconds.items()}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=("store", "read", "all"), default="all")
    ap.add_argument("--gb", type=float, default=1.0)
    ap.add_argument("--files", type=int, default=16)
    ap.add_argument("--small", type=int, default=2000)
    ap.add_argument("--rows", type=int, default=512, help="feature rows (393 KB each)")
    ap.add_argument("--random-chunks", type=int, default=48)
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--code-rows", type=int, default=4096, help="code rows (32 KB each)")
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--weights-mb", type=float, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=None)
    args = ap.parse_args()

    os.environ.setdefault("SRCFLOW_CACHE_DIR", str(Path(tempfile.gettempdir()) / "srcflow-bench-cache"))
    report: dict = {"benchmark": "integrity", "date": now().isoformat(), "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        tmp = Path(tmp)
        if args.part in ("store", "all"):
            report["store"] = store_checks(args, tmp)
        if args.part in ("read", "all"):
            report["read"] = {"note": "warm page cache; v1 = schema 1 (no chunk checksums), v2 = schema 2 "
                                      "(crc32c codec per chunk)",
                              "zarr_read": zarr_read(args, tmp), "encode_reader": encode_reader(args, tmp),
                              "compress_reader": compress_reader(args, tmp),
                              "train_flow_reader": train_flow_reader(args, tmp), "weights": weights(args, tmp)}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
