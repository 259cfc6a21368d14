"""Stage `encode` against its encoder alone, the decode paths per core, the Zarr writer against raw writes, and
peak RSS against N.

    python -m benchmarks.encode --out                     # CPU, smoke encoder, < ~3 min -> results/encode-cpu.json
    python -m benchmarks.encode --device cuda --out       # DINOv2-B/reg4 shapes, random weights, fp32 (TF32)
                                                          #   -> results/encode-cuda.json
    python -m benchmarks.encode --only decode             # the decode paths alone (seconds)
    python -m benchmarks.encode --only write              # the write candidates alone

One run, side by side on the same machine (shared and noisy: compare figures of one run only):
- `decode`: JPEG decode + ADM crop to data.resolution (`encode.decode`, pipeline/data/decode.py) on photo-like
  500x375 JPEGs at quality 90 (`photo_like_jpeg`, ~100 KB like ImageNet's), one torch thread, the paths in
  alternating rounds, best round of --repeats: `decode.<path>.images_per_s_per_core` for pil and tensor and
  their ratio `decode.tensor_vs_pil` (goal >= 1.7); the same at 1024x768 (`large_1024x768`: one BOX halving
  first); each path's pixel difference against pil (max and mean level, fraction of values that differ);
  nvjpeg on CUDA: `images_per_s` of batched decode + crop on the device (not per core), its CPU fallbacks
  and its pixels against pil; on a CPU only its crop arithmetic (torchvision's decode, the GPU's crop);
- `encode_images_per_s`: the real `stages.encode.run` on a generated shard set of those JPEGs (tar read,
  JPEG decode, ADM crop, transfer, both views' forwards, Zarr write, commits, statistics), once per decode
  path of --decode (`stage_by_decode`; the top-level figures are the first path's; `features_vs_first`:
  each other path's stored features against the first one's);
- `forward_images_per_s`: the same encoder on pre-made input tensors of full batches, both views; `ratio` =
  encode / forward, goal >= 0.9 (the data path hides behind compute); both at the timed run's
  `encode.precision` (--precision, default fp32 as the configs). `flops_per_image` (matmuls, both views,
  written out in `flops`) and `mfu` against the device's dense peak at that precision (null on CPU);
  --compile adds the torch.compile'd forward (`compiled_images_per_s`, compiled outside the timing) and
  runs the stage with `encode.compile: true`;
- `precision`: the forward alone at fp32 (TF32 matmuls on CUDA) and at bf16 autocast, images/s each, and
  the error of bf16 features against fp32 ones on one batch: ||f_bf16 - f_fp32|| / ||f_fp32|| over the
  batch, the mean per token of the same ratio, and the max abs difference;
- `jobs_images_per_s` / `jobs_ratio`: the same run over its jobs only (the stage's `rows_per_s`),
  without the stage's fixed costs (encoder load, store creation, statistics, validation), but with
  the start of the Dask workers when --workers > 1;
- `serial_images_per_s`: the stage again with `encode.jobs_per_worker=1` (no job overlaps another; not
  with --throughput-only), and `job_seconds`: where the timed run's jobs spent their time (the stage's own metric);
- `write`: MB/s of the candidate layouts and writers against a raw sequential write of the same bytes into
  one file per shard, all into the page cache without fsync: `zarr` (the configured inner chunks through
  Zarr's sharding codec), `direct` (the same files, byte for byte, written whole by
  pipeline.data.zarr_store: the default), `one_chunk_per_shard` (Zarr, no inner chunks), and per
  --writers P, P processes writing at once (`by_writers`, aggregate MB/s); goal ratio >= 0.8;
- `rss`: peak RSS of a fresh process encoding N and 10N train images (`--rss-images` N, default 128
  and at least one Zarr shard's worth; + 1 val image per class), read from VmHWM on Linux (ru_maxrss
  keeps the parent's RSS across fork + exec); goal ratio <= 1.2.

The images are 80 distinct photo-like 500x375 JPEGs (16 classes), repeated under new names (hard links) to
each set's size. The top-level `stage`, `rows_per_s` and model fields make the result usable by `srcflow plan`.
`--simulate-device R` builds the stage's encoder with a forward that is a wait of batch / R seconds, one job at a
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
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stages.plan.compute import encoder_flops

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent
ARCHS = {
    # the smoke config's encoder: input 56, patch 7 -> 8x8 tokens of 64 channels, 2 layers (the decoder, unused,
    # decodes them to the benchmark's 256 px)
    "smoke": ["encoder.input_size=56", "encoder.arch.embed_dim=64", "encoder.arch.depth=2",
              "encoder.arch.num_heads=2", "encoder.arch.patch_size=7", "decoder.patch_size=32"],
    # the real DINOv2-B/reg4 at 224 (16x16 tokens of 768, 12 layers), random weights
    "dinov2-b": ["encoder.input_size=224", "encoder.arch={}", "decoder.patch_size=16"],
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
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="encode.precision of the timed "
                                                                                      "run")
    parser.add_argument("--workers", type=int, default=1, help="runtime.workers of the timed run (Dask when > 1)")
    parser.add_argument("--decode", default=None,
                        help="encode.decode paths of the timed stage, comma-separated, the first one's figures on top "
                             "(default: pil,tensor on CPU; pil,tensor,nvjpeg on CUDA)")
    parser.add_argument("--compile", action="store_true", help="encode.compile: the torch.compile'd forward (CUDA)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's dense peak for the MFU (default: H100/H200 SXM, 989 bf16, 495 TF32)")
    parser.add_argument("--throughput-only", action="store_true",
                        help="skip the decode, precision and write comparisons, the serial run and the RSS runs")
    parser.add_argument("--only", choices=["decode", "write"], default=None, help="run just that comparison")
    parser.add_argument("--decode-images", type=int, default=48, help="distinct JPEGs of the decode comparison")
    parser.add_argument("--write-mb", type=int, default=200, help="megabytes written by each write trial")
    parser.add_argument("--writers", default="1,3", help="writer processes of the write comparison, comma-separated")
    parser.add_argument("--repeats", type=int, default=3, help="alternating trials of the decode and write comparisons")
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
    args.decode = (args.decode or ("pil,tensor,nvjpeg" if cuda else "pil,tensor")).split(",")
    args.writers = [int(w) for w in args.writers.split(",")]
    # N must fill a Zarr shard (2 views per image) for each job a worker runs at once: memory grows with a
    # job's rows up to rows_per_shard and with the jobs in flight, and a smaller N would pass that growth
    # off as growth with N
    args.rss_images = max(args.rss_images, -(-args.rows_per_shard * args.jobs_per_worker // 2))
    if args.rss_child:
        print(json.dumps(rss_child(args, Path(args.rss_child[0]), Path(args.rss_child[1]))))
        return

    with tempfile.TemporaryDirectory(prefix="bench-encode-") as tmp:
        if args.only == "decode":
            report = {"benchmark": "encode-decode", "device": args.device, "device_name": device_name(args.device),
                      "cpu_count": os.cpu_count(), "decode": decode_comparison(args)}
        elif args.only == "write":
            report = {"benchmark": "encode-write", "device_name": device_name("cpu"), "cpu_count": os.cpu_count(),
                      "write": write_comparison(args, Path(tmp) / "write")}
        else:
            report = run(args, Path(tmp))
    print(json.dumps(report, indent=2))
    if args.out and not args.only:
        RESULTS.mkdir(parents=True, exist_ok=True)
        suffix = ("" if args.arch == default_arch else f"-{args.arch}") + ("-simulated" if args.simulate_device else "")
        path = RESULTS / f"encode-{args.device.split(':')[0]}{suffix}.json"
        path.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {path}", file=sys.stderr)


def run(args, tmp: Path) -> dict:
    import torch

    started = time.perf_counter()
    generated, timed = tmp / "generated", tmp / "imagenet"
    photo_folder(generated)  # 80 distinct photo-like 500x375 JPEGs
    replicate(generated, timed, args.images)
    cuda = args.device.startswith("cuda")
    paths = [d for d in args.decode if cuda or d != "nvjpeg"]  # nvjpeg needs a GPU
    cfg = bench_config(args, tmp / "store", timed, decode=paths[0])
    shard = shard_set(cfg)

    build_encoder = encoder_factory(args, cfg)
    encoder = bench_encoder(args, cfg, build_encoder)
    images = shard.metrics["samples"]
    photos = [path.read_bytes() for path in sorted(generated.rglob("*.JPEG"))][:args.decode_images]
    decode = {} if args.throughput_only else {"decode": decode_comparison(args, photos)}
    forward_first = forward_rate(cfg, encoder, images, cfg.encode.precision)
    views = len(cfg.encode.views)
    flops = encoder_flops(encoder)
    peak = args.peak_tflops or {"bf16": 989.4, "fp32": 494.7}[cfg.encode.precision]  # H100/H200 SXM, dense

    def mfu(rate: float) -> float | None:
        return round(rate * views * flops["per_view"] / (peak * 1e12), 4) if cuda else None

    compiled = {}
    if args.compile and cuda:
        from stages.encode import compiled_encoder, encoder_spec

        begin = time.perf_counter()
        model = compiled_encoder(encoder_spec(cfg, build_encoder), cfg.runtime.device, cfg.encode.precision,
                                 cfg.encode.batch_size)
        rate = forward_rate(cfg, model, images, cfg.encode.precision)
        compiled = {"compile_s": round(time.perf_counter() - begin, 1), "compiled_images_per_s": round(rate, 2),
                    "compiled_mfu": mfu(rate)}
    by_decode = {}
    for path in paths:
        run_cfg = cfg.model_copy(deep=True)
        run_cfg.encode.decode = path
        seconds, metrics = timed_encode(run_cfg, shard, tmp / f"encode-{path}", build_encoder)
        by_decode[path] = {"encode_images_per_s": round(images / seconds, 2),
                           "jobs_images_per_s": round(metrics["rows_per_s"] / len(cfg.encode.views), 2),
                           "job_seconds": metrics["job_seconds"],
                           **{k: metrics[k] for k in ("decode_fallbacks",) if k in metrics}}
        if path != paths[0]:  # the same encoder: only the crops differ (a stream race would show here)
            by_decode[path]["features_vs_first"] = feature_difference(tmp / f"encode-{paths[0]}",
                                                                      tmp / f"encode-{path}")
    encode_seconds = images / by_decode[paths[0]]["encode_images_per_s"]
    metrics = {"rows_per_s": by_decode[paths[0]]["jobs_images_per_s"] * len(cfg.encode.views),
               "job_seconds": by_decode[paths[0]]["job_seconds"]}
    serial_seconds = None
    if not args.throughput_only:
        serial = cfg.model_copy(deep=True)
        serial.encode.jobs_per_worker, serial.runtime.workers = 1, 1
        serial_seconds, _ = timed_encode(serial, shard, tmp / "encode-serial", build_encoder)
    forward_second = forward_rate(cfg, encoder, images, cfg.encode.precision)
    forward = (forward_first + forward_second) / 2
    for entry in by_decode.values():
        entry["ratio"] = round(entry["encode_images_per_s"] / forward, 3)
    skip_precision = args.simulate_device or args.throughput_only
    precision = {} if skip_precision else {"precision": precision_comparison(cfg, encoder, images)}
    encode = images / encode_seconds

    side = {} if args.throughput_only else {"write": {**write_comparison(args, tmp / "write"),
                                                       **zstd_ratio(tmp / f"encode-{paths[0]}" / "features.zarr")},
                                             "rss": rss_comparison(args, generated, tmp)}
    return {
        # a simulated device is no measurement of the stage: `srcflow plan` must not size runs from it
        "benchmark": "encode", "stage": "encode-simulated" if args.simulate_device else "encode",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": args.device, "device_name": device_name(args.device), "cpu_count": os.cpu_count(),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "arch": args.arch, "encoder_name": cfg.encoder.name, "input_size": cfg.encoder.input_size,
        "tokens": encoder.num_tokens, "channels": encoder.channels, "depth": len(encoder.vit.blocks),
        "params_m": round(sum(p.numel() for p in encoder.parameters()) / 1e6, 2),
        "views": views, "encode_precision": cfg.encode.precision, "dtype": cfg.encode.dtype,
        "batch_size": cfg.encode.batch_size, "compile": bool(args.compile and cuda),
        "workers": cfg.runtime.workers, "jobs_per_worker": cfg.encode.jobs_per_worker,
        "rows_per_shard": cfg.encode.rows_per_shard, "rows_per_chunk": cfg.encode.rows_per_chunk,
        "resolution": cfg.data.resolution, "images": images,
        "mean_jpeg_bytes": round(mean_jpeg_bytes(generated)), "decode_path": paths[0],
        "encode_images_per_s": round(encode, 2), "rows_per_s": round(encode * views, 2),
        "forward_images_per_s": round(forward, 2),
        "forward_images_per_s_trials": [round(forward_first, 2), round(forward_second, 2)],
        "flops_per_image": flops["per_view"] * views, "mfu": None if args.simulate_device else mfu(forward),
        "peak_tflops": peak if cuda else None,
        "flops": {**flops, "views": views}, **compiled,
        "ratio": round(encode / forward, 3), "ratio_goal": 0.9,
        "jobs_images_per_s": round(metrics["rows_per_s"] / views, 2),
        "jobs_ratio": round(metrics["rows_per_s"] / views / forward, 3),
        "serial_images_per_s": round(images / serial_seconds, 2) if serial_seconds else None,
        "job_seconds": metrics["job_seconds"],
        "stage_by_decode": by_decode,
        "simulated_device": args.simulate_device,
        **decode, **precision, **side,
        "wall_s": round(time.perf_counter() - started, 1),
    }


# --- decode + crop per core -----------------------------------------------------------------------


def decode_comparison(args, jpegs: list[bytes] | None = None, resolution: int = 256) -> dict:
    """Decode + ADM crop of each path on photo-like JPEGs (`jpegs`, or --decode-images new ones), one torch thread,
    alternating rounds, best of --repeats."""
    import torch

    from pipeline.data.decode import adm_crop, decode_rgb, pil_crop, tensor_crop
    from pipeline.data.tiny_imagenet import photo_like_jpeg

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        jpegs = jpegs or [photo_like_jpeg(seed) for seed in range(args.decode_images)]
        large = [photo_like_jpeg(seed, 1024, 768) for seed in range(max(4, args.decode_images // 6))]
        paths = {"pil": pil_crop, "tensor": tensor_crop}
        rates, crops = per_core_rates(paths, jpegs, resolution, args.repeats)
        large_rates, _ = per_core_rates(paths, large, resolution, args.repeats)
        out = {"images": len(jpegs), "size": [500, 375], "quality": 90, "resolution": resolution,
               "mean_jpeg_bytes": round(sum(map(len, jpegs)) / len(jpegs)), "threads": 1, "repeats": args.repeats,
               "pil": {"images_per_s_per_core": round(rates["pil"], 1)},
               "tensor": {"images_per_s_per_core": round(rates["tensor"], 1),
                          "vs_pil": pixel_difference(crops["pil"], crops["tensor"])},
               "tensor_vs_pil": round(rates["tensor"] / rates["pil"], 3), "tensor_vs_pil_goal": 1.7,
               "large_1024x768": {"images": len(large), **{f"{k}_images_per_s_per_core": round(v, 1)
                                                           for k, v in large_rates.items()},
                                  "tensor_vs_pil": round(large_rates["tensor"] / large_rates["pil"], 3)}}
        if args.device.startswith("cuda"):
            out["nvjpeg"] = nvjpeg_rate(args, jpegs, resolution, crops["pil"])
        else:  # the GPU's crop arithmetic (PIL's, bit for bit) on torchvision's CPU decode
            exact = np.stack([adm_crop(decode_rgb(j), resolution, exact=True).numpy() for j in jpegs])
            out["nvjpeg"] = {"images_per_s": None, "note": "needs CUDA; crop_on_cpu_vs_pil: the nvjpeg path's crop "
                                                          "arithmetic on the CPU decode (nvjpeg's decode differs)",
                             "crop_on_cpu_vs_pil": pixel_difference(crops["pil"], exact)}
        return out
    finally:
        torch.set_num_threads(threads)


def per_core_rates(paths: dict, jpegs: list[bytes], resolution: int, repeats: int) -> tuple[dict, dict]:
    """Best images/s of each path over `repeats` alternating rounds (a round: every JPEG once per path), and
    each path's crops."""
    best = dict.fromkeys(paths, 0.0)
    crops = {name: np.stack([crop(j, resolution) for j in jpegs]) for name, crop in paths.items()}  # warm-up too
    for _ in range(repeats):
        for name, crop in paths.items():
            start = time.perf_counter()
            for j in jpegs:
                crop(j, resolution)
            best[name] = max(best[name], len(jpegs) / (time.perf_counter() - start))
    return best, crops


def nvjpeg_rate(args, jpegs: list[bytes], resolution: int, reference: np.ndarray) -> dict:
    """Batched nvjpeg decode + crop on the device: images/s (the device's, not per core), fallbacks, pixels."""
    import torch

    from pipeline.data.decode import adm_crop, decode_rgb, nvjpeg_crops

    device = torch.device(args.device)
    batch = min(args.batch, len(jpegs))
    work = (jpegs * (-(-4 * batch // len(jpegs))))[:4 * batch]  # 4 batches
    crops, fallbacks = nvjpeg_crops(jpegs, resolution, device)  # warm-up (nvjpeg handles, kernels)
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda _: None
    sync(device)
    best = 0.0
    for _ in range(args.repeats):
        start = time.perf_counter()
        for b0 in range(0, len(work), batch):
            nvjpeg_crops(work[b0:b0 + batch], resolution, device)
        sync(device)
        best = max(best, len(work) / (time.perf_counter() - start))
    one_by_one = torch.cat([nvjpeg_crops([j], resolution, device)[0] for j in jpegs])  # srcflow score's way
    # the device's crop arithmetic on libjpeg-turbo's pixels: PIL's crop bit for bit (max_level 0) if cuBLAS's
    # float64 matmuls and the gathers are exact there too
    same_pixels = np.stack([adm_crop(decode_rgb(j).to(device), resolution).cpu().numpy() for j in jpegs])
    return {"images_per_s": round(best, 1), "batch": batch, "cpu_fallbacks": len(fallbacks),
            "vs_pil": pixel_difference(reference, crops.cpu().numpy()),
            "one_by_one_vs_batch": pixel_difference(crops.cpu().numpy(), one_by_one.cpu().numpy()),
            "crop_on_device_vs_pil": pixel_difference(reference, same_pixels)}


def feature_difference(first: Path, other: Path, rows: int = 256) -> dict:
    """||f - f_first|| / ||f_first|| over the first rows of two stage outputs' features, and the max abs."""
    import zarr

    from pipeline.data.features import widen

    a, b = (widen(zarr.open_group(str(d / "features.zarr"), mode="r")["features"][:rows]).astype(np.float64)
            for d in (first, other))
    return {"rel_norm": round(float(np.linalg.norm(b - a) / np.linalg.norm(a)), 6),
            "max_abs": round(float(np.abs(b - a).max()), 5), "rows": len(a)}


def pixel_difference(reference: np.ndarray, other: np.ndarray) -> dict:
    d = np.abs(reference.astype(np.int16) - other.astype(np.int16))
    return {"max_level": int(d.max()), "mean_level": round(float(d.mean()), 5),
            "fraction_differing": round(float((d > 0).mean()), 5), "fraction_over_1": round(float((d > 1).mean()), 6)}


# --- the data set, the config and the stage -----------------------------------------------------


def bench_config(args, storage: Path, data_root: Path, decode: str | None = None):
    from pipeline.config import load_config

    decode = decode or next(d for d in args.decode if args.device.startswith("cuda") or d != "nvjpeg")
    return load_config(REPO / "configs" / "smoke.yaml", [
        f"encode.decode={decode}", f"encode.compile={str(bool(args.compile)).lower()}",
        f"storage.root={storage}", f"data.root={data_root}", "data.generate_tiny=null", "data.resolution=256",
        f"runtime.device={args.device.split(':')[0]}", "runtime.progress=false",
        "shard.samples_per_shard=256", "shard.workers=1", "encode.views=[plain, flip]", "encode.dtype=float16",
        f"encode.rows_per_shard={args.rows_per_shard}", f"encode.rows_per_chunk={args.rows_per_chunk}",
        f"encode.batch_size={args.batch}", f"encode.jobs_per_worker={args.jobs_per_worker}",
        f"encode.precision={args.precision}",
        f"runtime.workers={args.workers}", "encoder.weights=random", *ARCHS[args.arch]])


def photo_folder(root: Path, classes: int = 16, per_class: int = 4, val_per_class: int = 1) -> None:
    """An ImageFolder of distinct photo-like 500x375 JPEGs (pipeline.data.tiny_imagenet.photo_like_jpeg)."""
    from pipeline.data.tiny_imagenet import SYNSETS, photo_like_jpeg

    seed = 0
    for split, count in (("train", per_class), ("val", val_per_class)):
        for synset in SYNSETS[:classes]:
            (root / split / synset).mkdir(parents=True)
            for i in range(count):
                (root / split / synset / f"{synset}_{i}.JPEG").write_bytes(photo_like_jpeg(seed))
                seed += 1


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
    from stages.runner import run_pipeline

    return run_pipeline(cfg, until="shard")["shard"]


def timed_encode(cfg, shard, out_dir: Path, build_encoder) -> tuple[float, dict]:
    """Seconds of the real encode stage function, from the shard set to a validated feature store, and
    the stage's metrics."""
    import torch

    from pipeline.artifacts import StageOutput
    from stages import encode

    out_dir.mkdir(parents=True)
    start = time.perf_counter()
    metrics = encode.run(cfg, {"shard": shard}, StageOutput("encode", "benchmark", out_dir),
                         build_encoder=build_encoder)
    if cfg.runtime.device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, metrics


def encoder_factory(args, cfg):
    """What the stage builds its encoder with: the RAE encoder, or with --simulate-device its stand-in."""
    from stages.encode import rae_encoder

    return SimulatedDevice(args.simulate_device, len(cfg.encode.views)) if args.simulate_device else rae_encoder


def bench_encoder(args, cfg, build_encoder):
    """The stage's encoder, built once per process and reused by the stage (the same spec and factory)."""
    from stages.encode import encoder_spec, load_encoder

    return load_encoder(encoder_spec(cfg, build_encoder), cfg.runtime.device)


@dataclass(frozen=True)
class SimulatedDevice:
    """An encoder factory for the stage: the RAE encoder whose forward is the wait of a device of `images_per_s`
    (both views). Frozen and module-level: it pickles, and equal factories share one encoder per process."""

    images_per_s: float
    views: int

    def __call__(self, spec, device: str):
        from stages.encode import rae_encoder

        return SimulatedEncoder(rae_encoder(spec, device), self.images_per_s * self.views)


class SimulatedEncoder:
    """The encoder's shape (vit, tokens, channels, parameters) and a forward that waits batch / rate seconds and
    returns zeros: one batch at a time, as one device runs the jobs' kernels, and without the GIL, as kernels
    run beside Python."""

    def __init__(self, encoder, rows_per_s: float):
        import threading

        self.vit, self.parameters = encoder.vit, encoder.parameters
        self.num_tokens, self.channels, self.grid_size = encoder.num_tokens, encoder.channels, encoder.grid_size
        self.rows_per_s, self.device = rows_per_s, threading.Lock()

    def __call__(self, x):
        import torch

        with self.device:
            time.sleep(len(x) / self.rows_per_s)
        return torch.zeros(len(x), self.num_tokens, self.channels, device=x.device)


def encoder_input(cfg, seed: int = 0):
    """One batch of random 8-bit images as the encoder's input, on the benchmark's device."""
    import torch

    from pipeline.models.rae import to_encoder_input

    r, generator = cfg.data.resolution, torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (cfg.encode.batch_size, r, r, 3), dtype=torch.uint8, generator=generator)
    return to_encoder_input(pixels.to(cfg.runtime.device), cfg.encoder.input_size)


def forward_rate(cfg, encoder, images: int, precision: str) -> float:
    """Images/s of the encoder alone (both views, as encode runs it) on a pre-made input batch: about `images`
    images in full batches (one shape: a compiled encoder is never recompiled)."""
    import torch

    from pipeline.device import inference_precision

    device = torch.device(cfg.runtime.device)
    batch = cfg.encode.batch_size
    batches = max(1, round(images / batch))
    x = encoder_input(cfg)
    with torch.inference_mode(), inference_precision(device, precision):
        encoder(x), encoder(x.flip(-1))  # warm-up at the full batch shape (kernels, allocator)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(batches):
            for view in (x, x.flip(-1)):
                encoder(view)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return batches * batch / (time.perf_counter() - start)


def precision_comparison(cfg, encoder, images: int) -> dict:
    """encode.precision fp32 vs bf16: the forward's images/s at each, and bf16's error on one batch of features."""
    import torch

    from pipeline.device import inference_precision

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


WRITE_CANDIDATES = ("zarr", "direct", "one_chunk_per_shard", "raw")


def write_comparison(args, folder: Path, tokens: int = 256, channels: int = 768) -> dict:
    """MB/s of each write candidate (WRITE_CANDIDATES, see the module doc) against one raw file per shard,
    --repeats rounds in rotating order, median; then, per --writers P, P processes writing their own shards at once.
    Rows have the paper's shape (DINOv2-B/reg4 at 224: 256 x 768 float16) whatever --arch is: the
    smoke encoder's 8 KB rows would measure per-chunk overhead, not the store that matters."""
    row_bytes = tokens * channels * 2
    shard_rows = args.rows_per_shard
    shards = max(1, round(args.write_mb * 2**20 / (row_bytes * shard_rows)))
    megabytes = shards * shard_rows * row_bytes / 1e6
    times = {name: [] for name in WRITE_CANDIDATES}
    for trial in range(args.repeats):  # each round in another order: the page cache's writeback favours no one
        k = trial % len(WRITE_CANDIDATES)
        for name in WRITE_CANDIDATES[k:] + WRITE_CANDIDATES[:k]:
            times[name].append(write_trial(name, folder / f"{name}-{trial}", shard_rows, args.rows_per_chunk,
                                           tokens, channels, range(shards), shards)[1])
    rate = {name: megabytes / statistics.median(t) for name, t in times.items()}
    by_writers = {}
    for writers in args.writers:
        if writers > 1:
            by_writers[str(writers)] = parallel_writes(args, folder / f"writers-{writers}", writers, shards,
                                                       tokens, channels)
    return {"megabytes": round(megabytes, 1), "shards": shards, "row_shape": [tokens, channels],
            "rows_per_shard": shard_rows, "rows_per_chunk": args.rows_per_chunk, "trials": args.repeats,
            **{f"{name}_mb_per_s": round(rate[name], 1) for name in WRITE_CANDIDATES},
            # the default writer (direct) against raw; zarr: the same layout through Zarr's sharding codec
            "ratio": round(rate["direct"] / rate["raw"], 3), "goal": 0.8,
            "zarr_ratio": round(rate["zarr"] / rate["raw"], 3),
            "one_chunk_per_shard_ratio": round(rate["one_chunk_per_shard"] / rate["raw"], 3),
            "by_writers": by_writers,
            "note": "median of rounds in rotating order; page cache, no fsync, one file per shard on every side; "
                    "direct writes the zarr layout's files byte for byte"}


def write_trial(name: str, folder: Path, shard_rows: int, rows_per_chunk: int, tokens: int, channels: int,
                shard_ids, total_shards: int, barrier=None) -> tuple[float, float]:
    """Write `shard_ids` of a store of `total_shards` shards with candidate `name`: (start time, seconds)."""
    from pipeline.data.zarr_store import create_row_store, write_rows
    from storage_schemas.zarr_layouts import FEATURES

    block = np.random.default_rng(0).standard_normal((shard_rows, tokens, channels)).astype(np.float16)
    store = folder / "features.zarr"
    if name != "raw" and not store.exists():
        chunk = shard_rows if name == "one_chunk_per_shard" else rows_per_chunk
        create_row_store(store, FEATURES, total_shards * shard_rows, rows_per_shard=shard_rows,
                         rows_per_chunk=chunk, row_shapes={"features": ((tokens, channels), "float16")}, attrs={})
    folder.mkdir(parents=True, exist_ok=True)
    if barrier is not None:
        if name != "raw":  # a fresh process: Zarr's first open (codec registry, event loop) before the clock
            import zarr

            zarr.open_group(str(store), mode="r")["features"].metadata.to_dict()
        barrier.wait()
    start = time.perf_counter()
    for k in shard_ids:
        if name == "raw":
            with open(folder / f"{k:06d}", "wb") as f:
                f.write(block.data)
        else:
            write_rows(store, k * shard_rows, {"features": block}, direct=name == "direct")
    seconds = time.perf_counter() - start
    if barrier is None:
        subprocess.run(["rm", "-rf", str(folder)], check=True)  # keep the disk footprint to one store
    return time.time() - seconds, seconds


def parallel_writes(args, folder: Path, writers: int, shards: int, tokens: int, channels: int) -> dict:
    """`writers` fresh processes (spawned: no inherited Zarr event loop) each write `shards` shards of one store
    at once, as encode workers sharing a GPU do: aggregate MB/s per candidate, from the first start to the last
    end; --repeats rounds, each in another candidate order (the page cache's writeback favours no one), median."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    names = ("zarr", "direct", "raw")
    rates = {name: [] for name in names}
    megabytes = writers * shards * args.rows_per_shard * tokens * channels * 2 / 1e6
    with context.Pool(writers) as pool, context.Manager() as manager:
        for trial in range(args.repeats):
            for name in names[trial % 3:] + names[:trial % 3]:
                target = folder / f"{name}-{trial}"
                if name != "raw":  # created once, before the writers start
                    write_trial(name, target, args.rows_per_shard, args.rows_per_chunk, tokens, channels, (),
                                writers * shards, barrier=_NoBarrier())
                barrier = manager.Barrier(writers)
                jobs = [pool.apply_async(write_trial, (name, target, args.rows_per_shard, args.rows_per_chunk,
                                                       tokens, channels, range(w * shards, (w + 1) * shards),
                                                       writers * shards, barrier)) for w in range(writers)]
                spans = [job.get() for job in jobs]
                rates[name].append(megabytes / (max(s + d for s, d in spans) - min(s for s, _ in spans)))
                subprocess.run(["rm", "-rf", str(target)], check=True)
    out = {f"{name}_mb_per_s": round(statistics.median(r), 1) for name, r in rates.items()}
    out["direct_ratio"] = round(out["direct_mb_per_s"] / out["raw_mb_per_s"], 3)
    out["zarr_ratio"] = round(out["zarr_mb_per_s"] / out["raw_mb_per_s"], 3)
    out["megabytes"] = round(megabytes, 1)
    return out


def zstd_ratio(store: Path, rows: int = 64) -> dict:
    """How much zstd (level 3, as the small arrays) would shrink the timed stage's stored features, row by row
    (the timed set repeats its images: compressing rows together would find the copies, which real data has
    not): the case for storing them uncompressed. Random encoder weights: real DINOv2 features are no more
    regular."""
    import zarr
    from numcodecs import Zstd

    values = zarr.open_group(str(store), mode="r")["features"][:rows]
    packed = sum(len(Zstd(level=3).encode(np.ascontiguousarray(row))) for row in values)
    return {"features_zstd_ratio": round(values.nbytes / packed, 3), "features_zstd_rows": len(values)}


class _NoBarrier:
    def wait(self) -> None:
        pass


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
           "--jobs-per-worker", str(args.jobs_per_worker), "--workers", str(args.workers),
           "--precision", args.precision,
           "--decode", ",".join(args.decode), *(["--compile"] if args.compile else []),
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
    build_encoder = encoder_factory(args, cfg)
    bench_encoder(args, cfg, build_encoder)
    timed_encode(cfg, shard, work / "encode", build_encoder)
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
