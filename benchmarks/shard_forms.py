"""`shard` throughput per ImageNet form (data.layout), one process: the same photo-like JPEGs written as ImageFolder,
Kaggle, HF parquet, WebDataset shards and the ILSVRC2012 tars (pipeline.data.tiny_imagenet.write_imagenet_form),
each sharded by the stage itself (listing included, shard.workers=1). Prints JSON: images/s per form and each form's
ratio to ImageFolder, from interleaved repeats (the machine is shared: compare the ratios, not the absolute rates).

    python benchmarks/shard_forms.py [--classes 4 --per-class 60 --repeats 3] [--profile hf-parquet]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import sys
import sysconfig
import tempfile
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.config import load_config
from pipeline.data.tiny_imagenet import LAYOUTS, SYNSETS, TinyImage, photo_like_jpeg, write_imagenet_form
from stages.runner import run_pipeline


def images(classes: int, per_class: int, val_per_class: int) -> list[TinyImage]:
    """Photo-like 500x375 JPEGs (~100 KB, as ImageNet's), ImageNet names."""
    train = [TinyImage("train", s, f"{s}_{i}.JPEG", photo_like_jpeg(k * 1000 + i))
             for k, s in enumerate(SYNSETS[:classes]) for i in range(per_class)]
    val = [TinyImage("val", s, f"ILSVRC2012_val_{i * classes + k + 1:08d}.JPEG", photo_like_jpeg(10**6 + k * 1000 + i))
           for k, s in enumerate(SYNSETS[:classes]) for i in range(val_per_class)]
    return train + sorted(val, key=lambda im: im.name)


def shard_seconds(root: Path, storage: Path) -> tuple[float, int]:
    """The stage's own seconds (its manifest's start to end: the listing, reads, checks and writes, not the run's
    planning of the other stages) and its images."""
    cfg = load_config(None, [f"data.root={root}", f"storage.root={storage}", "shard.workers=1",
                             "runtime.progress=false", "shard.samples_per_shard=256"])
    out = run_pipeline(cfg, until="shard")["shard"]
    seconds = (datetime.fromisoformat(out.ended) - datetime.fromisoformat(out.started)).total_seconds()
    return seconds, out.metrics["samples"]


def short_paths(line: str) -> str:
    """A profile line without this machine's folders: the repo, the installed packages, the standard library."""
    for folder in (str(Path(__file__).resolve().parent.parent), *sysconfig.get_paths().values()):
        line = line.replace(folder.rstrip("/") + "/", "")
    return line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--per-class", type=int, default=60)
    parser.add_argument("--val-per-class", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profile", choices=LAYOUTS, default=None, help="cProfile one form's shard: top 15 by tottime")
    args = parser.parse_args()
    data = images(args.classes, args.per_class, args.val_per_class)
    with tempfile.TemporaryDirectory(prefix="shard-forms-") as tmp:
        tmp = Path(tmp)
        for layout in LAYOUTS:
            write_imagenet_form(tmp / layout, data, layout)
        rates: dict[str, list[float]] = {layout: [] for layout in LAYOUTS}
        for repeat in range(args.repeats):
            for layout in LAYOUTS:  # interleaved: a busy minute slows every form alike
                seconds, samples = shard_seconds(tmp / layout, tmp / f"store-{layout}-{repeat}")
                rates[layout].append(samples / seconds)
        ratios = {k: [a / b for a, b in zip(v, rates["imagefolder"], strict=True)] for k, v in rates.items()}
        result = {"images": len(data), "mean_jpeg_bytes": round(sum(len(im.data) for im in data) / len(data)),
                  "repeats": args.repeats,
                  "images_per_s": {k: round(statistics.median(v), 1) for k, v in rates.items()},
                  "vs_imagefolder": {k: round(statistics.median(v), 3) for k, v in ratios.items()}}
        if args.profile:  # the stage's function alone, into a fresh output
            from pipeline.artifacts import ArtifactStore
            from stages import shard

            cfg = load_config(None, [f"data.root={tmp / args.profile}", f"storage.root={tmp / 'store-profile'}",
                                     "shard.workers=1", "runtime.progress=false", "shard.samples_per_shard=256"])
            out = ArtifactStore(cfg.storage.root).open_output("shard", "0" * 64)
            profiler = cProfile.Profile()
            profiler.runcall(shard.run, cfg, {}, out)
            text = io.StringIO()
            pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(15)
            result["profile_top"] = [short_paths(line) for line in text.getvalue().splitlines() if line.strip()][-16:]
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
