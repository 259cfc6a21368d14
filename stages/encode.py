"""Stage `encode`: shard set -> `features.zarr`, frozen RAE encoder tokens (SRC-FLOW.md "RAE"), at
`encode.precision` (fp32 with TF32 matmuls, as RAE encodes, or bf16 autocast).

Rows are (image, view) pairs in manifest order, train then val. The rows are cut into whole
Zarr shards; each shard is one job (read its images from the tars, ADM center crop, encode,
write, commit), so any number of workers, or a killed and resumed run, gives the same store.
Each commit also holds the shard's float64 sums over its train rows; they are reduced in shard
order at the end into the exact per-position mean and variance (order-independent).
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.artifacts import Commits, StageOutput
from pipeline.cache import per_process
from pipeline.config import Config
from pipeline.data.decode import decode_crop_with, nvjpeg_crops
from pipeline.data.shards import iter_jpegs, manifest_rows
from pipeline.data.zarr_store import (
    ShardRange,
    consolidate,
    fill_row_store,
    shard_ranges,
    write_rows,
    write_small_array,
)
from pipeline.device import inference_precision, resolve_device
from pipeline.integrity import read_input, read_with_sha256
from pipeline.parallel import jobs_device, launcher_device, ran_on_metric
from stages.inputs import encoder_weights_digest
from storage_schemas.success import Manifest
from storage_schemas.zarr_layouts import FEATURES, SPLIT_IDS

VIEWS = {"plain": 0, "flip": 1}


def rae_encoder(spec: EncoderSpec, device: str):
    """The stage's encoder: the frozen RAE encoder of `spec` on `device` (benchmarks/encode.py passes a stand-in),
    its weights read once and checked against the sha256 the fingerprint holds."""
    from pipeline.models.rae import build_rae_encoder
    from pipeline.models.rae_family import weights_file

    data = None
    if spec.weights != "random":  # a folder's: its safetensors
        path = weights_file(spec.weights, "encoder.weights")
        data = (read_with_sha256(path, spec.weights_sha256, "encoder.weights") if spec.weights_sha256
                else read_input(path, "encoder.weights"))
    return build_rae_encoder(spec.weights, model_name=spec.name, input_size=spec.input_size, arch=dict(spec.arch),
                             seed=spec.seed, data=data).to(device)


@dataclass(frozen=True)
class EncoderSpec:
    """Everything a worker process needs to build the same frozen encoder: `build(spec, device)` builds it (a
    module-level function or a frozen dataclass, so that it pickles and two equal specs share one encoder)."""

    name: str
    weights: str
    input_size: int
    arch: tuple[tuple[str, int], ...]
    seed: int
    build: Callable[[EncoderSpec, str], Any] = rae_encoder
    weights_sha256: str | None = None  # the digest the fingerprint holds (encoder_weights_digest)


@dataclass(frozen=True)
class ShardImages:
    """The images of one shard's rows, image-major (image i's views are rows i * V .. i * V + V - 1)."""

    shard: ShardRange
    images: tuple[tuple[str, int, str, str, str], ...]  # (key, label, split, sha256, tar path) of these rows' images
    first_image: int  # the index of images[0] among all the images
    views: tuple[int, ...]


@dataclass(frozen=True)
class EncoderRun:
    """How a worker runs the frozen encoder over images (the encode section, and the device it resolves where it
    runs)."""

    spec: EncoderSpec
    resolution: int
    precision: str  # encode.precision: the forward's arithmetic
    dtype: str  # encode.dtype: the stored features'
    batch_size: int
    decode_threads: int
    device: str  # runtime.device: each job resolves it where it runs
    decode: str = "pil"  # encode.decode: pil | tensor | nvjpeg
    compile: bool = False  # encode.compile, on CUDA: the compiled encoder, every batch padded to batch_size


@dataclass(frozen=True)
class EncodeJob:
    rows: ShardImages
    encoder: EncoderRun
    store: str
    commits: str


def run(cfg: Config, upstream: dict[str, Manifest], out: StageOutput,
        build_encoder: Callable[[EncoderSpec, str], Any] = rae_encoder) -> dict:
    shard_dir = upstream["shard"].dir
    images = manifest_rows(shard_dir, ("train", "val"), cfg.encode.subset_per_class)
    views = tuple(VIEWS[v] for v in cfg.encode.views)
    n_rows = len(images) * len(views)
    spec = encoder_spec(cfg, build_encoder)
    device = launcher_device(cfg.runtime)  # the jobs' device when they run here; on Dask each job resolves its own
    check_decode_device(cfg.encode.decode, jobs_device(cfg.runtime))
    encoder = load_encoder(spec, device)  # a bad weights file fails here, before any work
    if cfg.encode.compile and torch.device(device).type == "cuda":  # the jobs run here: compiled before any of them
        compiled_encoder(spec, device, cfg.encode.precision, cfg.encode.batch_size)
    store, commits = out.path / "features.zarr", Commits(out.path / "commits")
    n_train = sum(r["split"] == "train" for r in images) * len(views)
    encoding = encoder_run(cfg, spec, cfg.runtime.device)
    ran_on = Counter()
    started = time.perf_counter()
    results = fill_row_store(
        store, commits, FEATURES, n_rows, rows_per_shard=cfg.encode.rows_per_shard,
        rows_per_chunk=cfg.encode.rows_per_chunk,
        row_shapes={"features": ((encoder.num_tokens, encoder.channels), storage_dtype(cfg.encode.dtype))},
        attrs={"encoder": spec.name, "weights_sha256": encoder_weights_digest(cfg),
               "resolution": cfg.data.resolution, "input_size": spec.input_size,
               "crop": "adm_center_crop_arr, bicubic resize to input_size (no antialias)",
               "decode": cfg.encode.decode,
               "normalization": "final LayerNorm without affine; per-position stats_mean/stats_var "
                                "stored beside, NOT applied",
               "precision": cfg.encode.precision, "logical_dtype": cfg.encode.dtype, "views": list(cfg.encode.views),
               "splits": {"train": [0, n_train], "val": [n_train, n_rows]},
               "grid_size": encoder.grid_size, "source_fingerprint": upstream["shard"].fingerprint,
               "stats_count": 0},
        job=lambda r: EncodeJob(shard_images(r, images, views, shard_dir), encoding, str(store), str(commits.dir)),
        write_shard=encode_shard, runtime=cfg.runtime, threads=cfg.encode.jobs_per_worker, desc="encode",
        report_progress=out.report_progress, ran_on=ran_on)
    wall = time.perf_counter() - started
    job_seconds = Counter()
    for result in results:
        job_seconds.update(result)  # adds up each job's rows, phase seconds (and CPU-decoded images)

    count, mean, var = reduce_statistics(commits, shard_ranges(n_rows, cfg.encode.rows_per_shard))
    grid = encoder.grid_size
    to_chw = lambda a: a.T.reshape(encoder.channels, grid, grid)  # noqa: E731  (T, C) -> (C, H, W)
    for name, values in (("stats_mean", to_chw(mean)), ("stats_var", to_chw(var))):
        write_small_array(store, name, values, FEATURES.arrays[name].dims, FEATURES.arrays[name].attributes)
    import zarr

    zarr.open_group(str(store), mode="r+").attrs["stats_count"] = int(count)
    consolidate(store)
    FEATURES.validate(store)
    return {"rows": n_rows, "images": len(images), "train_rows": n_train, "tokens": encoder.num_tokens,
            "channels": encoder.channels, "stats_count": int(count), "feature_mean": float(mean.mean()),
            "feature_var": float(var.mean()),
            "rows_per_s": round(job_seconds.pop("rows", 0) / max(wall, 1e-9), 2),
            # decode: nvjpeg, the images nvjpeg was not given or refused, decoded on the CPU instead
            **({"decode_fallbacks": int(job_seconds.pop("decode_fallbacks", 0))}
               if cfg.encode.decode == "nvjpeg" else {}),
            # where this run's jobs spent their time, summed over jobs (they overlap, so the sum exceeds the
            # wall time): read (tars), decode_wait (crops not ready), forward (incl. copies), write, commit
            "job_seconds": {k: round(v, 3) for k, v in job_seconds.items()},
            "jobs_ran_on": ran_on_metric(ran_on)}


def encoder_spec(cfg: Config, build: Callable[[EncoderSpec, str], Any] = rae_encoder) -> EncoderSpec:
    arch = tuple(sorted((k, v) for k, v in cfg.encoder.arch.model_dump().items() if v is not None))
    digest = None if cfg.encoder.weights == "random" else encoder_weights_digest(cfg)
    return EncoderSpec(cfg.encoder.name, cfg.encoder.weights, cfg.encoder.input_size, arch, cfg.encoder.seed, build,
                       digest)


def check_decode_device(decode: str, device: str) -> None:
    """nvjpeg needs CUDA: refused for a device that is the CPU (resolved, or configured as `cpu`)."""
    if decode == "nvjpeg" and str(device) == "cpu":
        raise ValueError(f"encode.decode: nvjpeg decodes on a CUDA device, and this run's device is {device}; "
                         f"use tensor or pil (or runtime.device=cuda)")


def storage_dtype(dtype: str) -> str:
    # Zarr v3 has no bfloat16: bf16 is stored bit-exactly as uint16 (STACK.md), attrs.logical_dtype says so.
    return "uint16" if dtype == "bfloat16" else "float16"


def shard_images(r: ShardRange, images: list[dict], views: tuple[int, ...], shard_dir: Path) -> ShardImages:
    """The images of shard `r`'s rows (manifest rows `images`, their tars under shard_dir/shards)."""
    first, last = r.start // len(views), (r.stop - 1) // len(views)
    mine = tuple((im["key"], im["label"], im["split"], im["sha256"], str(shard_dir / "shards" / im["shard"]))
                 for im in images[first:last + 1])
    return ShardImages(r, mine, first, views)


def encoder_run(cfg: Config, spec: EncoderSpec, device: str) -> EncoderRun:
    decode_threads = cfg.encode.decode_threads or max(2, (os.cpu_count() or 2) // max(1, cfg.runtime.workers))
    return EncoderRun(spec, cfg.data.resolution, cfg.encode.precision, cfg.encode.dtype, cfg.encode.batch_size,
                      decode_threads, device, decode=cfg.encode.decode, compile=cfg.encode.compile)


# --- one job, run in a worker thread -----------------------------------------------------------
# A worker runs `encode.jobs_per_worker` jobs at once in threads: while one job waits on its tar read,
# its JPEG decodes or its Zarr write, another job's forward passes keep the device busy. Each job has
# its own CUDA stream, so its copies overlap the other jobs' kernels.

def load_encoder(spec: EncoderSpec, device: str):
    """The process's encoder of `spec` on `device`, built once and shared by every job the process runs."""
    device = str(resolve_device(device))  # "cuda" and "cuda:0" are one encoder

    def build():
        encoder = spec.build(spec, device)
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)  # jobs read the weights from their own streams
        return encoder

    return per_process("encoder", (spec, device), build, weights_files(spec))


def weights_files(spec: EncoderSpec) -> list[str]:
    return [] if spec.weights == "random" else [spec.weights]


def compiled_encoder(spec: EncoderSpec, device: str, precision: str, batch_size: int):
    """torch.compile of the process's encoder for one batch shape (batch_size, 3, S, S) at `precision`, compiled
    and run once here, so no job waits on the compiler and the jobs' threads only call it."""
    from pipeline.models.rae import to_encoder_input

    encoder = load_encoder(spec, device)

    def build():
        compiled = torch.compile(encoder, dynamic=False)
        pixels = torch.zeros((batch_size, 8, 8, 3), dtype=torch.uint8, device=device)
        with torch.inference_mode(), inference_precision(pixels.device, precision):
            compiled(to_encoder_input(pixels, spec.input_size, mean=encoder.pixel_mean, std=encoder.pixel_std))
        if pixels.device.type == "cuda":
            torch.cuda.synchronize(pixels.device)
        return compiled

    return per_process("compiled encoder", (spec, str(resolve_device(device)), precision, batch_size), build,
                       weights_files(spec))


def decode_pool(threads: int) -> ThreadPoolExecutor:
    """The process's JPEG decode threads (decodes and crops run without the GIL)."""
    return per_process("decode pool", threads, lambda: ThreadPoolExecutor(max_workers=threads,
                                                                          thread_name_prefix="decode"))


def encode_shard(job: EncodeJob) -> dict[str, float]:
    """Encode, write and commit one shard. Returns its rows, the seconds of each phase of this job and (nvjpeg)
    how many of its images were decoded on the CPU."""
    seconds: dict[str, float] = {}
    arrays, (count, total, total_sq) = encode_rows(job.rows, job.encoder, seconds)
    with timed(seconds, "write"):
        files = write_rows(Path(job.store), job.rows.shard.start, arrays)
    with timed(seconds, "commit"):
        Commits(Path(job.commits)).write(job.rows.shard.index, files, count=np.array(count), sum=total,
                                         sumsq=total_sq)
    fallbacks = seconds.pop("decode_fallbacks", 0)  # nvjpeg: images it was not given or refused
    return {"rows": len(arrays["labels"]),
            **({"decode_fallbacks": fallbacks} if job.encoder.decode == "nvjpeg" else {}),
            **seconds}


@contextmanager
def timed(seconds: dict[str, float], phase: str):
    start = time.perf_counter()
    try:
        yield
    finally:
        seconds[phase] = seconds.get(phase, 0.0) + time.perf_counter() - start


def encode_rows(rows: ShardImages, encoder: EncoderRun, seconds: dict[str, float] | None = None,
                ) -> tuple[dict[str, np.ndarray], tuple[int, np.ndarray, np.ndarray]]:
    """The shard's rows, computed and not written: features in the storage dtype, labels, split, keys, view;
    and the float64 (count, sum, sum of squares) of its train rows. Also the image path of
    `compress.from: images`, so both paths see the same stored-precision features."""
    seconds = {} if seconds is None else seconds
    device = resolve_device(encoder.device)  # where this job runs
    check_decode_device(encoder.decode, str(device))  # compress.from: images comes here too
    cuda = device.type == "cuda"
    compiled = encoder.compile and cuda
    model = load_encoder(encoder.spec, str(device))
    forward = (compiled_encoder(encoder.spec, str(device), encoder.precision, encoder.batch_size) if compiled
               else model)
    n_views = len(rows.views)
    with timed(seconds, "read"):
        wanted = {k: sha256 for k, _, _, sha256, _ in rows.images}
        jpegs = dict(iter_jpegs(sorted({tar for *_, tar in rows.images}), wanted))
    if encoder.decode != "nvjpeg":  # crops made ahead by the worker's decode threads, in the job's order
        crop = decode_crop_with(encoder.decode)
        crops = decode_pool(encoder.decode_threads).map(lambda item: crop(jpegs[item[0]], encoder.resolution),
                                                        rows.images)
    # rows of this shard, as offsets into the images this job holds
    lo = rows.shard.start - rows.first_image * n_views
    hi = lo + rows.shard.stop - rows.shard.start
    labels = np.repeat([lab for _, lab, *_ in rows.images], n_views).astype(np.int32)[lo:hi]
    splits = np.repeat([SPLIT_IDS[s] for _, _, s, *_ in rows.images], n_views).astype(np.uint8)[lo:hi]
    with torch.cuda.stream(torch.cuda.Stream(device)) if cuda else nullcontext():
        features = torch.empty((len(rows.images) * n_views, model.num_tokens, model.channels),
                               dtype=torch.bfloat16 if encoder.dtype == "bfloat16" else torch.float16, device=device)
        for b0 in range(0, len(rows.images), encoder.batch_size):
            n = min(encoder.batch_size, len(rows.images) - b0)
            with timed(seconds, "decode_wait"):
                if encoder.decode == "nvjpeg":  # decoded and cropped on the device, on this job's stream
                    pixels, on_cpu = nvjpeg_crops([jpegs[k] for k, *_ in rows.images[b0:b0 + n]], encoder.resolution,
                                                  device)
                    seconds["decode_fallbacks"] = seconds.get("decode_fallbacks", 0) + len(on_cpu)
                else:
                    batch = torch.from_numpy(np.stack([next(crops) for _ in range(n)]))
            with timed(seconds, "forward"):
                if encoder.decode != "nvjpeg":
                    pixels = batch.pin_memory().to(device, non_blocking=True) if cuda else batch
                for v_index, view in enumerate(rows.views):
                    at = slice(b0 * n_views + v_index, (b0 + n) * n_views, n_views)
                    features[at] = encode_pixels(forward, pixels, encoder.spec.input_size, encoder.precision,
                                                   encoder.dtype, flip=view == 1,
                                                   pad_to=encoder.batch_size if compiled else None)
        with timed(seconds, "forward"):  # the job's device work ends with these copies to the host
            mine = features[lo:hi]
            sums = train_sums(mine[torch.from_numpy(splits == SPLIT_IDS["train"]).to(device)])
            stored = stored_array(mine)
    return {
        "features": stored, "labels": labels, "split": splits,
        "key": np.repeat([k for k, *_ in rows.images], n_views)[lo:hi],
        "view": np.tile(np.array(rows.views, dtype=np.uint8), len(rows.images))[lo:hi],
    }, sums


def encode_pixels(encoder, pixels: torch.Tensor, input_size: int, precision: str, dtype: str,
                  flip: bool = False, pad_to: int | None = None) -> torch.Tensor:
    """uint8 ADM crops (B, H, W, 3) on the encoder's device -> features (B, T, C) in the stored dtype (float16 or
    bfloat16), at `encode.precision`: the one forward of `encode` (and of `compress.from: images`, `srcflow score`).
    `flip`: the flip view (the crop mirrored left-right). `pad_to`: a smaller batch is padded with black images to
    this size and their rows dropped, so a compiled encoder meets one shape."""
    from pipeline.models.rae import to_encoder_input

    n = len(pixels)
    if pad_to is not None and n < pad_to:
        pixels = torch.cat([pixels, pixels.new_zeros((pad_to - n, *pixels.shape[1:]))])
    x = to_encoder_input(pixels, input_size, mean=encoder.pixel_mean, std=encoder.pixel_std)
    with torch.inference_mode(), inference_precision(pixels.device, precision):
        out = encoder(x.flip(-1) if flip else x)[:n]
        return out.to(torch.bfloat16 if dtype == "bfloat16" else torch.float16)


def stored_array(features: torch.Tensor) -> np.ndarray:
    """Stored-dtype features -> the host array the Zarr store holds (bf16 as its uint16 bits; read back by
    pipeline.data.features.widen). bf16 leaves the device as bf16: CUDA has few kernels for uint16."""
    host = features.cpu()
    return (host.view(torch.uint16) if host.dtype == torch.bfloat16 else host).numpy()


def train_sums(rows: torch.Tensor) -> tuple[int, np.ndarray, np.ndarray]:
    """float64 sum and sum of squares over stored-precision rows, on their device (a whole shard at once,
    so the result does not depend on the batch size; on GPU this keeps 3 GB of float64 off the CPU)."""
    t = rows.double()
    return len(rows), t.sum(0).cpu().numpy(), t.square().sum(0).cpu().numpy()


def reduce_statistics(commits: Commits, ranges: list[ShardRange], stage: str = "encode",
                      ) -> tuple[int, np.ndarray, np.ndarray]:
    """Exact mean/variance (population) from the per-shard float64 `count`/`sum`/`sumsq` in the commits,
    reduced in shard order (any worker count gives the same bits); any shape of sums (encode: per position,
    compress: per code channel)."""
    count, total, total_sq = 0, None, None
    for r in ranges:
        part = commits.read(r.index)
        count += int(part["count"])
        total = part["sum"] if total is None else total + part["sum"]
        total_sq = part["sumsq"] if total_sq is None else total_sq + part["sumsq"]
    if count == 0:
        raise ValueError(f"{stage}: no train rows to compute the normalization statistics from")
    mean = total / count
    return count, mean, np.maximum(total_sq / count - mean * mean, 0.0)
