"""Stage `reference`: the Inception statistics samples are compared against (SRC-FLOW.md "Evaluation protocol").

- `reference.kind: train`: the train shards, ADM center crop at `data.resolution`, streamed shard by
  shard through torch-fidelity's Inception. mu/sigma (pool features) and mu_s/sigma_s (ADM's
  spatial features, sFID) come from float64 running sums over the selected images (all, or
  `max_images` class-balanced), one Inception pass; the pool features of the first `pr_images` of
  the class-balanced order are kept for KID and precision/recall.
- `reference.kind: adm_npz`: ADM's reference batch (`VIRTUAL_imagenet256_labeled.npz`): its mu/sigma
  and mu_s/sigma_s as they are, pool features of its `arr_0` images (fidelity.import_adm_reference_npz),
  so the FID and sFID are comparable with published numbers. Its resolution (arr_0.shape[1]) must be
  data.resolution, checked when the run is planned.

With `evaluate.dinov2_weights`, the same images (train: the same pass; adm_npz: the batch's `arr_0` images, not
the train set) also go through torch-fidelity's DINOv2 extractor, and their mu/sigma are stored in
`reference-dinov2.npz` (same layout) with the weights' sha256, for FD_DINOv2 (pipeline/metrics/fd_dinov2.py).

Output: `reference.npz` (fidelity.save_reference, schema_version 2). The fingerprint holds the shard
set, these settings, the Inception weights' sha256 and the ADM file's: statistics are never reused
across other weights or another reference batch. A killed `train` run resumes from
`accumulator.npz` (the sums after the last saved shard).
"""

from __future__ import annotations

import io
import json
import logging
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from pathlib import Path

import numpy as np
import torch

from pipeline.artifacts import StageOutput
from pipeline.config import Config
from pipeline.data.read_ahead import read_ahead
from pipeline.data.shards import decode_crop, iter_jpegs, manifest_rows
from pipeline.device import resolve_device
from pipeline.metrics.fidelity import (
    FEATURES,
    OFFICIAL_WEIGHTS_SHA256_PREFIX,
    SPATIAL,
    check_inception_weights,
    import_adm_reference_npz,
    load_inception,
    load_reference,
    save_reference,
)
from pipeline.progress import progress
from storage_schemas.success import Manifest, write_atomic

REFERENCE_FILE = "reference.npz"
DINOV2_REFERENCE_FILE = "reference-dinov2.npz"  # with evaluate.dinov2_weights (pipeline/metrics/fd_dinov2.py)
DINOV2 = "dinov2"
ACCUMULATOR_FILE = "accumulator.npz"
CHECKPOINT_SECONDS = 120  # the running sums (a 2048 x 2048 float64) are saved at most this often

log = logging.getLogger("srcflow")


def run(cfg: Config, upstream: dict[str, Manifest], out: StageOutput) -> dict:
    weights = cfg.evaluate.inception_weights
    weights_sha256 = check_inception_weights(weights)  # the one-line error, before any work
    path = out.path / REFERENCE_FILE
    dinov2 = cfg.evaluate.dinov2_weights
    if not path.is_file():
        device = resolve_device(cfg.runtime.device)
        if cfg.reference.kind == "adm_npz":
            reference = import_adm_reference_npz(cfg.reference.path, weights, device, cfg.evaluate.batch_size,
                                                 resolution=cfg.data.resolution, dtype=cfg.evaluate.inception_dtype)
            if dinov2:
                reference["dinov2"] = adm_dinov2_statistics(cfg, dinov2, device)
        else:
            reference = train_reference(cfg, upstream["shard"], weights, weights_sha256, device, out)
        if dinov2:  # before reference.npz, whose presence marks the work done
            mu, sigma, meta = reference["dinov2"]
            save_reference(out.path / DINOV2_REFERENCE_FILE, mu, sigma, None, meta)
        save_reference(path, reference["mu"], reference["sigma"], reference["pr_features"], reference["meta"],
                       mu_s=reference["mu_s"], sigma_s=reference["sigma_s"])
        (out.path / ACCUMULATOR_FILE).unlink(missing_ok=True)
    meta = load_reference(path)["meta"]
    metrics = {"source": meta["source"], "reference_images": meta["num_images"], "pr_images": meta.get("pr_images"),
               "inception_weights": weights_label(weights_sha256)}
    if dinov2:
        metrics["dinov2_reference_images"] = load_reference(out.path / DINOV2_REFERENCE_FILE)["meta"]["num_images"]
    return metrics


def adm_dinov2_statistics(cfg: Config, weights: str, device) -> tuple:
    """mu/sigma of the DINOv2 features of an ADM reference batch's arr_0 images (ADM ships no DINOv2 statistics)."""
    from pipeline.metrics.fd_dinov2 import dinov2_features, load_dinov2
    from pipeline.metrics.fidelity import fid_statistics
    from storage_schemas.samples import open_npz_array

    images = open_npz_array(cfg.reference.path, "arr_0")
    extractor, size = load_dinov2(weights, device), cfg.evaluate.batch_size
    with progress("reference dinov2", len(images), "img") as meter:
        parts = []
        for start in range(0, len(images), size):
            parts.append(dinov2_features(extractor, images[start:start + size], device))
            meter.advance(len(parts[-1]))
    stats = fid_statistics(np.concatenate(parts))
    return stats["mu"], stats["sigma"], dinov2_meta(weights, extractor, len(images), "adm-npz arr_0 images")


def dinov2_meta(weights: str, extractor, num_images: int, source: str) -> dict:
    from pipeline.artifacts import file_sha256
    from pipeline.metrics.fd_dinov2 import LABEL, weights_file

    return {"source": source, "num_images": num_images, "feature_extractor": extractor.name,
            "dinov2_weights_sha256": file_sha256(weights_file(weights)), "note": LABEL}


def train_reference(cfg: Config, shard_manifest, weights, weights_sha256: str, device, out: StageOutput) -> dict:
    """mu/sigma and mu_s/sigma_s of the selected train images, pool features of the first `pr_images`,
    streamed by shard."""
    shard_dir = shard_manifest.dir
    rows = manifest_rows(shard_dir, ("train",))
    order = class_balanced_order(rows)
    chosen = sorted(order[: cfg.reference.max_images])  # back to shard order: one pass over the tars
    if len(chosen) < 2:
        raise ValueError(f"reference: {len(chosen)} train images selected (reference.max_images="
                         f"{cfg.reference.max_images}); mu/sigma need at least 2")
    keep_pr = set(order[: min(cfg.reference.pr_images, len(chosen))])
    by_shard: dict[str, list[int]] = {}
    for i in chosen:
        by_shard.setdefault(rows[i]["shard"], []).append(i)

    acc = Accumulator.load(out.path / ACCUMULATOR_FILE)
    todo = [s for s in by_shard if s not in acc.shards]
    extractor = load_inception(weights, device, dtype=cfg.evaluate.inception_dtype)
    dinov2 = None
    if cfg.evaluate.dinov2_weights:
        from pipeline.metrics.fd_dinov2 import dinov2_features, load_dinov2

        dinov2 = load_dinov2(cfg.evaluate.dinov2_weights, device)
    resolution, batch_size = cfg.data.resolution, cfg.evaluate.batch_size
    threads = max(1, cfg.reference.loader_threads)

    def read(shard: str) -> tuple[str, np.ndarray]:
        return shard, read_crops(shard_dir / "shards" / shard, {rows[i]["key"]: rows[i]["sha256"] for i in
                                                                by_shard[shard]}, resolution, pool)

    saved = time.monotonic()
    with progress("reference", len(chosen), "img", done=acc.count) as meter, ThreadPoolExecutor(threads) as pool, \
            closing(read_ahead(read, todo, depth=2)) as shards:
        # the next shards are read ahead of the Inception, their JPEGs decoded in `threads` threads
        for shard, crops in shards:
            keep = np.array([i in keep_pr for i in by_shard[shard]])
            for start in range(0, len(crops), batch_size):
                features = pool_features(extractor, crops[start:start + batch_size], device)
                if dinov2 is not None:  # FD_DINOv2's features of the same crops
                    features[DINOV2] = dinov2_features(dinov2, crops[start:start + batch_size], device)
                acc.add(features, keep[start:start + batch_size])
                meter.advance(len(features["2048"]))
            acc.shards.append(shard)
            out.report_progress(acc.count, len(chosen), "images")
            if time.monotonic() - saved > CHECKPOINT_SECONDS:
                acc.save(out.path / ACCUMULATOR_FILE)
                saved = time.monotonic()
    (mu, sigma), (mu_s, sigma_s) = acc.statistics("2048"), acc.statistics(SPATIAL)
    meta = {"source": "train-shards", "num_images": acc.count, "pr_images": len(acc.pr_features),
            "resolution": resolution, "crop": "ADM center_crop_arr", "selection": "class-balanced round-robin",
            "shard_fingerprint": shard_manifest.fingerprint, "inception_weights_sha256": weights_sha256}
    reference = {"mu": mu, "sigma": sigma, "mu_s": mu_s, "sigma_s": sigma_s, "pr_features": acc.pr_features,
                 "meta": meta}
    if dinov2 is not None:
        reference["dinov2"] = (*acc.statistics(DINOV2), dinov2_meta(cfg.evaluate.dinov2_weights, dinov2, acc.count,
                                                                    "train-shards"))
    return reference


def class_balanced_order(rows: list[dict]) -> list[int]:
    """Row indices round-robin over classes: each class's 1st image (by label), then each 2nd, ..."""
    rank, seen = [], Counter()
    for r in rows:
        rank.append(seen[r["label"]])
        seen[r["label"]] += 1
    return sorted(range(len(rows)), key=lambda i: (rank[i], rows[i]["label"], i))


def read_crops(tar: Path, keys: dict[str, str], resolution: int, pool: ThreadPoolExecutor | None = None
               ) -> np.ndarray:
    """(len(keys), R, R, 3) uint8 ADM center crops of one shard's images (key -> manifest sha256), in the order of
    `keys`, decoded in `pool`'s threads when given."""
    jpegs = dict(iter_jpegs([str(tar)], keys))
    def crop(k: str) -> np.ndarray:
        return decode_crop(jpegs[k], resolution)

    return np.stack(list(pool.map(crop, keys)) if pool is not None else [crop(k) for k in keys])


def pool_features(extractor, images: np.ndarray, device) -> dict[str, np.ndarray]:
    """Inception features (fidelity.FEATURES: pool, logits, spatial) of (B, H, W, 3) uint8 images, one forward
    pass: the calls get_featuresdict_from_dataset makes."""
    x = torch.from_numpy(np.array(images)).permute(0, 3, 1, 2).contiguous().to(device)  # a copy: memmaps are read-only
    with torch.no_grad():
        features = extractor.convert_features_tuple_to_dict(extractor(x))
    return {name: features[name].cpu().numpy() for name in FEATURES}


class Accumulator:
    """Running float64 sums per feature (count, sum, sum of outer products): pool features ("2048") and
    spatial ones; and the kept pool features."""

    MOMENTS = ("2048", SPATIAL, DINOV2)  # each summed when the features hold it

    def __init__(self, count=0, sums=None, pr_features=None, shards=()):
        self.count = int(count)
        self.sums = dict(sums or {})  # feature name -> (sum, sum of outer products)
        self.pr_parts = [np.zeros((0, 2048), np.float32) if pr_features is None else pr_features]
        self.shards = list(shards)

    @property
    def pr_features(self) -> np.ndarray:
        if len(self.pr_parts) > 1:
            self.pr_parts = [np.concatenate(self.pr_parts)]
        return self.pr_parts[0]

    def add(self, features: dict[str, np.ndarray], keep: np.ndarray) -> None:
        for name in (m for m in self.MOMENTS if m in features):
            x = features[name].astype(np.float64)
            total, outer = self.sums.get(name) or (np.zeros(x.shape[1]), np.zeros((x.shape[1], x.shape[1])))
            self.sums[name] = (total + x.sum(axis=0), outer + x.T @ x)
        self.count += len(features["2048"])
        self.pr_parts.append(features["2048"][keep].astype(np.float32))

    def statistics(self, name: str = "2048") -> tuple[np.ndarray, np.ndarray]:
        """mu and the unbiased covariance (ddof 1, as np.cov in torch-fidelity's fid_features_to_statistics)."""
        total, outer = self.sums[name]
        mu = total / self.count
        sigma = (outer - self.count * np.outer(mu, mu)) / (self.count - 1)
        return mu, (sigma + sigma.T) / 2

    def save(self, path: Path) -> None:
        buffer = io.BytesIO()
        sums = {f"{kind}_{name}": value for name, (total, outer) in self.sums.items()
                for kind, value in (("total", total), ("outer", outer))}
        np.savez(buffer, count=np.int64(self.count), pr_features=self.pr_features,
                 shards=np.array(json.dumps(self.shards)), **sums)
        write_atomic(path, buffer.getvalue())

    @classmethod
    def load(cls, path: Path) -> Accumulator:
        if not path.is_file():
            return cls()
        with np.load(path, allow_pickle=False) as z:
            sums = {name: (z[f"total_{name}"], z[f"outer_{name}"])
                    for name in cls.MOMENTS if f"total_{name}" in z.files}
            return cls(z["count"], sums, z["pr_features"], json.loads(str(z["shards"])))


def weights_label(weights_sha256: str) -> str:
    """'official' for torch-fidelity's Inception, else 'stand-in': such numbers are never the method's FID."""
    return "official" if weights_sha256.startswith(OFFICIAL_WEIGHTS_SHA256_PREFIX) else "stand-in"
