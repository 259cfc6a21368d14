"""Stage `sample`: class-balanced samples of the trained flow, decoded to pixels (SRC-FLOW.md, "The chain").

    labels   every class sample.per_class times, in the order of a permutation seeded by sample.seed
             alone (class_labels): sample i's class is a pure function of (seed, num_classes, per_class, i),
             so chunks, workers and resumes agree, and the file is not class-sorted (ADM's IS splits)
    z_i      a standard normal (T, d) seeded by (sample.seed, i): the same whatever the chunking,
             the workers or a resume; the same z_i at every CFG scale
    codes    flow.reverse(z, y) with CFG w (sample.cfg_mode tarflow|starflow, sample.cfg_anneal), both CFG
             branches as one doubled batch, each block inverted by sample.solver: sequential (token by
             token, a KV cache) or jacobi (chunks of sample.jacobi_chunk tokens iterated to
             sample.jacobi_tol, at most sample.jacobi_max_iters passes); sample.cuda_graph: static caches,
             each step a replayed CUDA graph; optionally one Tweedie step x + sigma^2 grad log p(x | y)
             (sample.denoise: tweedie, sigma = flow.noise_sigma, conditional score, fp32)
    pixels   SRC.decode(codes) (codes as compress stored them: the SRC's own encode output) ->
             per-position feature de-normalization (normalizer.inverse, the statistics the SRC was
             fit under) -> frozen RAE decoder -> uint8 (to_uint8_pixels)

Work is cut into chunks of sample.chunk_size samples per CFG scale; each chunk is a job
(pipeline.parallel.map_jobs, Dask when runtime.workers > 1) that writes `chunks/cfg{w}/{k:06d}.npz`
atomically, its commit: a killed run redoes only the missing chunks. Then, per scale, the chunks are
streamed into the ADM-format `samples-cfg{w}.npz` (storage_schemas/samples.py: `arr_0` uint8 N x H x W x 3,
`arr_1` int64 labels with the alias `labels`, and `nonfinite` bool: samples whose code or pixels were
NaN / inf, written as black images and counted in the metrics, never resampled) and `grid-cfg{w}.png`
(the first grid_per_class samples of each of the first grid_classes classes, one class per row).
"""

from __future__ import annotations

import io
import logging
import shutil
import time
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.artifacts import StageOutput
from pipeline.cache import per_process
from pipeline.config import Config
from pipeline.device import autocast, resolve_device
from pipeline.images import save_grid
from pipeline.parallel import gpu_worker_env, map_jobs
from pipeline.training import step_seed
from stages.train_flow import flow_info, load_flow
from storage_schemas.samples import SCHEMA_VERSION as SAMPLES_SCHEMA_VERSION
from storage_schemas.success import FILENAME as SUCCESS
from storage_schemas.success import Manifest, write_atomic

LABEL_STREAM = 1  # step_seed(sample.seed, LABEL_STREAM): the label order's own stream, apart from the noise
CHUNKS = "chunks"

log = logging.getLogger("srcflow")


@dataclass(frozen=True)
class ModelSources:
    """Where a worker process loads the models it samples and decodes with, and onto which device (picklable)."""

    cfg: Config  # decoder architecture and encode.stats
    upstream: dict[str, Manifest]  # train_flow, fit_src, encode, fit_decoder (when enabled)
    device: str


@dataclass(frozen=True)
class SampleJob:
    sources: ModelSources
    cfg_scale: float
    chunk: int
    start: int
    stop: int
    path: str  # the chunk file this job commits


def run(cfg: Config, upstream: dict[str, Manifest], out: StageOutput) -> dict:
    s = cfg.sample
    num_classes = sampled_classes(s, flow_info(upstream["train_flow"])["arch"]["num_classes"])
    total = num_classes * s.per_class
    scales = list(dict.fromkeys(float(w) for w in s.cfg_scale))
    sources = ModelSources(cfg, dict(upstream), str(resolve_device(cfg.runtime.device)))
    if s.cuda_graph and not sources.device.startswith("cuda"):
        raise ValueError(f"sample.cuda_graph: CUDA graphs need a CUDA device; runtime.device resolves to "
                         f"{sources.device}")
    load_models(sources)  # a missing or mismatched model fails here, before any work
    chunks = [(k, a, min(a + s.chunk_size, total)) for k, a in enumerate(range(0, total, s.chunk_size))]
    todo = [w for w in scales if not samples_path(out.path, w).is_file()]
    jobs = [SampleJob(sources, w, k, a, b, str(chunk_path(out.path, w, k))) for w in todo for k, a, b in chunks
            if not chunk_path(out.path, w, k).is_file()]
    log.info("sample: %d classes x %d per class at cfg scales %s (%s, anneal %s, denoise %s, solver %s): %d of %d "
             "chunks to do", num_classes, s.per_class, scales, s.cfg_mode, s.cfg_anneal, s.denoise, s.solver,
             len(jobs), len(todo) * len(chunks))

    started, done = time.perf_counter(), len(scales) * total - sum(j.stop - j.start for j in jobs)
    worker_env = gpu_worker_env(sources.device, cfg.runtime.workers, cfg.runtime.dask_address)
    for n in map_jobs(sample_chunk, jobs, workers=cfg.runtime.workers, dask_address=cfg.runtime.dask_address,
                      worker_env=worker_env, desc="sample", unit="samples", weights=lambda j: j.stop - j.start):
        done += n
        out.report_progress(done, len(scales) * total, "samples")
    seconds = time.perf_counter() - started

    metrics = {"num_samples": total, "num_classes": num_classes, "per_class": s.per_class, "cfg_scales": scales,
               "cfg_mode": s.cfg_mode, "denoise": s.denoise, "solver": s.solver}
    src_sigma = upstream["fit_src"].metrics.get("noise_sigma") or 0.0
    if s.denoise == "tweedie" and src_sigma > 0:
        # the SRC decoder already learned to decode codes at this noise level: denoising first removes it twice
        metrics["denoise_warning"] = (f"sample.denoise=tweedie on an SRC decoder trained under src.noise_sigma="
                                      f"{src_sigma}: the noise is removed twice")
        log.warning("sample: %s", metrics["denoise_warning"])
    for w in scales:
        if w in todo:
            assemble(out.path, w, [chunk_path(out.path, w, k) for k, _, _ in chunks], num_classes, s)
        with np.load(samples_path(out.path, w)) as npz:
            nonfinite = int(npz["nonfinite"].sum())
        metrics[f"nonfinite_cfg{w}"] = nonfinite
        if nonfinite:
            log.warning("sample: %d of %d samples at cfg %s are NaN / inf (black images, flagged in `nonfinite`)",
                        nonfinite, total, w)
    shutil.rmtree(out.path / CHUNKS, ignore_errors=True)  # every scale is in its samples file now
    if jobs:
        generated = sum(j.stop - j.start for j in jobs)
        metrics |= {"sample_seconds": round(seconds, 3), "samples_per_s": generated / max(seconds, 1e-9)}
    return metrics


def chunk_path(out_dir: Path, cfg_scale: float, k: int) -> Path:
    return out_dir / CHUNKS / f"cfg{cfg_scale}" / f"{k:06d}.npz"


def samples_path(out_dir: Path, cfg_scale: float) -> Path:
    return out_dir / f"samples-cfg{cfg_scale}.npz"


def sampled_classes(s, flow_classes: int) -> int:
    """The classes sampled: the flow's first `sample.classes` (a rehearsal's few), else all of them."""
    return min(s.classes or flow_classes, flow_classes)


def class_labels(num_classes: int, per_class: int, seed: int) -> np.ndarray:
    """The labels of all samples: each class per_class times, in a permutation seeded by `seed` only.

    ADM's evaluator scores IS over contiguous 5,000-sample splits without shuffling: a class-sorted
    file would give each split 100 classes (IS 22 instead of 66 on a simulated 50k). RAE's sampler
    shuffles its label pool the same way."""
    rng = np.random.default_rng(step_seed(seed, LABEL_STREAM))
    return rng.permutation(np.repeat(np.arange(num_classes, dtype=np.int64), per_class))


def labels_of(start: int, stop: int, num_classes: int, per_class: int, seed: int) -> np.ndarray:
    """The labels of samples [start, stop): a slice of class_labels, whatever the chunking."""
    return class_labels(num_classes, per_class, seed)[start:stop]


def sample_noise(seed: int, start: int, stop: int, shape: tuple[int, ...]) -> torch.Tensor:
    """z_i for samples [start, stop), each seeded by (seed, i) on the CPU: any sharding gives the same z_i."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(step_seed(seed, i)))
                        for i in range(start, stop)])


# --- one job, run in a worker process ----------------------------------------------------------

def load_models(sources: ModelSources) -> tuple:
    """(flow, src, normalizer, decoder) on sources.device, loaded once per process (again when an upstream
    output is rebuilt: its manifest is rewritten last)."""
    up = sources.upstream
    files = [m.dir / SUCCESS for m in up.values()]
    if sources.cfg.encode.stats != "computed" and sources.cfg.encode.stats_file:
        files.append(sources.cfg.encode.stats_file)
    key = (sources.device, *(str(m.dir) for m in up.values()))
    return per_process("sample models", key, lambda: build_models(sources), files)


def build_models(sources: ModelSources) -> tuple:
    up = sources.upstream
    flow = load_flow(up["train_flow"], sources.device)
    src, normalizer, decoder = decoding_models(sources.cfg, up, sources.device)
    if src.config["dim"] != flow.blocks[0].proj_in.in_features:
        raise ValueError(f"sample: the flow models {flow.blocks[0].proj_in.in_features}-channel codes but the "
                         f"SRC of {up['fit_src'].dir} makes {src.config['dim']}-channel ones")
    return flow, src, normalizer, decoder


def decoding_models(cfg: Config, upstream: dict[str, Manifest], device) -> tuple:
    """(src, normalizer, decoder): what `decode` turns codes into pixels with, from fit_src, encode and
    fit_decoder (or decoder.weights)."""
    from pipeline.data.features import load_normalizer
    from stages.fit_decoder import load_decoder
    from stages.fit_src import load_src

    normalizer = load_normalizer(upstream["encode"].dir / "features.zarr", cfg.encode.stats, cfg.encode.stats_file)
    return load_src(upstream["fit_src"], device), normalizer, load_decoder(cfg, upstream, device)


def sample_chunk(job: SampleJob) -> int:
    s = job.sources.cfg.sample
    device = torch.device(job.sources.device)
    flow, src, normalizer, decoder = load_models(job.sources)
    info = flow_info(job.sources.upstream["train_flow"])
    sigma = info["noise_sigma"]
    labels = labels_of(job.start, job.stop, sampled_classes(s, info["arch"]["num_classes"]), s.per_class, s.seed)
    tokens, channels = flow.blocks[0].pos_embed.shape[0], flow.blocks[0].proj_in.in_features
    images, nonfinite = [], []
    for a in range(job.start, job.stop, s.batch_size):
        b = min(a + s.batch_size, job.stop)
        z = sample_noise(s.seed, a, b, (tokens, channels)).to(device)
        y = torch.from_numpy(labels[a - job.start:b - job.start]).to(device)
        with torch.no_grad():
            with autocast(device), token_step_threads(device):
                x = flow.reverse(z, y, cfg_scale=job.cfg_scale, cfg_mode=s.cfg_mode, cfg_anneal=s.cfg_anneal,
                                 **solver_args(s))
            if s.denoise == "tweedie":
                x = tweedie(flow, x, y, sigma)
            pixels, bad = decode(x, src, normalizer, decoder, device)
        images.append(pixels)
        nonfinite.append(bad)
    buf = io.BytesIO()
    np.savez(buf, images=np.concatenate(images), labels=labels,
             nonfinite=np.concatenate(nonfinite), start=np.array(job.start))
    Path(job.path).parent.mkdir(parents=True, exist_ok=True)
    write_atomic(Path(job.path), buf.getvalue())
    return job.stop - job.start


def solver_args(s) -> dict:
    """flow.reverse's solver keywords for the sample section."""
    return {"solver": s.solver, "cache": "graph" if s.cuda_graph else "dynamic", "jacobi_chunk": s.jacobi_chunk,
            "jacobi_tol": s.jacobi_tol, "jacobi_max_iters": s.jacobi_max_iters}


@contextmanager
def token_step_threads(device: torch.device):
    """One intra-op thread for the token-by-token inverse on the CPU: a step is too small to split, and
    measured on a busy 2-core box, 2 threads were 10-40x slower than 1 (benchmarks/sample.py does the same)."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def tweedie(flow, x: torch.Tensor, y: torch.Tensor, sigma: float) -> torch.Tensor:
    from pipeline.models.flow import tweedie_denoise

    return tweedie_denoise(flow, x, y, sigma)


def decode(codes: torch.Tensor, src, normalizer, decoder, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """codes (B, T, d) -> uint8 pixels (B, H, W, 3) and the non-finite flags (B,); a non-finite sample is
    decoded from zeros and then blanked, so it cannot touch the others."""
    from pipeline.models.rae import to_uint8_pixels

    finite = torch.isfinite(codes).all(2).all(1)
    codes = torch.where(finite[:, None, None], codes, torch.zeros_like(codes))
    features = normalizer.inverse(src.decode(codes))  # the decoder reads stored-scale (LayerNormed) features
    with autocast(device):
        out = decoder(features)
    finite &= torch.isfinite(out.float()).flatten(1).all(1)
    pixels = to_uint8_pixels(torch.nan_to_num(out.float()))
    pixels[~finite] = 0
    return pixels.cpu().numpy(), (~finite).cpu().numpy()


# --- the ADM-format sample file ----------------------------------------------------------------------


def assemble(out_dir: Path, cfg_scale: float, chunks: list[Path], num_classes: int, s) -> None:
    """Stream the chunk files into samples-cfg{w}.npz (uncompressed: readers can memory-map arr_0) and the
    grid, then delete the chunks. Holds one chunk in memory, never the whole sample set."""
    path = samples_path(out_dir, cfg_scale)
    labels = class_labels(num_classes, s.per_class, s.seed)
    total, nonfinite = len(labels), np.zeros(len(labels), bool)
    # the grid: one row per class, its first samples in file order
    grid_picks = [int(i) for c in range(min(s.grid_classes, num_classes))
                  for i in np.flatnonzero(labels == c)[:s.grid_per_class]]
    grid: dict[int, np.ndarray] = {}

    def write(f) -> None:
        written = 0
        with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            with zf.open("arr_0.npy", "w", force_zip64=True) as fh:
                for k, chunk in enumerate(chunks):
                    with np.load(chunk) as part:
                        images, start = part["images"], int(part["start"])
                        if start != written:
                            raise ValueError(f"{chunk}: starts at sample {start}, expected {written}")
                        if not np.array_equal(part["labels"], labels[start:start + len(images)]):
                            raise ValueError(f"{chunk}: its labels are not those of sample.seed {s.seed} "
                                             f"(a chunk of another code version); delete it to resample")
                        if k == 0:
                            header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
                                      "fortran_order": False, "shape": (total, *images.shape[1:])}
                            np.lib.format.write_array_header_1_0(fh, header)
                        fh.write(np.ascontiguousarray(images).tobytes())
                        nonfinite[start:start + len(images)] = part["nonfinite"]
                        grid.update({i: images[i - start] for i in grid_picks if start <= i < start + len(images)})
                        written += len(images)
            if written != total:
                raise ValueError(f"sample: the chunks of cfg {cfg_scale} hold {written} samples, expected {total}")
            # arr_1: the labels where ADM's sampler puts them; `labels`: the same, by name
            for name, values in (("arr_1", labels), ("labels", labels), ("nonfinite", nonfinite),
                                 ("schema_version", np.int64(SAMPLES_SCHEMA_VERSION))):
                with zf.open(f"{name}.npy", "w") as fh:
                    np.lib.format.write_array(fh, np.asarray(values))
        # the grid before the samples file is renamed into place: a resume skips a scale whose file exists
        save_grid(np.stack([grid[i] for i in grid_picks]), out_dir / f"grid-cfg{cfg_scale}.png",
                  ncol=min(s.grid_per_class, s.per_class))

    write_atomic(path, write)
    shutil.rmtree(out_dir / CHUNKS / f"cfg{cfg_scale}", ignore_errors=True)
