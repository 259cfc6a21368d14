"""Per stage: what it writes, how much work it is, and its peak memory per process (estimates, with their basis)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import Config
from pipeline.models.configured import build, encoder_geometry
from pipeline.models.rae_family import encoder_type
from stages.plan.dataset import IMAGENET_CLASSES, Dataset
from stages.plan.layouts import (
    COMMIT_OVERHEAD,
    TAR_SAMPLE_OVERHEAD,
    Output,
    commit_records,
    row_arrays,
    sharded_array,
    tar_set,
)
from stages.plan.scale import Scale

# A worker process with python, torch, timm and zarr imported (ru_maxrss measured on the CPU box).
BASE_RSS = 800 * 2**20


@dataclass
class StagePlan:
    stage: str
    state: str  # done | partial | stale | missing (runner.plan), or unknown
    work: int
    unit: str
    processes: int
    outputs: list[Output]
    memory: dict  # per process, estimates: host_bytes, device_bytes, basis
    hours: dict | None  # stages.plan.compute.stage_hours: device and wall-clock hours, each term with its source
    timed_in: dict[str, int] | None = None  # the work in the units a measured rate may use (default: work)
    written_bytes: int | None = None  # what a done stage holds on disk (its _SUCCESS.json)
    batch_key: str = ""  # the config key that sizes the memory: a refusal names it
    jobs: int = 1  # independent jobs (shards, chunks) that processes share: no more of them can work at once

    @property
    def bytes(self) -> int:
        """What the committed output holds."""
        return sum(o.bytes for o in self.outputs if not o.transient)

    @property
    def peak_bytes(self) -> int:
        """What the output folder holds at most while the stage runs (its checkpoints too)."""
        return sum(o.bytes for o in self.outputs)



def geometry(cfg: Config) -> tuple[int, int]:
    """(tokens, channels) of the encoder's output."""
    grid, channels = encoder_geometry(cfg)
    return grid * grid, channels


def layers_of(cfg: Config) -> list[int]:
    f = cfg.flow
    layers = [f.layers_per_block] * f.num_blocks
    if f.deep_layers is not None:
        layers[-1] = f.deep_layers
    return layers


def param_count(model: str, cfg: Config, classes: int = IMAGENET_CLASSES) -> int:
    """Exact parameter count of a configured model, built on the meta device (no memory, no weights); the flow's
    class embeddings are `classes` (its labels' range)."""
    return sum(p.numel() for p in build(model, cfg, classes).parameters())


# --- per stage: outputs, work, memory -----------------------------------------------------------


def plan_shard(cfg: Config, data: Dataset, scale: Scale) -> StagePlan:
    per_tar = cfg.shard.samples_per_shard
    tars = {"train": data.train, "val": data.val}
    if data.tar_files is not None:
        out = Output("shards/*.tar", sum(data.tar_files.values()), len(data.tar_files), len(data.tar_files), True,
                     "read from the done shard stage's _SUCCESS.json")
    else:
        sized = [tar_set(n, data.mean_jpeg, per_tar) for n in tars.values() if n]
        files = sum(f for _, f in sized)
        out = Output("shards/*.tar", sum(b for b, _ in sized), files, files, False,
                     f"{data.mean_jpeg / 1e3:.1f} KB mean JPEG ({data.source}) + {TAR_SAMPLE_OVERHEAD} B tar "
                     f"headers per sample")
    n = data.train + data.val
    manifest = Output("manifest.parquet", n * 120, 1, 1, False, "~120 B per image (sha256, paths)")
    return StagePlan("shard", "", n, "images", cfg.shard.workers, [out, manifest],
                     {"host_bytes": BASE_RSS + 4 * int(data.mean_jpeg), "device_bytes": 0,
                      "basis": "one image at a time per worker"}, None, batch_key="shard.workers")


def checked_weights(plan: StagePlan, *params: int) -> StagePlan:
    """A weights file is read whole and checked before its tensors are built from those bytes
    (pipeline.integrity.read_verified, read_with_sha256): while its tensors are built the largest file's fp32 bytes
    sit on the host beside them."""
    largest = 4 * max(params)
    plan.memory["host_bytes"] += largest
    plan.memory["basis"] += f" + the checked bytes of its largest weights file ({largest / 1e9:.2f} GB)"
    return plan


def plan_encode(cfg: Config, data: Dataset, scale: Scale) -> StagePlan:
    e = cfg.encode
    tokens, channels = geometry(cfg)
    views = len(e.views)
    images = data.encoded_train(e.subset_per_class) + data.val
    rows = images * views
    feat_bytes, shards = sharded_array(rows, tokens * channels * 2, e.rows_per_shard, e.rows_per_chunk)
    commit = (2 * tokens * channels * 8 + COMMIT_OVERHEAD  # float64 sum and sumsq per shard
              + commit_records("features.zarr", "features", feat_bytes // max(shards, 1), shards))
    outputs = [
        Output("features.zarr/features", feat_bytes, shards, shards, True,
               f"{rows:,} rows x {tokens} x {channels} x 2 B, uncompressed, {e.rows_per_shard}-row shards "
               f"(c/<i>/0/0) of {e.rows_per_chunk}-row chunks + index"),
        row_arrays(rows, e.rows_per_shard),
        Output("features.zarr/stats_{mean,var}", 2 * tokens * channels * 8, 2, 1, False, "float64, zstd"),
        Output("commits/*.npz", shards * commit, shards, shards, False,
               "float64 sum + sumsq per shard and its files' records (np.savez)"),
    ]
    params = param_count("encoder", cfg)
    # patch tokens + CLS (+ registers) of the configured encoder
    seq, width = tokens + encoder_type(cfg.encoder.name).prefix_tokens, channels
    shard_rows = min(e.rows_per_shard, rows)  # a store smaller than one shard holds only its rows
    images_per_job = math.ceil(shard_rows / views)
    jobs, batch = min(e.jobs_per_worker, shards), min(e.batch_size, images_per_job)
    shard_values = shard_rows * tokens * channels
    on_cpu = cfg.runtime.device == "cpu"
    bf16 = e.precision == "bf16" and not on_cpu
    act = 2 if bf16 else 4
    # each job in flight holds, per stored value of its shard: the float16 features (2 B) and their float64 copy
    # and square for the statistics (16 B), on the job's device; on the host, the features handed to Zarr (2 B;
    # the same tensor on CPU) and Zarr's shard assembly (~4 B); plus its JPEGs and crops, all decoded up front.
    # Its forward holds, per image of a batch: the encoder's input and ~10 activations of seq x width (fused
    # attention, on the CPU too: no seq x seq scores).
    host_job = (shard_values * (4 + (0 if on_cpu else 2))
                + images_per_job * (data.mean_jpeg + cfg.data.resolution**2 * 3))
    host = BASE_RSS + jobs * host_job
    per_image = 3 * cfg.encoder.input_size**2 * 4 + seq * width * act * 10
    device = (4 * params + (2 * params if bf16 else 0)  # fp32 weights (+ their bf16 copies under autocast)
              + jobs * (batch * per_image + shard_values * 18))
    return checked_weights(StagePlan(
        "encode", "", rows, "rows", cfg.runtime.workers, outputs,
        {"host_bytes": int(host), "device_bytes": int(device),
         "basis": f"{params / 1e6:.1f}M-param encoder, batch {batch}, {jobs} job(s) in flight, "
                  f"each: a shard's features, float64 statistics temporaries, JPEGs and crops"}, None,
        batch_key="encode.batch_size", jobs=shards), params)


def plan_fit_decoder(cfg: Config, data: Dataset, scale: Scale) -> StagePlan:
    d = cfg.fit_decoder
    tokens, _ = geometry(cfg)
    params = param_count("decoder", cfg)
    # augment resize_random_crop: the frozen encoder runs every step (fp32 weights; no-grad activations are freed)
    extra = 4 * param_count("encoder", cfg) if d.augment == "resize_random_crop" else 0
    return _training("fit_decoder", cfg, d.steps, params, d.batch_size, tokens + 1, cfg.decoder.hidden_size,
                     cfg.decoder.depth, "decoder.safetensors", "fit_decoder.batch_size", scale, extra_device=extra)


def plan_fit_src(cfg: Config, data: Dataset, scale: Scale) -> StagePlan:
    s = cfg.src
    tokens, _ = geometry(cfg)
    extra = 4 * param_count("decoder", cfg)  # the frozen RAE decoder: the pixel loss, the grids and the report
    # encoder and decoder branches of `depth` blocks each, at width `hidden`
    return checked_weights(_training("fit_src", cfg, s.steps, param_count("src", cfg), s.batch_size, tokens, s.hidden,
                                     2 * s.depth, "src.safetensors", "src.batch_size", scale, extra_device=extra),
                           param_count("decoder", cfg))


def plan_compress(cfg: Config, data: Dataset, scale: Scale) -> StagePlan:
    """codes.zarr has the feature store's rows and Zarr shards (stages/compress.py)."""
    e, s = cfg.encode, cfg.src
    tokens, channels = geometry(cfg)
    subset = None if cfg.compress.source == "images" else e.subset_per_class  # from: images codes every image
    rows = (data.encoded_train(subset) + data.val) * len(e.views)
    code_bytes, shards = sharded_array(rows, tokens * s.dim * 4, e.rows_per_shard, e.rows_per_chunk)
    commit = (2 * s.dim * 8 + COMMIT_OVERHEAD  # float64 sum and sumsq per code channel
              + commit_records("codes.zarr", "codes", code_bytes // max(shards, 1), shards))
    outputs = [
        Output("codes.zarr/codes", code_bytes, shards, shards, True,
               f"{rows:,} rows x {tokens} x {s.dim} x 4 B (float32), uncompressed, {e.rows_per_shard}-row shards "
               f"of {e.rows_per_chunk}-row chunks + index"),
        row_arrays(rows, e.rows_per_shard),
        Output("commits/*.npz", shards * commit, shards, shards, False,
               "float64 sum + sumsq per shard and its files' records (np.savez)"),
    ]
    shard_rows = min(e.rows_per_shard, rows)  # a store smaller than one shard holds only its rows
    batch = min(cfg.compress.batch_size, shard_rows)
    params = param_count("src", cfg)
    host = BASE_RSS + shard_rows * tokens * (channels * 2 + s.dim * 4)  # a shard of features and its codes
    # per token of a batch: its features widened and normalized (4 + 2 B per channel) and, in a learned SRC's
    # encoder, the MLP's hidden layer (4 x src.hidden) before and after its GELU, fp32
    hidden = 2 * 4 * 4 * s.hidden if s.kind == "learned" else s.dim * 4
    device = 4 * params + batch * tokens * (channels * 6 + hidden)
    return StagePlan("compress", "", rows, "rows", cfg.runtime.workers, outputs,
                     {"host_bytes": int(host), "device_bytes": int(device),
                      "basis": f"{params / 1e6:.1f}M-param SRC, batch {batch}, one shard in memory"}, None,
                     batch_key="compress.batch_size", jobs=shards)


def plan_train_flow(cfg: Config, data: Dataset, scale: Scale) -> StagePlan:
    f, t = cfg.flow, cfg.train
    tokens, _ = geometry(cfg)
    layers = layers_of(cfg)
    grid = 4 * (param_count("decoder", cfg) + param_count("src", cfg))  # the TensorBoard grids' decoding models
    return checked_weights(_training("train_flow", cfg, t.steps, param_count("flow", cfg, data.labels), t.batch_size,
                                     tokens + 1, f.width, sum(layers), "flow.safetensors", "train.batch_size", scale,
                                     extra_device=grid), param_count("decoder", cfg), param_count("src", cfg))


def plan_sample(cfg: Config, data: Dataset, scale: Scale) -> StagePlan:
    s, f = cfg.sample, cfg.flow
    tokens, _ = geometry(cfg)
    per_scale = min(s.classes or data.labels, data.labels) * s.per_class  # classes: of the flow's label space
    r = cfg.data.resolution
    scales = len(s.cfg_scale)
    shown = min(s.grid_classes, per_scale // s.per_class) * min(s.grid_per_class, s.per_class)
    outputs = [Output("samples-*.npz", scales * per_scale * r * r * 3, scales, scales, False,
                      f"{per_scale:,} uint8 {r}x{r}x3 images (arr_0) per cfg_scale value, one .npz each"),
               Output("grid-cfg*.png", scales * shown * r * r * 3, scales, scales, False,
                      f"{shown} samples per scale (sample.grid_classes x grid_per_class), PNG ~ raw size")]
    batch = s.batch_size
    flow, dec, src = param_count("flow", cfg, data.labels), param_count("decoder", cfg), param_count("src", cfg)
    # KV cache of the widest block, both CFG branches, fp32: layers x (k, v) x 2B x T x width
    cache = max(layers_of(cfg)) * 2 * 2 * batch * (tokens + 1) * f.width * 4
    decode = batch * (tokens + 1) * cfg.decoder.hidden_size * 2 * 12
    device = 4 * (flow + dec + src) + cache + decode
    return checked_weights(StagePlan(
        "sample", "", scales * per_scale, "samples", cfg.runtime.workers, outputs,
        {"host_bytes": int(BASE_RSS + 2 * batch * r * r * 3), "device_bytes": int(device),
         "basis": f"{flow / 1e6:.0f}M flow + {dec / 1e6:.0f}M RAE decoder + KV cache at batch {batch} x 2 CFG "
                  f"branches"}, None, batch_key="sample.batch_size", jobs=scales * math.ceil(per_scale / s.chunk_size)),
        flow, dec, src)


INCEPTION_PARAMS = 27_000_000  # the FID Inception-v3 (pool3 2048)
EVALUATE_GRID = (8, 4)  # stages/evaluate.py GRID_CLASSES, GRID_PER_CLASS
FID_SQRTM_BYTES = 6 * 2048**2 * 16  # scipy's sqrtm of 2048 x 2048 covariances: a few complex128 matrices
ADM_REFERENCE_IMAGES = 10_000


def plan_reference(cfg: Config, data: Dataset, scale: Scale) -> StagePlan:
    images = adm_images(cfg.reference.path) if cfg.reference.kind == "adm_npz" else \
        (cfg.reference.max_images or data.train)
    stats = Output("reference stats", (2048 + 2048 ** 2 + 2023 + 2023 ** 2) * 8, 1, 1, False,
                   "Inception pool3 mu + sigma and the sFID spatial mu_s + sigma_s (float64)")
    return _inception("reference", cfg, images, [stats])


def adm_images(path: str | None) -> int:
    """The images of an ADM reference batch (the Inception runs over its arr_0), from the file's header when it is
    here; else ADM's 10,000 (VIRTUAL_imagenet256_labeled.npz, VIRTUAL_imagenet512.npz)."""
    from storage_schemas.samples import npz_array_shape

    try:
        return npz_array_shape(Path(path), "arr_0")[0]
    except (OSError, ValueError, TypeError, IndexError):
        return ADM_REFERENCE_IMAGES


def plan_evaluate(cfg: Config, data: Dataset, scale: Scale) -> StagePlan:
    s, r = cfg.sample, cfg.data.resolution
    classes = min(s.classes or data.labels, data.labels)
    scales = len(s.cfg_scale)
    grid = min(EVALUATE_GRID[0], classes) * min(EVALUATE_GRID[1], s.per_class) * r * r * 3
    plan = _inception("evaluate", cfg, scales * classes * s.per_class,
                      [Output("grid-cfg*.png", scales * grid, scales, scales, False,
                              f"{EVALUATE_GRID[0]} classes x {EVALUATE_GRID[1]} samples per scale, PNG ~ raw size"),
                       Output("metrics.json, report.md", 0, 2, 2, False, "small")])
    flow = param_count("flow", cfg, data.labels)  # the Bayes-rule pass holds the flow beside the Inception
    plan.memory["device_bytes"] += 4 * flow + FID_SQRTM_BYTES
    plan.memory["basis"] += f" + the {flow / 1e6:.0f}M flow (fp32) for the Bayes-rule pass + FID's matrix square roots"
    return checked_weights(plan, flow)  # the Bayes pass loads the flow after the Inception is loaded


def _inception(name: str, cfg: Config, images: int, outputs: list[Output]) -> StagePlan:
    """torch-fidelity's Inception runs in evaluate.inception_dtype (pipeline/metrics/fidelity.py): float64 by default,
    8 B per weight and value (float32: 4)."""
    batch = min(cfg.evaluate.batch_size, max(images, 1))
    size = 8 if cfg.evaluate.inception_dtype == "float64" else 4
    # its largest activations, 64 x 147 x 147 per image, a few alive at once; its weights also once in fp32
    device = (size + 4) * INCEPTION_PARAMS + batch * 64 * 147 * 147 * size * 6
    return StagePlan(name, "", images, "images", 1, outputs,
                     {"host_bytes": int(BASE_RSS + batch * cfg.data.resolution**2 * 3 * 2), "device_bytes": int(device),
                      "basis": f"{cfg.evaluate.inception_dtype} Inception-v3 at 299 px, batch {batch}"}, None,
                     batch_key="evaluate.batch_size")


def _training(name: str, cfg: Config, steps: int, params: int, batch: int, seq: int, width: int, layers: int,
              weights: str, batch_key: str, scale: Scale, extra_device: int = 0) -> StagePlan:
    """Checkpoints and per-process memory of an AdamW + EMA training stage under DDP: `scale.per_node` processes on
    each of `scale.nodes` nodes, each with its share of the global batch. `extra_device`: frozen models it holds."""
    local = scale.local_batch(batch)
    on_cpu = cfg.runtime.device == "cpu"
    # fp32 weights, grads, AdamW m and v, EMA: 20 B/param (AdamW is fused on CUDA and one tensor at a time on the
    # CPU: no whole-model temporaries). Activations of a transformer layer without recomputation, 16-bit (bf16
    # autocast), flash attention: ~34 x seq x batch x width B (Korthikanti et al. 2022); in fp32 on the CPU twice
    # that (torch's CPU attention is a flash kernel too: no seq x seq scores are kept).
    state = 20 * params
    per_layer = (68 if on_cpu else 34) * seq * width
    device = state + local * layers * per_layer + extra_device
    outputs = [Output(weights, 4 * params, 1, 1, False, "EMA weights, fp32 safetensors"),
               Output("checkpoints/ckpt-*.pt", 2 * 16 * params, 2, 2, False,
                      "2 kept checkpoints: model, EMA, AdamW m + v (fp32); deleted when the stage commits",
                      transient=True)]
    return StagePlan(name, "", steps, "steps", scale.per_node, outputs,
                     {"host_bytes": int(BASE_RSS + (0 if on_cpu else 4 * params)), "device_bytes": int(device),
                      "basis": f"{params / 1e6:.1f}M params, {local} per process x {seq} tokens x {layers} layers "
                               f"of width {width}"}, None, timed_in={"samples": steps * batch}, batch_key=batch_key)


SIZERS = {"shard": plan_shard, "encode": plan_encode, "fit_decoder": plan_fit_decoder, "fit_src": plan_fit_src,
          "compress": plan_compress, "train_flow": plan_train_flow, "sample": plan_sample,
          "reference": plan_reference, "evaluate": plan_evaluate}

