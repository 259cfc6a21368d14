"""Stage `sample`: class-balanced samples of the trained flow, decoded to pixels (SRC-FLOW.md, "The chain").

    labels   every class the flow was trained on (flow.json `classes`: under a data.classes subset the labels keep
             their ImageNet numbers, and the flow's other class embeddings were never trained; sample.classes: K
             keeps their first K, a rehearsal's few) sample.per_class times, in the order of a permutation seeded
             by sample.seed alone (class_labels): sample i's class is a pure function of (seed, classes,
             per_class, i), so chunks, workers and resumes agree, and the file is not class-sorted (ADM's IS splits)
    z_i      a standard normal (T, d) seeded by (sample.seed, i): the same whatever the chunking,
             the workers or a resume; the same z_i at every CFG scale
    codes    flow.reverse(z, y) with CFG w (sample.cfg_mode tarflow|starflow, sample.cfg_anneal), both CFG
             branches as one doubled batch, each block inverted by sample.solver: sequential (token by
             token, a KV cache) or jacobi (chunks of sample.jacobi_chunk tokens iterated to
             sample.jacobi_tol in fp32 passes, at most sample.jacobi_max_iters passes); sample.cuda_graph: static
             caches, each step a replayed CUDA graph; optionally one Tweedie step x + sigma^2 grad log p(x | y)
             (sample.denoise: tweedie, sigma = flow.noise_sigma, conditional score, fp32; auto: tweedie when the SRC
             decoder was trained on clean codes (PCA) and the flow on noisy ones, from src.json decoder_noise_sigma)
    pixels   SRC.decode(codes) (codes as compress stored them: the SRC's own encode output) ->
             per-position feature de-normalization (normalizer.inverse, the statistics the SRC was
             fit under) -> frozen RAE decoder -> uint8 (to_uint8_pixels, sample.pixel_rounding: truncate as RAE and
             ADM write their samples, or round)
    record   how the samples were made (sampling_record: the CFG rule, annealing, the solver and its passes per
             block, the denoising, the pixel rounding, the warnings raised while sampling), in each samples file
             (`sampling`) and in the stage metrics; `evaluate` copies it into metrics.json

Work is cut into chunks of sample.chunk_size samples per CFG scale; each chunk is a job
(pipeline.parallel.map_jobs, Dask when runtime.workers > 1) that writes `chunks/cfg{w}/{k:06d}.npz`
atomically, its commit: a killed run redoes only the missing chunks. Then, per scale, the chunks are
streamed into the ADM-format `samples-cfg{w}.npz` (storage_schemas/samples.py: `arr_0` uint8 N x H x W x 3,
`arr_1` int64 labels with the alias `labels`, `nonfinite` bool: samples whose code or pixels were
NaN / inf, written as black images and counted in the metrics, never resampled; `sampling`: the record) and
`grid-cfg{w}.png`
(the first grid_per_class samples of each of the first grid_classes classes, one class per row).
"""

from __future__ import annotations

import io
import json
import logging
import shutil
import time
import warnings
import zipfile
from collections import Counter
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from pipeline.artifacts import StageOutput
from pipeline.cache import per_process
from pipeline.config import Config
from pipeline.device import autocast, resolve_device
from pipeline.images import save_grid
from pipeline.parallel import jobs_device, launcher_device, map_jobs, ran_on_metric
from pipeline.training import NonFiniteError, step_seed
from stages.train_flow import flow_info, load_flow
from storage_schemas.model_files import read_model_info
from storage_schemas.samples import SCHEMA_VERSION as SAMPLES_SCHEMA_VERSION
from storage_schemas.samples import read_sampling
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
    device: str  # a device name, resolved where the models are loaded (runtime.device for the jobs)


@dataclass(frozen=True)
class SampleJob:
    sources: ModelSources
    cfg_scale: float
    chunk: int
    start: int
    stop: int
    path: str  # the chunk file this job commits
    denoise: str  # sample.denoise resolved: none | tweedie


def run(cfg: Config, upstream: dict[str, Manifest], out: StageOutput) -> dict:
    s = cfg.sample
    classes = sampled_classes(s, flow_info(upstream["train_flow"])["classes"])
    total = len(classes) * s.per_class
    scales = list(dict.fromkeys(float(w) for w in s.cfg_scale))
    sources = ModelSources(cfg, dict(upstream), cfg.runtime.device)  # each job resolves it where it runs
    check_cuda_graph(s, jobs_device(cfg.runtime))
    load_models(replace(sources, device=launcher_device(cfg.runtime)))  # a missing or mismatched model fails here
    record = sampling_record(cfg, upstream, jobs_device(cfg.runtime))
    for warning in record["warnings"]:
        log.warning("sample: %s", warning)
    # chunks of whole batches: sample i is always in batch i // batch_size, whatever the chunks (or workers)
    chunk = -(-s.chunk_size // s.batch_size) * s.batch_size
    chunks = [(k, a, min(a + chunk, total)) for k, a in enumerate(range(0, total, chunk))]
    todo = [w for w in scales if not samples_path(out.path, w).is_file()]
    jobs = [SampleJob(sources, w, k, a, b, str(chunk_path(out.path, w, k)), record["denoise"]) for w in todo
            for k, a, b in chunks if not chunk_path(out.path, w, k).is_file()]
    log.info("sample: %d classes x %d per class at cfg scales %s (%s, anneal %s, denoise %s, solver %s): %d of %d "
             "chunks to do", len(classes), s.per_class, scales, s.cfg_mode, s.cfg_anneal, record["denoise"], s.solver,
             len(jobs), len(todo) * len(chunks))

    started, done = time.perf_counter(), len(scales) * total - sum(j.stop - j.start for j in jobs)
    ran_on = Counter()
    for n in map_jobs(sample_chunk, jobs, runtime=cfg.runtime, device=cfg.runtime.device, desc="sample",
                      unit="samples", weights=lambda j: j.stop - j.start, ran_on=ran_on):
        done += n
        out.report_progress(done, len(scales) * total, "samples")
    seconds = time.perf_counter() - started

    metrics = {"num_samples": total, "num_classes": len(classes), "per_class": s.per_class, "cfg_scales": scales,
               "cfg_mode": s.cfg_mode, "denoise": record["denoise"], "solver": s.solver,
               "sampling": {k: v for k, v in record.items() if k != "warnings"}, "warnings": [],
               "jobs_ran_on": ran_on_metric(ran_on)}
    for w in scales:
        if w in todo:
            assemble(out.path, w, [chunk_path(out.path, w, k) for k, _, _ in chunks], classes, s, record)
        with np.load(samples_path(out.path, w)) as npz:
            nonfinite = int(npz["nonfinite"].sum())
        made = read_sampling(samples_path(out.path, w))
        metrics[f"nonfinite_cfg{w}"] = nonfinite
        if nonfinite:  # never committed: a black image would enter every metric as a sample
            raise NonFiniteError(f"sample: {nonfinite} of {total} samples at cfg {w} are NaN / inf: nothing is "
                                 f"committed (is the flow sound? see train_flow's loss; or lower sample.cfg_scale)")
        metrics[f"solver_stats_cfg{w}"] = made["solver_stats"]
        metrics["warnings"] += [m for m in made["warnings"] if m not in metrics["warnings"]]
        for warning in made["warnings"]:
            if warning not in record["warnings"]:
                log.warning("sample: cfg %s: %s", w, warning)
    shutil.rmtree(out.path / CHUNKS, ignore_errors=True)  # every scale is in its samples file now
    if jobs:
        generated = sum(j.stop - j.start for j in jobs)
        metrics |= {"sample_seconds": round(seconds, 3), "samples_per_s": generated / max(seconds, 1e-9)}
    return metrics


def chunk_path(out_dir: Path, cfg_scale: float, k: int) -> Path:
    return out_dir / CHUNKS / f"cfg{cfg_scale}" / f"{k:06d}.npz"


def samples_path(out_dir: Path, cfg_scale: float) -> Path:
    return out_dir / f"samples-cfg{cfg_scale}.npz"


def sampled_classes(s, trained: Iterable[int]) -> np.ndarray:
    """The labels sampled: the flow's trained classes (flow.json `classes`), or their first `sample.classes` (a
    rehearsal's few)."""
    return np.asarray(list(trained), np.int64)[:s.classes]


def class_labels(classes: Iterable[int], per_class: int, seed: int) -> np.ndarray:
    """The labels of all samples: each of `classes` (the flow's trained labels) per_class times, in a permutation
    seeded by `seed` only.

    ADM's evaluator scores IS over contiguous 5,000-sample splits without shuffling: a class-sorted
    file would give each split 100 classes (IS 22 instead of 66 on a simulated 50k). RAE's sampler
    shuffles its label pool the same way."""
    rng = np.random.default_rng(step_seed(seed, LABEL_STREAM))
    return rng.permutation(np.repeat(np.asarray(list(classes), dtype=np.int64), per_class))


def labels_of(start: int, stop: int, classes: Iterable[int], per_class: int, seed: int) -> np.ndarray:
    """The labels of samples [start, stop): a slice of class_labels, whatever the chunking."""
    return class_labels(classes, per_class, seed)[start:stop]


# --- how the samples are made ------------------------------------------------------------------------


def sampling_record(cfg: Config, upstream: dict[str, Manifest], device: str) -> dict:
    """How this stage makes its samples, and the warnings known before it starts: the CFG rule, the solver, the
    network's arithmetic, the denoising (sample.denoise resolved against the noise the SRC decoder was trained under,
    src.json decoder_noise_sigma) and the pixel rounding. Each samples file adds its solver statistics and the
    warnings raised while sampling (assemble)."""
    s = cfg.sample
    flow = flow_info(upstream["train_flow"])
    decoder_sigma = float(read_model_info(upstream["fit_src"].dir, "src")["decoder_noise_sigma"])
    denoise, notes = resolve_denoise(s.denoise, decoder_sigma, float(flow["noise_sigma"]))
    if s.solver == "jacobi" and s.jacobi_max_iters < s.jacobi_chunk:
        notes.append(f"sample.jacobi_max_iters={s.jacobi_max_iters} is below sample.jacobi_chunk={s.jacobi_chunk}: a "
                     f"chunk that has not met sample.jacobi_tol by then keeps its last tokens unsolved (counted per "
                     f"block in capped_chunks)")
    # the network's arithmetic follows the device each job resolves (jobs_ran_on); on Dask, `auto` is per worker
    precision = {"cpu": "fp32"}.get(device, "bf16 autocast" if device.startswith("cuda") else
                                    "bf16 autocast on CUDA workers, fp32 on CPU workers (jobs_ran_on)")
    solver = {"solver": s.solver}
    if s.solver == "jacobi":
        solver |= {"jacobi_chunk": s.jacobi_chunk, "jacobi_tol": s.jacobi_tol, "jacobi_max_iters": s.jacobi_max_iters,
                   "jacobi_precision": "fp32"}
    return {"classes": len(sampled_classes(s, flow["classes"])), "per_class": s.per_class, "seed": s.seed,
            "cfg_rule": s.cfg_mode, "cfg_anneal": s.cfg_anneal, **solver,
            "network_precision": precision, "cuda_graph": s.cuda_graph,
            "denoise": denoise, "denoise_setting": s.denoise, "flow_noise_sigma": float(flow["noise_sigma"]),
            "decoder_noise_sigma": decoder_sigma, "pixel_rounding": s.pixel_rounding, "warnings": notes}


def resolve_denoise(setting: str, decoder_sigma: float, flow_sigma: float) -> tuple[str, list[str]]:
    """sample.denoise (auto | none | tweedie) -> (none | tweedie, warnings). The flow's samples carry its noise
    (flow_sigma); a learned SRC decoder was trained to decode that noise, a PCA decoder (decoder_sigma 0) never saw
    any: auto takes one Tweedie step exactly when the decoder was trained on clean codes."""
    denoise = setting if setting != "auto" else "tweedie" if decoder_sigma == 0 < flow_sigma else "none"
    notes = []
    if denoise == "tweedie" and decoder_sigma > 0:
        notes.append(f"sample.denoise=tweedie on an SRC decoder trained under code noise sigma={decoder_sigma}: the "
                     f"noise is removed twice")
    if denoise == "none" and flow_sigma > 0 and decoder_sigma == 0:
        notes.append(f"sample.denoise=none: the samples carry the flow's noise (sigma={flow_sigma}) into an SRC "
                     f"decoder trained on clean codes (src.kind pca); sample.denoise=auto would denoise them")
    return denoise, notes


def sample_noise(seed: int, start: int, stop: int, shape: tuple[int, ...]) -> torch.Tensor:
    """z_i for samples [start, stop), each seeded by (seed, i) on the CPU: any sharding gives the same z_i."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(step_seed(seed, i)))
                        for i in range(start, stop)])


# --- one job, run in a worker process ----------------------------------------------------------

def load_models(sources: ModelSources) -> tuple:
    """(flow, src, normalizer, decoder) on sources.device as this process resolves it, loaded once per process
    (again when an upstream output is rebuilt: its manifest is rewritten last)."""
    sources = replace(sources, device=str(resolve_device(sources.device)))
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


def check_cuda_graph(s, device: str) -> None:
    """sample.cuda_graph needs CUDA: refused for a device that is the CPU (resolved, or configured as `cpu`)."""
    if s.cuda_graph and str(device) == "cpu":
        raise ValueError("sample.cuda_graph: CUDA graphs need a CUDA device; runtime.device resolves to cpu")


def sample_chunk(job: SampleJob) -> int:
    """Sample, decode and commit one chunk (its file); a chunk already committed (Dask running a job again after a
    lost worker) is not sampled again."""
    if Path(job.path).is_file():
        return job.stop - job.start
    s = job.sources.cfg.sample
    device = resolve_device(job.sources.device)  # where this job runs
    check_cuda_graph(s, str(device))
    flow, src, normalizer, decoder = load_models(job.sources)
    info = flow_info(job.sources.upstream["train_flow"])
    sigma = info["noise_sigma"]
    labels = labels_of(job.start, job.stop, sampled_classes(s, info["classes"]), s.per_class, s.seed)
    tokens, channels = flow.blocks[0].pos_embed.shape[0], flow.blocks[0].proj_in.in_features
    images, nonfinite, solver_stats, raised = [], [], {}, []
    with recorded_warnings(raised):
        for a in range(job.start, job.stop, s.batch_size):
            b = min(a + s.batch_size, job.stop)
            z = sample_noise(s.seed, a, b, (tokens, channels)).to(device)
            y = torch.from_numpy(labels[a - job.start:b - job.start]).to(device)
            blocks = []
            with torch.no_grad():
                with autocast(device), token_step_threads(device):
                    x = flow.reverse(z, y, cfg_scale=job.cfg_scale, cfg_mode=s.cfg_mode, cfg_anneal=s.cfg_anneal,
                                     stats=blocks, **solver_args(s))
                if job.denoise == "tweedie":
                    x = tweedie(flow, x, y, sigma)
                pixels, bad = decode(x, src, normalizer, decoder, device, s.pixel_rounding)
            add_solver_stats(solver_stats, [dict(block, batches=1) for block in blocks])
            images.append(pixels)
            nonfinite.append(bad)
    buf = io.BytesIO()
    np.savez(buf, images=np.concatenate(images), labels=labels, nonfinite=np.concatenate(nonfinite),
             start=np.array(job.start), solver_stats=np.array(json.dumps(list(solver_stats.values()))),
             warnings=np.array(json.dumps(raised)))
    Path(job.path).parent.mkdir(parents=True, exist_ok=True)
    write_atomic(Path(job.path), buf.getvalue())
    return job.stop - job.start


def add_solver_stats(total: dict[int, dict], blocks: list[dict]) -> dict[int, dict]:
    """Sum per-block solver statistics (flow.reverse's `stats`, with `batches`) into `total` (block -> stats):
    counts add up, `max_*` take the maximum."""
    for block in blocks:
        into = total.setdefault(block["block"], {"block": block["block"]})
        for key, value in block.items():
            if key != "block":
                into[key] = max(into.get(key, value), value) if key.startswith("max_") else into.get(key, 0) + value
    return total


@contextmanager
def recorded_warnings(into: list[str]):
    """Every Python warning raised inside, once each, appended to `into` as "Category: message" (they are also
    logged by the stage and written into the samples file's record)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    into += [m for m in dict.fromkeys(f"{w.category.__name__}: {w.message}" for w in caught) if m not in into]


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


def decode(codes: torch.Tensor, src, normalizer, decoder, device: torch.device,
           rounding: str = "truncate") -> tuple[np.ndarray, np.ndarray]:
    """codes (B, T, d) -> uint8 pixels (B, H, W, 3) and the non-finite flags (B,); a non-finite sample is
    decoded from zeros and then blanked, so it cannot touch the others. `rounding`: sample.pixel_rounding
    (to_uint8_pixels; truncate, as RAE's and ADM's samplers)."""
    from pipeline.models.rae import to_uint8_pixels

    finite = torch.isfinite(codes).all(2).all(1)
    codes = torch.where(finite[:, None, None], codes, torch.zeros_like(codes))
    features = normalizer.inverse(src.decode(codes))  # the decoder reads stored-scale (LayerNormed) features
    with autocast(device):
        out = decoder(features)
    finite &= torch.isfinite(out.float()).flatten(1).all(1)
    pixels = to_uint8_pixels(torch.nan_to_num(out.float()), rounding, decoder.pixel_mean, decoder.pixel_std)
    pixels[~finite] = 0
    return pixels.cpu().numpy(), (~finite).cpu().numpy()


# --- the ADM-format sample file ----------------------------------------------------------------------


def assemble(out_dir: Path, cfg_scale: float, chunks: list[Path], classes: np.ndarray, s, record: dict) -> None:
    """Stream the chunk files into samples-cfg{w}.npz (uncompressed: readers can memory-map arr_0) and the
    grid, then delete the chunks. Holds one chunk in memory, never the whole sample set. The file's `sampling` is
    `record` with this scale, the solver statistics summed over the chunks and every warning raised."""
    path = samples_path(out_dir, cfg_scale)
    labels = class_labels(classes, s.per_class, s.seed)
    total, nonfinite = len(labels), np.zeros(len(labels), bool)
    solver_stats: dict[int, dict] = {}
    raised = list(record["warnings"])
    # the grid: one row per class (the first grid_classes trained ones), its first samples in file order
    grid_picks = [int(i) for c in classes[:s.grid_classes] for i in np.flatnonzero(labels == c)[:s.grid_per_class]]
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
                        add_solver_stats(solver_stats, json.loads(str(part["solver_stats"])))
                        raised.extend(m for m in json.loads(str(part["warnings"])) if m not in raised)
                        grid.update({i: images[i - start] for i in grid_picks if start <= i < start + len(images)})
                        written += len(images)
            if written != total:
                raise ValueError(f"sample: the chunks of cfg {cfg_scale} hold {written} samples, expected {total}")
            made = {**record, "cfg_scale": cfg_scale, "solver_stats": solver_summary(solver_stats),
                    "warnings": raised + scale_warnings(solver_stats, nonfinite)}
            # arr_1: the labels where ADM's sampler puts them; `labels`: the same, by name
            for name, values in (("arr_1", labels), ("labels", labels), ("nonfinite", nonfinite),
                                 ("sampling", json.dumps(made)), ("schema_version", np.int64(SAMPLES_SCHEMA_VERSION))):
                with zf.open(f"{name}.npy", "w") as fh:
                    np.lib.format.write_array(fh, np.asarray(values))
        # the grid before the samples file is renamed into place: a resume skips a scale whose file exists
        save_grid(np.stack([grid[i] for i in grid_picks]), out_dir / f"grid-cfg{cfg_scale}.png",
                  ncol=min(s.grid_per_class, s.per_class))

    write_atomic(path, write)
    shutil.rmtree(out_dir / CHUNKS / f"cfg{cfg_scale}", ignore_errors=True)


def solver_summary(stats: dict[int, dict]) -> list[dict]:
    """Per flow block (data -> noise index): the token steps of the sequential solver (one per token, whatever the
    batch), or Jacobi's chunk solves summed over the batches: chunks, passes, mean and most passes per chunk, and the
    chunks capped at jacobi_max_iters without meeting jacobi_tol."""
    out = []
    for block in sorted(stats):
        v = stats[block]
        if "chunks" not in v:
            out.append({"block": block, "token_steps": v["iterations"] // v["batches"]})
            continue
        out.append({"block": block, "chunks": v["chunks"], "passes": v["iterations"],
                    "mean_passes_per_chunk": v["iterations"] / v["chunks"],
                    "max_passes_per_chunk": v["max_chunk_iterations"], "capped_chunks": v["capped_chunks"]})
    return out


def scale_warnings(stats: dict[int, dict], nonfinite: np.ndarray) -> list[str]:
    """What went wrong at one CFG scale: chunks that stopped at jacobi_max_iters unsolved, NaN / inf samples."""
    notes = [f"flow block {b}: {v['capped_chunks']} of {v['chunks']} Jacobi chunk solves stopped at "
             f"sample.jacobi_max_iters without reaching sample.jacobi_tol (their last tokens are not solved)"
             for b, v in sorted(stats.items()) if v.get("capped_chunks")]
    if nonfinite.any():
        notes.append(f"{int(nonfinite.sum())} of {len(nonfinite)} samples are NaN / inf (black images, flagged in "
                     f"`nonfinite`)")
    return notes
