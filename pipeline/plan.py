"""`srcflow plan`: per stage, what a config will write and what it will cost, before anything runs.

Runs nothing and needs no dataset. Every figure says how it was obtained:
- bytes are `exact` when computed from an on-disk layout that fixes them (the uncompressed,
  sharded Zarr arrays and their commit markers) or read from a stage that is already done (the
  shard tars listed in its `_SUCCESS.json`); otherwise they are an `estimate` (JPEG sizes,
  compressed arrays, checkpoints, samples);
- peak memory per process is always an estimate, from batch sizes and parameter counts;
- device-hours come only from measured throughputs in `benchmarks/results/*.json`, never from a
  model: a stage without an applicable measurement says "not measured".

Image counts come from, in this order: the shard stage's index when it is done; the listing of
`data.root` when it exists; the parameters of the generated tiny dataset; ImageNet's 1,281,167
train / 50,000 val images, narrowed by `data.classes` and `data.max_per_class`.

Measured throughputs: any JSON object (at any depth) naming a stage in `"stage"` (or `"benchmark"`)
with a rate key (`rows_per_s`, `images_per_s`, `steps_per_s`, `samples_per_s`), and also the layout
that benchmarks/sample.py prints (`models.<name>.kv_cache.samples_per_s`). Scalar fields of the
enclosing objects apply to the records inside them. A record applies to a config only when it
states every identity field of that stage (`IDENTITY` below) with the config's value (a field the
config leaves None may be absent). Rates are per device: training stages are timed in samples
(steps x train batch) so that a rate measured at any per-device batch applies.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pipeline.config import Config

IMAGENET_TRAIN, IMAGENET_VAL, IMAGENET_CLASSES = 1_281_167, 50_000, 1000
IMAGENET_VAL_PER_CLASS = 50
# ILSVRC2012_img_train.tar holds ~138 GB in 1,281,167 JPEGs (~108 KB each), val ~6.3 GB in 50,000
# (~128 KB): one round figure for both.
IMAGENET_MEAN_JPEG = 110_000
# The tiny generator's 95-quality JPEGs measured ~1 byte per pixel (64 px: ~4.1 KB).
TINY_JPEG_BYTES_PER_PIXEL = 1.0
# A worker process with python, torch, timm and zarr imported (ru_maxrss measured on the CPU box).
BASE_RSS = 800 * 2**20

# WebDataset's TarWriter (tarfile, PAX format, float mtime): every member is a PAX header (512 B)
# and its record (512 B), the ustar header (512 B) and the data padded to 512 B. A sample has three
# members (.jpg, .cls and .json, both < 512 B); the archive ends with 2 x 512 B of zeros and is
# padded to tarfile's 10,240 B record.
TAR_BLOCK, TAR_RECORD, TAR_MEMBER_HEADERS = 512, 10_240, 3 * 512
TAR_SAMPLE_OVERHEAD = 3 * TAR_MEMBER_HEADERS + 2 * TAR_BLOCK

# Zarr v3 sharding (pipeline/data/zarr_store.py: features and codes are stored uncompressed): a
# shard file holds its written inner chunks back to back, then the index, (offset, nbytes) as two
# uint64 per inner chunk, and its crc32c (4 B). Inner chunks wholly past the last row are not written.
ZARR_INDEX_BYTES_PER_CHUNK, ZARR_INDEX_CRC = 16, 4
# A commit marker of encode and compress (np.savez of count, sum, sumsq, _files): 992 B of zip and .npy
# headers, plus the int64 count, plus the JSON records of the shard's files (`commit_records`).
COMMIT_OVERHEAD = 992 + 8

RATE_KEYS = {"rows_per_s": "rows", "images_per_s": "images", "steps_per_s": "steps", "samples_per_s": "samples"}
# Fields a throughput record must state, with the config's values, to apply to a stage.
IDENTITY = {
    "encode": ("encoder_name", "input_size", "tokens", "channels", "depth", "encode_precision"),
    "compress": ("params_m", "tokens", "channels"),
    "fit_decoder": ("params_m", "tokens", "channels"),
    "fit_src": ("params_m", "tokens", "channels"),
    "train_flow": ("params_m", "tokens", "channels"),
    "sample": ("width", "heads", "num_blocks", "layers_per_block", "deep_layers", "tokens", "channels"),
    "shard": (),
    "reference": (),
    "evaluate": (),
}
RESULTS_DIR = Path(__file__).resolve().parent.parent / "benchmarks" / "results"


@dataclass
class Output:
    """One thing a stage writes: a file set under `path` (relative to the stage's output folder)."""

    path: str
    bytes: int
    files: int
    per_dir: int  # entries in the fullest directory of this output
    exact: bool
    basis: str


@dataclass
class StagePlan:
    stage: str
    state: str  # done | partial | stale | missing (runner.plan), or unknown
    work: int
    unit: str
    processes: int
    outputs: list[Output]
    memory: dict  # per process, estimates: host_bytes, device_bytes, basis
    hours: dict | None  # device-hours for `work` on one measured device: hours, device, rate, unit, source
    hours_note: str = ""
    timed_in: dict[str, int] | None = None  # the work in the units a measured rate may use (default: work)
    written_bytes: int | None = None  # what a done stage holds on disk (its _SUCCESS.json)

    @property
    def bytes(self) -> int:
        return sum(o.bytes for o in self.outputs)


@dataclass(frozen=True)
class Dataset:
    train: int
    val: int
    classes: int
    mean_jpeg: float
    source: str
    train_per_class: tuple[int, ...] | None = None  # known from a listing or the shard manifest
    tar_files: dict[str, int] | None = field(default=None, compare=False)  # done shard stage: tar -> bytes

    def encoded_train(self, subset_per_class: int | None) -> int:
        """Train images `encode` reads with `encode.subset_per_class`."""
        if subset_per_class is None:
            return self.train
        if self.train_per_class is not None:
            return sum(min(subset_per_class, n) for n in self.train_per_class)
        return min(self.train, self.classes * subset_per_class)


# --- the plan ---------------------------------------------------------------------------------


def capacity_plan(cfg: Config, results_dir: Path = RESULTS_DIR) -> dict:
    """The whole plan as JSON-ready data: dataset counts, then one entry per enabled stage."""
    from stages import STAGES

    states, note = stage_states(cfg)
    data = dataset_counts(cfg, states.get("shard"))
    measured = load_measurements(results_dir)
    plans = []
    for stage in STAGES:
        if not stage.enabled(cfg):
            continue
        p = SIZERS[stage.name](cfg, data)
        planned = states.get(stage.name)
        p.state = planned.state if planned else "unknown"
        if planned is not None and planned.state == "done":
            from pipeline.artifacts import ArtifactStore

            p.written_bytes = ArtifactStore(cfg.storage.root).manifest(stage.name, planned.fingerprint).bytes
        p.hours, p.hours_note = device_hours(stage.name, p.timed_in or {p.unit: p.work}, identity(cfg, stage.name),
                                             measured)
        plans.append(p)
    return {
        "storage_root": cfg.storage.root,
        "dataset": {k: v for k, v in asdict(data).items() if k not in ("train_per_class", "tar_files")},
        "states_note": note,
        "stages": [{**asdict(p), "bytes": p.bytes} for p in plans],
        "total_bytes": sum(p.bytes for p in plans),
    }


def stage_states(cfg: Config) -> tuple[dict, str]:
    """runner.plan's view of the store, when it can be had without running anything."""
    from pipeline.runner import plan

    if not Path(cfg.data.root).is_dir():  # never generate the tiny dataset or scan a missing one
        return {}, f"data.root {cfg.data.root} does not exist: stage states unknown"
    try:
        return {p.name: p for p in plan(cfg)}, ""
    except (OSError, ValueError) as e:  # a missing weights file, a foreign folder at data.root, ...
        return {}, f"stage states unknown: {e}"


# --- image counts -----------------------------------------------------------------------------


def dataset_counts(cfg: Config, shard=None) -> Dataset:
    if shard is not None and shard.state == "done":
        return _counts_from_shards(shard.path)
    root = Path(cfg.data.root)
    if root.is_dir():
        try:
            return _counts_from_listing(cfg)
        except (OSError, ValueError):
            pass
    splits = set(cfg.shard.splits)
    tiny = cfg.data.generate_tiny
    if tiny is not None:
        classes = _selected_classes(cfg, tiny.classes)
        per_class, val_per_class = _capped(tiny.per_class, cfg), _capped(tiny.val_per_class, cfg)
        train, val = classes * per_class, classes * val_per_class
        return Dataset(train if "train" in splits else 0, val if "val" in splits else 0, classes,
                       TINY_JPEG_BYTES_PER_PIXEL * tiny.size**2, "generate_tiny parameters", (per_class,) * classes)
    classes = _selected_classes(cfg, IMAGENET_CLASSES)
    whole = classes == IMAGENET_CLASSES and cfg.data.max_per_class is None
    train = IMAGENET_TRAIN if whole else round(classes * _capped(IMAGENET_TRAIN / IMAGENET_CLASSES, cfg))
    val = classes * _capped(IMAGENET_VAL_PER_CLASS, cfg)
    return Dataset(train if "train" in splits else 0, val if "val" in splits else 0, classes, IMAGENET_MEAN_JPEG,
                   "ImageNet-1k constants (1,281,167 train / 50,000 val)")


def _selected_classes(cfg: Config, available: int) -> int:
    c = cfg.data.classes
    return available if c is None else min(len(c) if isinstance(c, list) else c, available)


def _capped(n, cfg: Config):
    return n if cfg.data.max_per_class is None else min(n, cfg.data.max_per_class)


def _counts_from_listing(cfg: Config) -> Dataset:
    from stages.inputs import source_listing

    listing = source_listing(cfg)
    images = [im for split in listing.images.values() for im in split]
    step = max(1, len(images) // 512)  # stat an even sample of the files, not all of them
    sizes = [os.stat(Path(cfg.data.root) / im.rel_path).st_size for im in images[::step]]
    train = listing.images.get("train", [])
    return Dataset(len(train), len(listing.images.get("val", [])), len(listing.synsets),
                   sum(sizes) / max(len(sizes), 1), f"listing of {cfg.data.root}",
                   tuple(Counter(im.label for im in train).values()))


def _counts_from_shards(shard_dir: Path) -> Dataset:
    import pyarrow.compute as pc

    from storage_schemas.shards import INDEX, MANIFEST_SCHEMA, read_table
    from storage_schemas.success import read_manifest

    index = json.loads((shard_dir / INDEX).read_text())
    manifest = read_table(shard_dir / "manifest.parquet", MANIFEST_SCHEMA)
    train_labels = manifest.filter(pc.equal(manifest["split"], "train"))["label"].to_pylist()
    tars = {f.path: f.bytes for f in read_manifest(shard_dir).files if f.path.startswith("shards/")}
    samples = {s: info["samples"] for s, info in index["splits"].items()}
    n = max(sum(samples.values()), 1)
    mean = (sum(tars.values()) / n) - TAR_SAMPLE_OVERHEAD  # only informative: the tar bytes are read
    return Dataset(samples.get("train", 0), samples.get("val", 0), len(index["synsets"]), mean,
                   "shard stage index (done)", tuple(Counter(train_labels).values()), tars)


# --- sizes of the layouts ---------------------------------------------------------------------


def sharded_array(rows: int, row_bytes: int, rows_per_shard: int, rows_per_chunk: int) -> tuple[int, int]:
    """(bytes, shard files) of one uncompressed row-sharded Zarr v3 array (see ZARR_INDEX_* above)."""
    chunk = min(rows_per_chunk, rows_per_shard)
    if chunk == rows_per_shard:  # one chunk per shard: no sharding codec, no index; a last chunk is full size
        shards = math.ceil(rows / rows_per_shard)
        return shards * rows_per_shard * row_bytes, shards
    chunks_per_shard = math.ceil(rows_per_shard / chunk)
    index = ZARR_INDEX_BYTES_PER_CHUNK * chunks_per_shard + ZARR_INDEX_CRC
    full, rest = divmod(rows, rows_per_shard)
    total = full * (chunks_per_shard * chunk * row_bytes + index)
    if rest:
        total += math.ceil(rest / chunk) * chunk * row_bytes + index
    return total, full + (rest > 0)


def tar_set(images: int, mean_jpeg: float, per_tar: int) -> tuple[int, int]:
    """(bytes, tars) of a split cut into tars of `per_tar` samples, every JPEG of the mean size."""
    sample = TAR_SAMPLE_OVERHEAD + math.ceil(mean_jpeg / TAR_BLOCK) * TAR_BLOCK
    full, rest = divmod(images, per_tar)

    def one(k: int) -> int:
        return math.ceil((k * sample + 2 * TAR_BLOCK) / TAR_RECORD) * TAR_RECORD

    return full * one(per_tar) + (one(rest) if rest else 0), full + (rest > 0)


def row_arrays(rows: int, rows_per_shard: int, key_chars: int = 20) -> Output:
    """labels (int32), view and split (uint8), keys (vlen UTF-8): zstd-compressed, so an upper bound."""
    per_row = 4 + 1 + 1 + 4 + key_chars
    shards = math.ceil(rows / rows_per_shard)
    return Output("{labels,keys,view,split}", rows * per_row, 4 * shards, shards, False,
                  "uncompressed upper bound, ~20-char keys")


def commit_records(store: str, array: str, shard_bytes: int, shards: int) -> int:
    """Bytes of the JSON file records in one commit marker: {"path", "bytes", "crc32c"} of the shard's file of
    `array` and of the 4 small row arrays (their compressed sizes guessed at 3 digits)."""
    k = "0" * len(str(max(shards - 1, 0)))
    paths = [(f"{store}/{array}/c/{k}/0/0", len(str(shard_bytes)))] + \
        [(f"{store}/{name}/c/{k}", 3) for name in ("labels", "keys", "view", "split")]
    return sum(len('{"path": "", "bytes": , "crc32c": "00000000"}, ') + len(p) + digits for p, digits in paths)


def geometry(cfg: Config) -> tuple[int, int]:
    """(tokens, channels) of the encoder's output."""
    from stages.inputs import encoder_geometry

    grid, channels = encoder_geometry(cfg)
    return grid * grid, channels


# --- per stage: outputs, work, memory -----------------------------------------------------------


def plan_shard(cfg: Config, data: Dataset) -> StagePlan:
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
                      "basis": "one image at a time per worker"}, None)


def plan_encode(cfg: Config, data: Dataset) -> StagePlan:
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
    batch = e.batch_size
    seq, width = tokens + 5, cfg.encoder.arch.embed_dim or 768  # patch tokens + CLS + 4 registers
    images_per_job = math.ceil(e.rows_per_shard / views)
    shard_values = e.rows_per_shard * tokens * channels
    on_cpu = cfg.runtime.device == "cpu"
    # each of the encode.jobs_per_worker jobs in flight holds, per stored value of its shard: the float16
    # features (2 B) and their float64 copy and square for the statistics (16 B), on the job's device; on
    # the host, the features handed to Zarr (2 B, a view on CPU) and Zarr's shard assembly (~4 B); plus
    # its JPEGs and crops, all decoded up front
    host_job = (shard_values * (4 + (18 if on_cpu else 2))
                + images_per_job * (data.mean_jpeg + cfg.data.resolution**2 * 3))
    host = BASE_RSS + e.jobs_per_worker * host_job + (4 * params if on_cpu else 0)
    device = (6 * params + batch * seq * width * 2 * 12  # fp32 weights + bf16 copies, ~12 live activations
              + e.jobs_per_worker * shard_values * 18)
    return StagePlan("encode", "", rows, "rows", cfg.runtime.workers, outputs,
                     {"host_bytes": int(host), "device_bytes": int(device),
                      "basis": f"{params / 1e6:.1f}M-param encoder, batch {batch}, {e.jobs_per_worker} jobs in flight, "
                               f"each: a shard's features, float64 statistics temporaries, JPEGs and crops"}, None)


def plan_fit_decoder(cfg: Config, data: Dataset) -> StagePlan:
    d = cfg.fit_decoder
    tokens, _ = geometry(cfg)
    params = param_count("decoder", cfg)
    # augment resize_random_crop: the frozen encoder runs every step (fp32 weights; no-grad activations are freed)
    extra = 4 * param_count("encoder", cfg) if d.augment == "resize_random_crop" else 0
    return _training("fit_decoder", cfg, d.steps, params, d.batch_size, tokens + 1, cfg.decoder.hidden_size,
                     cfg.decoder.depth, "decoder.safetensors", extra_device=extra)


def plan_fit_src(cfg: Config, data: Dataset) -> StagePlan:
    s = cfg.src
    tokens, _ = geometry(cfg)
    extra = 4 * param_count("decoder", cfg) if s.pixel_loss_weight > 0 else 0  # the frozen RAE decoder
    # encoder and decoder branches of `depth` blocks each, at width `hidden`
    return _training("fit_src", cfg, s.steps, param_count("src", cfg), s.batch_size, tokens, s.hidden, 2 * s.depth,
                     "src.safetensors", extra_device=extra)


def plan_compress(cfg: Config, data: Dataset) -> StagePlan:
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
    batch = cfg.compress.batch_size
    params = param_count("src", cfg)
    host = BASE_RSS + e.rows_per_shard * tokens * (channels * 2 + s.dim * 4)  # a shard of features and its codes
    device = 4 * params + batch * tokens * (channels * 2 + max(s.hidden, channels) * 4 * 4)
    return StagePlan("compress", "", rows, "rows", cfg.runtime.workers, outputs,
                     {"host_bytes": int(host), "device_bytes": int(device),
                      "basis": f"{params / 1e6:.1f}M-param SRC, batch {batch}, one shard in memory"}, None)


def plan_train_flow(cfg: Config, data: Dataset) -> StagePlan:
    f, t = cfg.flow, cfg.train
    tokens, _ = geometry(cfg)
    layers = layers_of(cfg)
    return _training("train_flow", cfg, t.steps, param_count("flow", cfg), t.batch_size, tokens + 1, f.width,
                     sum(layers), "flow.safetensors")


def plan_sample(cfg: Config, data: Dataset) -> StagePlan:
    s, f = cfg.sample, cfg.flow
    tokens, _ = geometry(cfg)
    per_scale = data.classes * s.per_class
    r = cfg.data.resolution
    scales = len(s.cfg_scale)
    outputs = [Output("samples-*.npz", scales * per_scale * r * r * 3, scales, scales, False,
                      f"{per_scale:,} uint8 {r}x{r}x3 images (arr_0) per cfg_scale value, one .npz each")]
    batch = s.batch_size
    flow, dec, src = param_count("flow", cfg), param_count("decoder", cfg), param_count("src", cfg)
    # KV cache of the widest block, both CFG branches, fp32: layers x (k, v) x 2B x T x width
    cache = max(layers_of(cfg)) * 2 * 2 * batch * (tokens + 1) * f.width * 4
    decode = batch * (tokens + 1) * cfg.decoder.hidden_size * 2 * 12
    device = 4 * (flow + dec + src) + cache + decode
    return StagePlan("sample", "", scales * per_scale, "samples", cfg.runtime.workers, outputs,
                     {"host_bytes": int(BASE_RSS + 2 * batch * r * r * 3), "device_bytes": int(device),
                      "basis": f"{flow / 1e6:.0f}M flow + {dec / 1e6:.0f}M RAE decoder + KV cache at batch {batch} "
                               f"x 2 CFG branches"}, None)


INCEPTION_PARAMS = 27_000_000  # the FID Inception-v3 (pool3 2048)


def plan_reference(cfg: Config, data: Dataset) -> StagePlan:
    images = 0 if cfg.reference.kind == "adm_npz" else (cfg.reference.max_images or data.train)
    stats = Output("reference stats", (2048 + 2048 ** 2 + 2023 + 2023 ** 2) * 8, 1, 1, False,
                   "Inception pool3 mu + sigma and the sFID spatial mu_s + sigma_s (float64)")
    return _inception("reference", cfg, images, [stats])


def plan_evaluate(cfg: Config, data: Dataset) -> StagePlan:
    images = len(cfg.sample.cfg_scale) * data.classes * cfg.sample.per_class
    plan = _inception("evaluate", cfg, images, [Output("metrics", 0, 1, 1, False, "small JSON")])
    flow = param_count("flow", cfg)  # the Bayes-rule pass holds the flow beside the Inception
    plan.memory["device_bytes"] += 4 * flow
    plan.memory["basis"] += f" + the {flow / 1e6:.0f}M flow (fp32) for the Bayes-rule pass"
    return plan


def _inception(name: str, cfg: Config, images: int, outputs: list[Output]) -> StagePlan:
    batch = cfg.evaluate.batch_size
    device = 4 * INCEPTION_PARAMS + batch * 3 * 299 * 299 * 4 * 12
    return StagePlan(name, "", images, "images", 1, outputs,
                     {"host_bytes": int(BASE_RSS + batch * cfg.data.resolution**2 * 3 * 2), "device_bytes": int(device),
                      "basis": f"Inception-v3 at 299 px, batch {batch}"}, None)


def _training(name: str, cfg: Config, steps: int, params: int, batch: int, seq: int, width: int, layers: int,
              weights: str, extra_device: int = 0) -> StagePlan:
    """Checkpoints and per-process memory of an AdamW + EMA training stage under DDP (runtime.nproc)."""
    local = math.ceil(batch / max(cfg.runtime.nproc, 1))
    # fp32 weights, grads, AdamW m and v, EMA: 20 B/param; activations of a transformer layer without
    # recomputation, 16-bit, flash attention: ~34 x seq x batch x width B (Korthikanti et al. 2022).
    device = 20 * params + 34 * seq * local * width * layers + extra_device
    outputs = [Output(weights, 4 * params, 1, 1, False, "EMA weights, fp32 safetensors"),
               Output("checkpoints/ckpt-*.pt", 2 * 16 * params, 2, 2, False,
                      "2 kept checkpoints: model, EMA, AdamW m + v (fp32)")]
    return StagePlan(name, "", steps, "steps", cfg.runtime.nproc, outputs,
                     {"host_bytes": int(BASE_RSS + 4 * params), "device_bytes": int(device),
                      "basis": f"{params / 1e6:.1f}M params, {local} per process x {seq} tokens x {layers} layers "
                               f"of width {width}"}, None, timed_in={"samples": steps * batch})


SIZERS = {"shard": plan_shard, "encode": plan_encode, "fit_decoder": plan_fit_decoder, "fit_src": plan_fit_src,
          "compress": plan_compress, "train_flow": plan_train_flow, "sample": plan_sample,
          "reference": plan_reference, "evaluate": plan_evaluate}


# --- model sizes --------------------------------------------------------------------------------


def layers_of(cfg: Config) -> list[int]:
    f = cfg.flow
    layers = [f.layers_per_block] * f.num_blocks
    if f.deep_layers is not None:
        layers[-1] = f.deep_layers
    return layers


def param_count(model: str, cfg: Config) -> int:
    """Exact parameter count of a configured model, built on the meta device (no memory, no weights)."""
    import torch

    with torch.device("meta"):
        return sum(p.numel() for p in _build(model, cfg).parameters())


def _build(model: str, cfg: Config):
    tokens, channels = geometry(cfg)
    if model == "encoder":
        import timm

        arch = {k: v for k, v in cfg.encoder.arch.model_dump().items() if v is not None}
        return timm.create_model(cfg.encoder.name, pretrained=False, img_size=cfg.encoder.input_size, num_classes=0,
                                 **arch)
    if model == "decoder":
        from pipeline.models.rae import RAEDecoder
        from stages.inputs import decoder_arch

        return RAEDecoder(**decoder_arch(cfg))
    if model == "src":
        from pipeline.models.src import SRC

        s = cfg.src
        return SRC(channels, s.dim, arch="linear" if s.kind == "pca" else s.arch, hidden=s.hidden, depth=s.depth,
                   num_tokens=tokens)
    if model == "flow":
        from pipeline.models.flow import TARFlow

        f = cfg.flow
        return TARFlow(in_channels=cfg.src.dim, num_tokens=tokens, num_classes=IMAGENET_CLASSES, width=f.width,
                       heads=f.heads, num_blocks=f.num_blocks, layers_per_block=f.layers_per_block,
                       deep_layers=f.deep_layers, cond=f.cond, scale=f.scale, start_token=f.start_token,
                       soft_clip=f.soft_clip, label_drop=f.label_drop)
    raise ValueError(f"unknown model {model!r}")


# --- measured throughputs -----------------------------------------------------------------------


@dataclass(frozen=True)
class Measurement:
    stage: str
    unit: str
    rate: float
    device: str
    source: str
    fields: dict


def identity(cfg: Config, stage: str) -> dict:
    """The values a throughput record must state to apply to `stage` of this config (IDENTITY)."""
    if not IDENTITY[stage]:
        return {}
    tokens, channels = geometry(cfg)
    f, a = cfg.flow, cfg.encoder.arch

    def params_m(model: str) -> float:  # as the benchmarks print it
        return round(param_count(model, cfg) / 1e6, 2)

    values = {
        "encode": lambda: {"encoder_name": cfg.encoder.name, "input_size": cfg.encoder.input_size, "tokens": tokens,
                           "channels": channels, "depth": a.depth or 12, "encode_precision": cfg.encode.precision},
        "compress": lambda: {"params_m": params_m("src"), "tokens": tokens, "channels": channels},
        "fit_decoder": lambda: {"params_m": params_m("decoder"), "tokens": tokens, "channels": channels},
        "fit_src": lambda: {"params_m": params_m("src"), "tokens": tokens, "channels": channels},
        "train_flow": lambda: {"params_m": params_m("flow"), "tokens": tokens, "channels": cfg.src.dim},
        "sample": lambda: {"width": f.width, "heads": f.heads, "num_blocks": f.num_blocks,
                           "layers_per_block": f.layers_per_block, "deep_layers": f.deep_layers, "tokens": tokens,
                           "channels": cfg.src.dim},
    }[stage]()
    return {k: values[k] for k in IDENTITY[stage]}


def load_measurements(results_dir: Path = RESULTS_DIR) -> list[Measurement]:
    found: list[Measurement] = []
    for path in sorted(Path(results_dir).glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        found.extend(_records(data, {}, path.name, None))
    return found


def _records(node, context: dict, source: str, key: str | None) -> list[Measurement]:
    if isinstance(node, list):
        return [m for item in node for m in _records(item, context, source, key)]
    if not isinstance(node, dict):
        return []
    here = {**context, **{k: v for k, v in node.items() if not isinstance(v, (dict, list))}}
    stage = node.get("stage") or node.get("benchmark") or ("sample" if key == "kv_cache" else None)  # sample.py
    device = str(here.get("device_name") or here.get("device") or "unknown device")
    found = [Measurement(stage, unit, float(node[k]), device, source, here) for k, unit in RATE_KEYS.items()
             if stage and isinstance(node.get(k), (int, float)) and not isinstance(node[k], bool) and node[k] > 0]
    for k, v in node.items():
        if isinstance(v, (dict, list)):
            found.extend(_records(v, here, source, k))
    return found


def device_hours(stage: str, work: dict[str, int], expect: dict, measured: list[Measurement],
                 ) -> tuple[dict | None, str]:
    """Hours of `work` ({unit: amount}) on one measured device, a GPU first; else (None, why not)."""
    fits = [m for m in measured if m.stage == stage and m.unit in work
            and all(m.fields.get(k) == v if k in m.fields else v is None for k, v in expect.items())]
    if not fits:
        others = sorted({m.source for m in measured if m.stage == stage})
        why = f" (other models only: {', '.join(others)})" if others else ""
        return None, "not measured" + why
    best = min(fits, key=lambda m: (m.device == "cpu", -m.rate))  # a GPU first, then the fastest
    return ({"hours": work[best.unit] / best.rate / 3600, "device": best.device, "rate": best.rate,
             "unit": f"{best.unit}/s", "source": best.source}, "")


# --- printing -----------------------------------------------------------------------------------


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def human_hours(h: float) -> str:
    if h >= 1:
        return f"{h:,.1f} h"
    return f"{h * 60:.1f} min" if h * 60 >= 1 else f"{h * 3600:.0f} s"


def print_plan(report: dict, title: str = "srcflow plan") -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 200)  # a pipe or a log keeps the full table
    d = report["dataset"]
    console.print(f"[bold]{title}[/bold]  storage: {report['storage_root']}")
    console.print(f"images: {d['train']:,} train + {d['val']:,} val, {d['classes']} classes, "
                  f"mean JPEG {d['mean_jpeg'] / 1e3:.1f} KB  ({d['source']})")
    if report["states_note"]:
        console.print(f"[yellow]{report['states_note']}[/yellow]", highlight=False)
    table = Table(title="per stage (memory: estimates per process)")
    for col, justify in (("stage", "left"), ("state", "left"), ("work", "right"), ("bytes", "right"),
                         ("files", "right"), ("max/dir", "right"), ("device-hours (measured)", "left"),
                         ("procs", "right"), ("host mem", "right"), ("device mem", "right")):
        table.add_column(col, justify=justify)
    for s in report["stages"]:
        approx = "" if all(o["exact"] for o in s["outputs"]) else "~"
        hours = f"{human_hours(s['hours']['hours'])} on {s['hours']['device']}" if s["hours"] else s["hours_note"]
        table.add_row(s["stage"], s["state"], f"{s['work']:,} {s['unit']}", approx + human_bytes(s["bytes"]),
                      f"{sum(o['files'] for o in s['outputs']):,}", f"{max(o['per_dir'] for o in s['outputs']):,}",
                      hours, str(s["processes"]), "~" + human_bytes(s["memory"]["host_bytes"]),
                      "~" + human_bytes(s["memory"]["device_bytes"]))
    table.add_row("total", "", "", "~" + human_bytes(report["total_bytes"]), "", "", "", "", "", "")
    console.print(table)
    outputs = Table(title="outputs (exact: from the on-disk layout; ~: estimate)")
    for col in ("stage", "path", "bytes", "files", "basis"):
        outputs.add_column(col)
    for s in report["stages"]:
        for o in s["outputs"]:
            outputs.add_row(s["stage"], o["path"], ("" if o["exact"] else "~") + human_bytes(o["bytes"]),
                            f"{o['files']:,}", o["basis"])
    console.print(outputs)
