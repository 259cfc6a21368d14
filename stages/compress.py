"""Stage `compress`: normalized RAE features (or images) -> `codes.zarr`, the compact codes the flow learns.

    codes = SRC_enc(normalize(f))      float32 (N, T, d), no noise (the flow adds its own constant noise)

Rows are the feature store's rows (image-major, train then val), cut into the same whole Zarr shards
(`encode.rows_per_shard`); each shard is one job that writes its rows and then a commit marker holding
float64 sums of its train codes, so a killed run redoes exactly the uncommitted shards and any worker
count gives the same store. The sums are reduced in shard order into `code_mean` / `code_std`.

`compress.from: images` streams the images from the shard set through the encoder (encode's own row
code path, features rounded to the storage dtype) and the SRC, for when the full feature store is not
kept (`encode.subset_per_class`): every image of the shard set gets a row, and the codes equal the
features path's for the same images.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.artifacts import Commits, StageOutput
from pipeline.cache import per_process
from pipeline.config import Config
from pipeline.data.features import load_normalizer, open_features, widen
from pipeline.data.shards import manifest_rows
from pipeline.data.zarr_store import (
    ShardRange,
    consolidate,
    fill_row_store,
    shard_ranges,
    write_rows,
    write_small_array,
)
from pipeline.device import resolve_device
from pipeline.integrity import open_checked
from pipeline.parallel import launcher_device, ran_on_metric
from stages.encode import (
    VIEWS,
    EncoderRun,
    ShardImages,
    encode_rows,
    encoder_run,
    encoder_spec,
    reduce_statistics,
    shard_images,
)
from stages.fit_src import load_src
from storage_schemas.success import Manifest
from storage_schemas.zarr_layouts import CODES, SPLIT_IDS, array_name


@dataclass(frozen=True)
class CompressJob:
    shard: ShardRange
    src_dir: str
    features: str  # the feature store: its rows (from: features) and its normalization statistics
    stats: str
    stats_file: str | None
    batch_size: int
    device: str  # runtime.device: the job resolves it where it runs
    store: str
    commits: str
    images: ShardImages | None = None  # from: images, the images of these rows
    encoder: EncoderRun | None = None  # from: images, the encoder run over them


def run(cfg: Config, upstream: dict[str, Manifest], out: StageOutput) -> dict:
    features = upstream["encode"].dir / "features.zarr"
    _, feature_attrs = open_features(features)
    src = cached_src(str(upstream["fit_src"].dir), launcher_device(cfg.runtime))  # a bad SRC fails here, first
    tokens = feature_attrs["grid_size"] ** 2
    n_rows, splits, images_of = row_layout(cfg, upstream, feature_attrs)
    encoder = encoder_run(cfg, encoder_spec(cfg), cfg.runtime.device) if images_of else None
    ran_on = Counter()
    store, commits = out.path / "codes.zarr", Commits(out.path / "commits")
    fill_row_store(
        store, commits, CODES, n_rows, rows_per_shard=cfg.encode.rows_per_shard,
        rows_per_chunk=cfg.encode.rows_per_chunk, row_shapes={"codes": ((tokens, src.config["dim"]), "float32")},
        attrs={"features_fingerprint": upstream["encode"].fingerprint,
               "src_fingerprint": upstream["fit_src"].fingerprint,
               "src_kind": upstream["fit_src"].metrics.get("kind"), "src_arch": src.arch,
               "src_noise_sigma": upstream["fit_src"].metrics.get("noise_sigma"),
               "source": cfg.compress.source, "views": feature_attrs["views"], "splits": splits,
               "grid_size": feature_attrs["grid_size"],
               "normalization": "codes = SRC.encode(per-position normalized features), no "
                                "noise; code_mean/code_std: per channel over the train rows"},
        job=lambda r: CompressJob(r, str(upstream["fit_src"].dir), str(features), cfg.encode.stats,
                                  cfg.encode.stats_file, cfg.compress.batch_size, cfg.runtime.device, str(store),
                                  str(commits.dir), images_of(r) if images_of else None, encoder),
        write_shard=compress_shard, runtime=cfg.runtime, desc="compress", report_progress=out.report_progress,
        ran_on=ran_on)

    count, mean, var = reduce_statistics(commits, shard_ranges(n_rows, cfg.encode.rows_per_shard), stage="compress")
    std = np.sqrt(var)
    for name, values in (("code_mean", mean), ("code_std", std)):
        write_small_array(store, name, values, CODES.arrays[name].dims, CODES.arrays[name].attributes)
    consolidate(store)
    CODES.validate(store)
    return {"rows": n_rows, "train_rows": splits["train"][1] - splits["train"][0], "tokens": tokens,
            "dim": src.config["dim"], "source": cfg.compress.source, "train_tokens": int(count),
            "code_mean_abs_max": float(np.abs(mean).max()), "code_std_min": float(std.min()),
            "code_std_max": float(std.max()), "jobs_ran_on": ran_on_metric(ran_on)}


def row_layout(cfg: Config, upstream: dict[str, Manifest], feature_attrs: dict,
               ) -> tuple[int, dict, Callable[[ShardRange], ShardImages] | None]:
    """(rows, split row ranges, for from: images the images of each shard's rows). from: features copies the
    feature store's rows; from: images has one row per (image, view) of the whole shard set, in encode's order."""
    if cfg.compress.source == "features":
        splits = dict(feature_attrs["splits"])
        return splits["val"][1], splits, None
    shard_dir = upstream["shard"].dir
    images = manifest_rows(shard_dir, ("train", "val"))
    views = tuple(VIEWS[v] for v in cfg.encode.views)
    n_rows, n_train = len(images) * len(views), sum(r["split"] == "train" for r in images) * len(views)
    return (n_rows, {"train": [0, n_train], "val": [n_train, n_rows]},
            lambda r: shard_images(r, images, views, shard_dir))


# --- one job, run in a worker process ----------------------------------------------------------


def compress_shard(job: CompressJob) -> int:
    start, stop = job.shard.start, job.shard.stop
    if job.images is None:
        group = open_checked(job.features)
        arrays = {name: group[array_name(group, name)][start:stop] for name in ("features", "labels", "key", "view",
                                                                               "split")}
    else:
        arrays, _ = encode_rows(job.images, job.encoder)  # stored-dtype features, as encode would have written them
    device = str(resolve_device(job.device))  # where this job runs
    src = cached_src(job.src_dir, device)
    normalizer = cached_normalizer(job.features, job.stats, job.stats_file)
    codes = encode_codes(src, normalizer, arrays.pop("features"), job.batch_size, device)
    files = write_rows(Path(job.store), start, {"codes": codes, **arrays})
    train = codes[arrays["split"] == SPLIT_IDS["train"]].astype(np.float64)
    Commits(Path(job.commits)).write(job.shard.index, files, count=np.array(train.shape[0] * train.shape[1]),
                                     sum=train.sum((0, 1)), sumsq=np.square(train).sum((0, 1)))
    return stop - start


def encode_codes(src, normalizer, features: np.ndarray, batch_size: int, device: str) -> np.ndarray:
    """Stored features (N, T, C) -> SRC codes (N, T, d) float32, in fp32 (no autocast), no noise."""
    out = np.empty((len(features), features.shape[1], src.config["dim"]), np.float32)
    with torch.inference_mode():
        for b0 in range(0, len(features), batch_size):
            f = torch.from_numpy(widen(features[b0:b0 + batch_size])).to(device)
            out[b0:b0 + len(f)] = src.encode(normalizer(f)).cpu().numpy()
    return out


def cached_src(src_dir: str, device: str):
    """load_src once per process; a forced refit (a new weights file) is reloaded."""
    return per_process("src", (src_dir, device), lambda: load_src(src_dir, device),
                       [Path(src_dir) / "src.safetensors"])


def cached_normalizer(features: str, stats: str, stats_file: str | None):
    """load_normalizer once per process; a rebuilt feature store (new statistics) is reloaded."""
    released = [stats_file] if stats_file else []  # none: load_normalizer says what is missing
    files = [Path(features) / "zarr.json"] if stats == "computed" else released  # rewritten when the store completes
    return per_process("normalizer", (features, stats, stats_file),
                       lambda: load_normalizer(Path(features), stats, stats_file), files)
