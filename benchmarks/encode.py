"""Stage `encode` against its encoder alone, the Zarr writer against raw writes, and peak RSS against N.

    python -m benchmarks.encode --out                     # CPU, smoke encoder, < ~3 min -> results/encode-cpu.json
    python -m benchmarks.encode --device cuda --out       # DINOv2-B/reg4 shapes, random weights, fp32 (TF32)
                                                          #   -> results/encode-cuda.json

One run, side by side on the same machine (shared and noisy: compare figures of one run only):
- `encode_images_per_s`: the real `stages.encode.run` on a generated shard set of 256 px JPEGs (tar
  read, JPEG decode, ADM crop, transfer, both views' forwards, Zarr write, commits, statistics);
- `forward_images_per_s`: the same encoder on pre-made input tensors of the same batch, both views;
  `ratio` = encode / forward, goal >= 0.9 (the data path hides behind compute); both at the timed
  run's `encode.precision` (--precision, default fp32 as the configs);
- `precision`: the forward alone at fp32 (TF32 matmuls on CUDA) and at bf16 autocast, images/s each, and
  the error of bf16 features against fp32 ones on one batch: ||f_bf16 - f_fp32|| / ||f_fp32|| over the
  batch, the mean per token of the same ratio, and the max abs difference;
- `jobs_images_per_s` / `jobs_ratio`: the same run over its jobs only (the stage's `rows_per_s`),
  without the stage's fixed costs (encoder load, store creation, statistics, validation), but with
  the start of the Dask workers when --workers > 1;
- `serial_images_per_s`: the stage again with `encode.jobs_per_worker=1` (no job overlaps another),
  and `job_seconds`: where the timed run's jobs spent their time (the stage's own metric);
- `write`: the Zarr row writer (pipeline.data.zarr_store) against a raw sequential write of the same
  bytes into one file per shard, both into the page cache without fsync; goal ratio >= 0.8;
- `rss`: peak RSS of a fresh process encoding N and 10N train images (`--rss-images` N, default 128
  and at least one Zarr shard's worth; + 1 val image per class), read from VmHWM on Linux (ru_maxrss
  keeps the parent's RSS across fork + exec); goal ratio <= 1.2.

The images are 256 procedural tiny-ImageNet JPEGs at 256 px (mean size in the output; ImageNet's are
~110 KB at ~400x350, so they decode slower), repeated under new names (hard links) to each set's size.
The top-level `stage`, `rows_per_s` and model fields make the result usable by `srcflow plan`.
`--simulate-device R` replaces the encoder's forward by a wait of batch / R seconds, one job at a
time and without the GIL (as a GPU's kernels run), returning zeros: it measures, on a machine without a GPU, how much of
the real data path (tar read, decode, crop, write, commit) hides behind a device of R images/s.
Its figures are labelled `"simulated_device"` and say nothing about any encoder's speed.
Prints JSON to stdout; `--out` also writes benchmarks/results/encode-<device>.json (with an -<arch>
suffix when --arch is not the device's default).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent
ARCHS = {
    # the smoke config's encoder: input 56, patch 7 -> 8x8 tokens of 64 channels, 2 layers
    "smoke": ["encoder.input_size=56", "encoder.arch.embed_dim=64", "encoder.arch.depth=2",
              "encoder.arch.num_heads=2", "encoder.arch.patch_size=7"],
    # the real DINOv2-B/reg4 at 224 (16x16 tokens of 768, 12 layers), random weights
    "dinov2-b": ["encoder.input_size=224", "encoder.arch={}"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=sorted(ARCHS), default=None,
                        help="encoder shapes; default smoke on CPU, dinov2-b on CUDA")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--images", type=int, default=None,
                        help="train images of the timed encode (+1 val per class); default 256 on CPU, 4096 on CUDA")
    parser.add_argument("--batch", type=int, default=None, help="encode.batch_size (default: 64 on CPU, 256 on CUDA)")
    parser.add_argument("--rows-per-shard", type=int, default=256)
    parser.add_argument("--rows-per-chunk", type=int, default=16)
    parser.add_argument("--jobs-per-worker", type=int, default=2, help="encode.jobs_per_worker of the timed run")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="encode.precision of the timed run")
    parser.add_argument("--workers", type=int, default=1, help="runtime.workers of the timed run (Dask when > 1)")
    parser.add_argument("--throughput-only", action="store_true",
                        help="skip the write comparison and the RSS runs (e.g. a second run at other --workers)")
    parser.add_argument("--write-mb", type=int, default=200, help="megabytes written by each write trial")
    parser.add_argument("--repeats", type=int, default=3, help="alternating trials of the write comparison")
    parser.add_argument("--rss-images", type=int, default=None,
                        help="N of the RSS comparison (N vs 10N train images); default 128 on CPU, 1024 on CUDA")
    parser.add_argument("--simulate-device", type=float, default=None, metavar="R",
                        help="stand in for a device encoding R images/s (both views); see above")
    parser.add_argument("--out", action="store_true", help="also write benchmarks/results/encode-<device>.json")
    parser.add_argument("--rss-child", nargs=2, metavar=("SHARD_DIR", "WORK_DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    default_arch = "dinov2-b" if cuda else "smoke"
    args.arch = args.arch or default_arch
    args.batch = args.batch or (256 if cuda else 64)
    args.images = args.images or (4096 if cuda else 256)
    args.rss_images = args.rss_images or (1024 if cuda else 128)
    # N must fill a Zarr shard (2 views per image) for each job a worker runs at once: memory grows with a
    # job's rows up to rows_per_shard and with the jobs in flight, and a smaller N would pass that growth
    # off as growth with N
    args.rss_images = max(args.rss_images, -(-args.rows_per_shard * args.jobs_per_worker // 2))
    if args.rss_child:
        print(json.dumps(rss_child(args, Path(args.rss_child[0]), Path(args.rss_child[1]))))
        return

    with tempfile.TemporaryDirectory(prefix="bench-encode-") as tmp:
        report = run(args, Path(tmp))
    print(json.dumps(report, indent=2))
    if args.out:
        RESULTS.mkdir(parents=True, exist_ok=True)
        suffix = ("" if args.arch == default_arch else f"-{args.arch}") + ("-simulated" if args.simulate_device else "")
        path = RESULTS / f"encode-{args.device.split(':')[0]}{suffix}.json"
        path.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {path}", file=sys.stderr)


def run(args, tmp: Path) -> dict:
    from pipeline.data.tiny_imagenet import make_tiny_imagenet

    started = time.perf_counter()
    classes = 16
    generated, timed = tmp / "generated", tmp / "imagenet"
    make_tiny_imagenet(generated, classes=classes, per_class=16, val_per_class=1, size=256)  # 256 distinct JPEGs
    replicate(generated, timed, args.images)
    cfg = bench_config(args, tmp / "store", timed)
    shard = shard_set(cfg)

    encoder = bench_encoder(args, cfg)
    images = shard.metrics["samples"]
    forward_first = forward_rate(cfg, encoder, images, cfg.encode.precision)
    encode_seconds, metrics = timed_encode(cfg, shard, tmp / "encode")
    serial = cfg.model_copy(deep=True)
    serial.encode.jobs_per_worker, serial.runtime.workers = 1, 1
    serial_seconds, _ = timed_encode(serial, shard, tmp / "encode-serial")
    forward_second = forward_rate(cfg, encoder, images, cfg.encode.precision)
    forward = (forward_first + forward_second) / 2
    precision = {} if args.simulate_device else {"precision": precision_comparison(cfg, encoder, images)}
    encode = images / encode_seconds
    views = len(cfg.encode.views)

    side = {} if args.throughput_only else {"write": write_comparison(args, tmp / "write"),
                                             "rss": rss_comparison(args, generated, tmp)}
    return {
        # a simulated device is no measurement of the stage: `srcflow plan` must not size runs from it
        "benchmark": "encode", "stage": "encode-simulated" if args.simulate_device else "encode",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": args.device, "device_name": device_name(args.device), "cpu_count": os.cpu_count(),
        "torch": __import__("torch").__version__, "threads": __import__("torch").get_num_threads(),
        "arch": args.arch, "encoder_name": cfg.encoder.name, "input_size": cfg.encoder.input_size,
        "tokens": encoder.num_tokens, "channels": encoder.channels, "depth": len(encoder.vit.blocks),
        "params_m": round(sum(p.numel() for p in encoder.parameters()) / 1e6, 2),
        "views": views, "encode_precision": cfg.encode.precision, "dtype": cfg.encode.dtype,
        "batch_size": cfg.encode.batch_size,
        "workers": cfg.runtime.workers, "jobs_per_worker": cfg.encode.jobs_per_worker,
        "rows_per_shard": cfg.encode.rows_per_shard, "rows_per_chunk": cfg.encode.rows_per_chunk,
        "resolution": cfg.data.resolution, "images": images,
        "mean_jpeg_bytes": round(mean_jpeg_bytes(generated)),
        "encode_images_per_s": round(encode, 2), "rows_per_s": round(encode * views, 2),
        "forward_images_per_s": round(forward, 2),
        "forward_images_per_s_trials": [round(forward_first, 2), round(forward_second, 2)],
        "ratio": round(encode / forward, 3), "ratio_goal": 0.9,
        "jobs_images_per_s": round(metrics["rows_per_s"] / views, 2),
        "jobs_ratio": round(metrics["rows_per_s"] / views / forward, 3),
        "serial_images_per_s": round(images / serial_seconds, 2), "job_seconds": metrics["job_seconds"],
        "simulated_device": args.simulate_device,
        **precision, **side,
        "wall_s": round(time.perf_counter() - started, 1),
    }


# --- the data set, the config and the stage -----------------------------------------------------


def bench_config(args, storage: Path, data_root: Path):
    from pipeline.config import load_config

    return load_config(REPO / "configs" / "smoke.yaml", [
        f"storage.root={storage}", f"data.root={data_root}", "data.generate_tiny=null", "data.resolution=256",
        f"runtime.device={args.device.split(':')[0]}", "runtime.progress=false",
        "shard.samples_per_shard=256", "shard.workers=1", "encode.views=[plain, flip]", "encode.dtype=float16",
        f"encode.rows_per_shard={args.rows_per_shard}", f"encode.rows_per_chunk={args.rows_per_chunk}",
        f"encode.batch_size={args.batch}", f"encode.jobs_per_worker={args.jobs_per_worker}",
        f"encode.precision={args.precision}",
        f"runtime.workers={args.workers}", "encoder.weights=random", *ARCHS[args.arch]])


def replicate(src: Path, dst: Path, train_images: int) -> None:
    """An ImageFolder of `train_images` train images (round robin over the classes) and the val images
    of `src`, made of hard links to src's JPEGs under new names: decoding costs the same as distinct files."""
    for split in ("train", "val"):
        synsets = sorted((src / split).iterdir())
        for c, synset_dir in enumerate(synsets):
            out = dst / split / synset_dir.name
            out.mkdir(parents=True)
            images = sorted(synset_dir.iterdir())
            count = len(images) if split == "val" else train_images // len(synsets) + (c < train_images % len(synsets))
            for i in range(count):
                image = images[i % len(images)]
                target = out / f"{image.stem}r{i}{image.suffix}"
                try:
                    os.link(image, target)
                except OSError:
                    target.write_bytes(image.read_bytes())


def shard_set(cfg):
    from pipeline.runner import run_pipeline

    return run_pipeline(cfg, until="shard")["shard"]


def timed_encode(cfg, shard, out_dir: Path) -> tuple[float, dict]:
    """Seconds of the real encode stage function, from the shard set to a validated feature store, and
    the stage's metrics."""
    import torch

    from pipeline.artifacts import StageOutput
    from stages import encode

    out_dir.mkdir(parents=True)
    start = time.perf_counter()
    metrics = encode.run(cfg, {"shard": shard}, StageOutput("encode", "benchmark", out_dir))
    if cfg.runtime.device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, metrics


def bench_encoder(args, cfg):
    """The stage's encoder, built once and reused by the stage (cached), its forward replaced by a
    simulated device's wait when --simulate-device is given."""
    from stages.encode import encoder_spec, load_encoder

    encoder = load_encoder(encoder_spec(cfg), cfg.runtime.device)
    if args.simulate_device:
        simulate_device(encoder, args.simulate_device, len(cfg.encode.views))
    return encoder


def simulate_device(encoder, images_per_s: float, views: int) -> None:
    """The cached encoder's forward becomes the wait of a device of `images_per_s` (both views): one at a
    time, as one device runs the jobs' kernels, and without the GIL, as kernels run beside Python."""
    import threading

    import torch

    device = threading.Lock()

    def forward(x):
        with device:
            time.sleep(len(x) / (images_per_s * views))
        return torch.zeros(len(x), encoder.num_tokens, encoder.channels, device=x.device)

    encoder.forward = forward


def encoder_input(cfg, seed: int = 0):
    """One batch of random 8-bit images as the encoder's input, on the benchmark's device."""
    import torch

    from pipeline.models.rae import to_encoder_input

    r, generator = cfg.data.resolution, torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (cfg.encode.batch_size, r, r, 3), dtype=torch.uint8, generator=generator)
    return to_encoder_input(pixels.to(cfg.runtime.device), cfg.encoder.input_size)


def forward_rate(cfg, encoder, images: int, precision: str) -> float:
    """Images/s of the encoder alone (both views, as encode runs it) on a pre-made input batch."""
    import torch

    from pipeline.training import inference_precision

    device = torch.device(cfg.runtime.device)
    batch = cfg.encode.batch_size
    x = encoder_input(cfg)
    with torch.inference_mode(), inference_precision(device, precision):
        encoder(x), encoder(x.flip(-1))  # warm-up at the full batch shape (kernels, allocator)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for b0 in range(0, images, batch):
            n = min(batch, images - b0)
            for view in (x[:n], x[:n].flip(-1)):
                encoder(view)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return images / (time.perf_counter() - start)


def precision_comparison(cfg, encoder, images: int) -> dict:
    """encode.precision fp32 vs bf16: the forward's images/s at each, and bf16's error on one batch of features."""
    import torch

    from pipeline.training import inference_precision

    rates = {p: round(forward_rate(cfg, encoder, images, p), 2) for p in ("fp32", "bf16")}
    x = encoder_input(cfg, seed=1)
    with torch.inference_mode():
        with inference_precision(cfg.runtime.device, "fp32"):
            f32 = encoder(x).float()
        with inference_precision(cfg.runtime.device, "bf16"):
            f16 = encoder(x).float()
    diff = f16 - f32
    per_token = diff.norm(dim=-1) / f32.norm(dim=-1)
    return {"fp32_images_per_s": rates["fp32"], "bf16_images_per_s": rates["bf16"],
            "bf16_speedup": round(rates["bf16"] / rates["fp32"], 3),
            "rel_error": float(diff.norm() / f32.norm()), "rel_error_per_token_mean": float(per_token.mean()),
            "max_abs_error": float(diff.abs().max()), "feature_abs_mean": float(f32.abs().mean()),
            "images_compared": len(x),
            "fp32_means": "TF32 matmuls" if torch.device(cfg.runtime.device).type == "cuda" else "strict fp32 (CPU)"}


def mean_jpeg_bytes(root: Path) -> float:
    sizes = [p.stat().st_size for p in root.rglob("*.JPEG")]
    return sum(sizes) / max(len(sizes), 1)


# --- the Zarr writer against raw writes -----------------------------------------------------------


def write_comparison(args, folder: Path, tokens: int = 256, channels: int = 768) -> dict:
    """MB/s of write_rows into a features-layout store (as configured, and with one chunk per shard) vs
    one raw file per shard, alternating trials.
    Rows have the paper's shape (DINOv2-B/reg4 at 224: 256 x 768 float16) whatever --arch is: the
    smoke encoder's 8 KB rows would measure per-chunk overhead, not the store that matters."""
    import numpy as np

    from pipeline.data.zarr_store import create_row_store, write_rows
    from storage_schemas.zarr_layouts import FEATURES

    row_bytes = tokens * channels * 2
    shard_rows = args.rows_per_shard
    shards = max(1, round(args.write_mb * 2**20 / (row_bytes * shard_rows)))
    rows = shards * shard_rows
    rng = np.random.default_rng(0)
    block = rng.standard_normal((shard_rows, tokens, channels)).astype(np.float16)
    megabytes = rows * row_bytes / 1e6
    chunkings = {"zarr": args.rows_per_chunk, "one_chunk_per_shard": shard_rows}  # the configured layout, and none
    times = {name: [] for name in (*chunkings, "raw")}
    for trial in range(args.repeats):
        for name, rows_per_chunk in chunkings.items():
            store = folder / f"{name}-{trial}" / "features.zarr"
            create_row_store(store, FEATURES, rows, rows_per_shard=shard_rows, rows_per_chunk=rows_per_chunk,
                             row_shapes={"features": ((tokens, channels), "float16")}, attrs={})
            start = time.perf_counter()
            for k in range(shards):
                write_rows(store, k * shard_rows, {"features": block})
            times[name].append(time.perf_counter() - start)
            subprocess.run(["rm", "-rf", str(store.parent)], check=True)  # keep the disk footprint to one store

        raw = folder / f"raw-{trial}"
        raw.mkdir(parents=True)
        payload = block.tobytes()
        start = time.perf_counter()
        for k in range(shards):
            with open(raw / f"{k:06d}", "wb") as f:
                f.write(payload)
        times["raw"].append(time.perf_counter() - start)
        subprocess.run(["rm", "-rf", str(raw)], check=True)
    rate = {name: megabytes / statistics.median(t) for name, t in times.items()}
    return {"megabytes": round(megabytes, 1), "shards": shards, "row_shape": [tokens, channels],
            "rows_per_shard": shard_rows, "rows_per_chunk": args.rows_per_chunk,
            "zarr_mb_per_s": round(rate["zarr"], 1), "raw_mb_per_s": round(rate["raw"], 1),
            "ratio": round(rate["zarr"] / rate["raw"], 3), "goal": 0.8, "trials": args.repeats,
            # the same rows without inner chunks: no sharding codec, whose per-chunk fill + copy and shard
            # concatenation are what the configured layout pays for its random-read unit
            "one_chunk_per_shard_mb_per_s": round(rate["one_chunk_per_shard"], 1),
            "one_chunk_per_shard_ratio": round(rate["one_chunk_per_shard"] / rate["raw"], 3),
            "note": "median of alternating trials; page cache, no fsync, one file per shard on both sides"}


# --- peak RSS in a fresh process ------------------------------------------------------------------


def rss_comparison(args, generated: Path, tmp: Path) -> dict:
    """Peak RSS of the stage at N and 10N train images, each in a fresh process."""
    runs = []
    for name, train_images in (("n", args.rss_images), ("10n", 10 * args.rss_images)):
        replicate(generated, tmp / f"imagenet-{name}", train_images)
        shard = shard_set(bench_config(args, tmp / f"store-{name}", tmp / f"imagenet-{name}"))
        runs.append(measure_rss(args, shard.dir, tmp / f"rss-{name}"))
    small, large = runs
    return {"images_n": small["images"], "images_10n": large["images"],
            "peak_rss_mb_n": small["peak_rss_mb"], "peak_rss_mb_10n": large["peak_rss_mb"],
            "ratio": round(large["peak_rss_mb"] / small["peak_rss_mb"], 3), "goal": 1.2,
            "peak_gpu_mb_n": small["peak_gpu_mb"], "peak_gpu_mb_10n": large["peak_gpu_mb"],
            "note": "fresh process per N: VmHWM (Linux), encode stage only"}


def measure_rss(args, shard_dir: Path, work: Path) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.encode", "--rss-child", str(shard_dir), str(work),
           "--arch", args.arch, "--device", args.device, "--batch", str(args.batch),
           "--rows-per-shard", str(args.rows_per_shard), "--rows-per-chunk", str(args.rows_per_chunk),
           "--jobs-per-worker", str(args.jobs_per_worker), "--workers", str(args.workers), "--precision", args.precision,
           *(["--simulate-device", str(args.simulate_device)] if args.simulate_device else [])]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"RSS child failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def rss_child(args, shard_dir: Path, work: Path) -> dict:
    import torch

    from storage_schemas.success import read_manifest

    shard = read_manifest(shard_dir)
    cfg = bench_config(args, work / "store", work / "unused")
    bench_encoder(args, cfg)
    timed_encode(cfg, shard, work / "encode")
    gpu = torch.cuda.max_memory_allocated() / 2**20 if cfg.runtime.device == "cuda" else None
    return {"images": shard.metrics["samples"], "peak_rss_mb": round(peak_rss_mb(), 1),
            "peak_gpu_mb": None if gpu is None else round(gpu, 1)}


def peak_rss_mb() -> float:
    """This process's peak resident set. Linux: VmHWM, the high-water mark of this program's memory;
    ru_maxrss is not used there because it keeps the parent's RSS across fork + exec."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(0)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


if __name__ == "__main__":
    main()
