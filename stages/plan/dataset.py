"""Image counts of the configured dataset, from the best source at hand (see stages/plan/__init__.py)."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.config import Config
from stages.plan.layouts import TAR_SAMPLE_OVERHEAD

IMAGENET_TRAIN, IMAGENET_VAL, IMAGENET_CLASSES = 1_281_167, 50_000, 1000
IMAGENET_VAL_PER_CLASS = 50
# ILSVRC2012_img_train.tar holds ~138 GB in 1,281,167 JPEGs (~108 KB each), val ~6.3 GB in 50,000
# (~128 KB): one round figure for both.
IMAGENET_MEAN_JPEG = 110_000
# The tiny generator's 95-quality JPEGs measured ~1 byte per pixel (64 px: ~4.1 KB).
TINY_JPEG_BYTES_PER_PIXEL = 1.0


@dataclass(frozen=True)
class Dataset:
    train: int
    val: int
    classes: int
    mean_jpeg: float
    source: str
    train_per_class: tuple[int, ...] | None = None  # known from a listing or the shard manifest
    tar_files: dict[str, int] | None = field(default=None, compare=False)  # done shard stage: tar -> bytes
    label_space: int | None = None  # the highest label + 1 (the flow's classes), when it is not `classes`

    @property
    def labels(self) -> int:
        """The classes the flow is built for: labels are indices among every train synset, so a subset of classes
        (data.classes) keeps the labels of the whole set."""
        return self.label_space or self.classes

    def encoded_train(self, subset_per_class: int | None) -> int:
        """Train images `encode` reads with `encode.subset_per_class`."""
        if subset_per_class is None:
            return self.train
        if self.train_per_class is not None:
            return sum(min(subset_per_class, n) for n in self.train_per_class)
        return min(self.train, self.classes * subset_per_class)



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
                   "ImageNet-1k constants (1,281,167 train / 50,000 val)",
                   label_space=IMAGENET_CLASSES if isinstance(cfg.data.classes, list) else None)


def _selected_classes(cfg: Config, available: int) -> int:
    c = cfg.data.classes
    return available if c is None else min(len(c) if isinstance(c, list) else c, available)


def _capped(n, cfg: Config):
    return n if cfg.data.max_per_class is None else min(n, cfg.data.max_per_class)


def _counts_from_listing(cfg: Config) -> Dataset:
    from pipeline.data.imagenet import source_file_size
    from stages.inputs import source_listing

    listing = source_listing(cfg)
    images = [im for split in listing.images.values() for im in split]
    step = max(1, len(images) // 512)  # stat an even sample of the files, not all of them
    sizes = [n for im in images[::step] if (n := source_file_size(cfg.data.root, im)) >= 0]
    train = listing.images.get("train", [])
    return Dataset(len(train), len(listing.images.get("val", [])), len(listing.synsets),
                   sum(sizes) / max(len(sizes), 1), f"listing of {cfg.data.root}",
                   tuple(Counter(im.label for im in train).values()),
                   label_space=max((im.label + 1 for im in images), default=None))


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
                   "shard stage index (done)", tuple(Counter(train_labels).values()), tars,
                   label_space=max(manifest["label"].to_pylist(), default=-1) + 1 or None)

