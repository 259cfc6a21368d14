"""Stage `shard`: ImageNet (any `data.layout` form) -> WebDataset tars + Parquet manifests.

Each split's sorted listing is cut into fixed runs of `shard.samples_per_shard` files; shard i
always holds run i, so the output does not depend on the number of workers, and a killed run
resumes shard by shard. Archive forms are read in place, each job's run in listing order (a seek and a read
per tar member; a parquet row group once). A tar is written under a temporary name and renamed when whole, then its
manifest parts; the shard's commit marker (`commits/{k:06d}.npz`, written last) records the size
and CRC-32C of all three, so a damaged tar costs only its shard.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import webdataset as wds

from pipeline.artifacts import Commits, StageOutput
from pipeline.config import Config
from pipeline.data.imagenet import RejectedImage, SourceImage, prepare_image_bytes
from pipeline.data.imagenet_archives import SourceReader
from pipeline.parallel import cpu_workers, map_jobs, ran_on_metric
from stages.inputs import Listing, source_listing
from storage_schemas.shards import (
    INDEX,
    MANIFEST_SCHEMA,
    REJECTED_SCHEMA,
    SCHEMA_VERSION,
    shard_name,
)
from storage_schemas.success import Manifest, write_atomic


@dataclass(frozen=True)
class ShardJob:
    split: str
    index: int  # within the split
    commit: int  # the job's commit marker, over all splits
    images: tuple[SourceImage, ...]
    data_root: str
    out_dir: str


def run(cfg: Config, upstream: dict[str, Manifest], out: StageOutput) -> dict:
    listing = source_listing(cfg)
    jobs, duplicates = plan_jobs(cfg, listing, out.path)
    parts, commits = out.path / "parts", Commits(out.path / "commits")
    parts.mkdir(exist_ok=True)
    (out.path / "shards").mkdir(exist_ok=True)
    todo = [j for j in jobs if not commits.done(j.commit)]
    ran_on = Counter()
    for _ in map_jobs(write_shard, todo, runtime=cfg.runtime, workers=cpu_workers(cfg.shard.workers), desc="shard",
                      unit="img", weights=lambda j: len(j.images), ran_on=ran_on):
        out.report_progress(sum(commits.done(j.commit) for j in jobs), len(jobs), "shards")

    manifest = pa.concat_tables([pq.read_table(parts / part_name(j, "manifest")) for j in jobs]).cast(MANIFEST_SCHEMA)
    rejected = pa.concat_tables([pq.read_table(parts / part_name(j, "rejected")) for j in jobs]
                                + [rejected_table(duplicates)]).cast(REJECTED_SCHEMA)
    pq.write_table(manifest, out.path / "manifest.parquet")
    pq.write_table(rejected, out.path / "rejected.parquet")
    splits = {s: {"shards": sum(j.split == s for j in jobs), "samples": int(pa.compute.sum(
        pa.compute.equal(manifest["split"], s)).as_py() or 0)} for s in cfg.shard.splits}
    index = {"schema_version": SCHEMA_VERSION, "layout": listing.layout, "synsets": listing.synsets, "splits": splits}
    write_atomic(out.path / INDEX, json.dumps(index, indent=2))
    return {
        "samples": manifest.num_rows,
        "rejected": rejected.num_rows,
        "converted": int(pa.compute.sum(manifest["converted"]).as_py() or 0),
        "ignored": listing.ignored,
        "splits": splits,
        "classes": len(listing.synsets),
        "jobs_ran_on": ran_on_metric(ran_on),
    }


def plan_jobs(cfg: Config, listing: Listing, out_dir: Path) -> tuple[list[ShardJob], list[tuple[SourceImage, str]]]:
    """Fixed runs of the sorted listing -> shards. Files whose key repeats an earlier key, in this split or an
    earlier one, are rejected: every reader finds an image by its key alone (a val `1.jpg` beside a train `1.jpg`
    handed the train image's bytes a val sha256)."""
    jobs, duplicates = [], []
    n = cfg.shard.samples_per_shard
    seen: dict[str, str] = {}
    for split in cfg.shard.splits:
        kept = []
        for im in listing.images[split]:
            key = sample_key(im)
            if key in seen:
                duplicates.append((im, f"duplicate key {key} (also {seen[key]})"))
            else:
                seen[key] = im.rel_path
                kept.append(im)
        for i in range(0, len(kept), n):
            jobs.append(ShardJob(split, i // n, len(jobs), tuple(kept[i:i + n]), str(Path(cfg.data.root).absolute()),
                                 str(out_dir)))
    return jobs, duplicates


def sample_key(im: SourceImage) -> str:
    # WebDataset splits a member name at its first dot: keys must not contain one.
    return Path(im.rel_path).stem.replace(".", "_")


# --- one shard --------------------------------------------------------------------------------


def part_name(job: ShardJob, kind: str) -> str:
    return f"{shard_name(job.split, job.index)[:-4]}.{kind}.parquet"


def write_shard(job: ShardJob) -> int:
    """Write and commit one shard; one already committed (Dask running a job again after a lost worker) is kept."""
    out = Path(job.out_dir)
    if Commits(out / "commits").done(job.commit):
        return 0
    name = shard_name(job.split, job.index)
    rows, rejected = [], []

    def write_tar(f) -> None:
        with wds.TarWriter(f, mtime=0.0) as tar, SourceReader(job.data_root) as source:
            for im in job.images:
                try:
                    data, info = prepare_image_bytes(source.read(im))
                except RejectedImage as e:
                    rejected.append((im, e.reason))
                    continue
                except OSError as e:
                    rejected.append((im, f"unreadable: {e.strerror or e}"))
                    continue
                key = sample_key(im)
                meta = {"synset": im.synset, "source_path": im.rel_path, **info}
                tar.write({"__key__": key, "jpg": data, "cls": str(im.label).encode(),
                           "json": json.dumps(meta, sort_keys=True).encode()})
                rows.append({"key": key, "split": im.split, "synset": im.synset, "label": im.label,
                             "source_path": im.rel_path, "shard": name, "width": info["width"],
                             "height": info["height"], "orig_format": info["orig_format"],
                             "orig_mode": info["orig_mode"], "converted": info["converted"],
                             "sha256": hashlib.sha256(data).hexdigest()})

    write_atomic(out / "shards" / name, write_tar, fsync=False)  # the commit marker below is fsynced
    files = [out / "shards" / name, out / "parts" / part_name(job, "rejected"),
             out / "parts" / part_name(job, "manifest")]
    _write_part(files[1], rejected_table(rejected))
    _write_part(files[2], pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA))
    Commits(out / "commits").write(job.commit, files)
    return len(rows)


def rejected_table(rejected: list[tuple[SourceImage, str]]) -> pa.Table:
    return pa.Table.from_pylist([{"source_path": im.rel_path, "split": im.split, "reason": reason}
                                 for im, reason in rejected], schema=REJECTED_SCHEMA)


def _write_part(path: Path, table: pa.Table) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    write_atomic(path, buf.getvalue())
