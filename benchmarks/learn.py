"""Does the chain learn structure? The learn config end to end, its samples scored by a judge.

    python benchmarks/learn.py                                   # configs/learn.yaml, CPU, ~12.5 min
    python benchmarks/learn.py --set train.steps=1500            # a shorter flow; upstream stages are reused
    python benchmarks/learn.py --until evaluate                  # also the stand-in-Inception stages

Runs the config up to `sample` (done stages are reused: a second call only judges), trains the judge
(pipeline/metrics/judge.py, a small CNN) on the real train images, and prints one JSON object:
    judge_accuracy.real_val          the judge on the real val images (is it a good judge?)
    judge_accuracy.reconstruction    val codes + flow.noise_sigma * eps -> SRC decoder -> RAE decoder:
                                     what a perfect flow's samples could show (the decoders' ceiling)
    judge_accuracy.samples_cfg{w}    the flow's samples, per CFG scale (chance: 1 / classes)
    bits_per_dim                     the flow's held-out (val) and train bits/dim, and the Gaussian's
    stage_wall_s                     wall seconds of each stage from its manifest (a reused stage keeps
                                     the time of the run that made it)
On a set whose classes differ only by shape (`data.generate_tiny.kind: shapes`), a sample is judged
right only when it draws its class's shape. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.config import Config, load_config
from pipeline.metrics.judge import accuracy, predict, train_judge


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/learn.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="section.key=value, repeatable")
    ap.add_argument("--judge-steps", type=int, default=400)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads; on the shared 2-core box one "
                    "thread trained the learn flow 6x faster than two (3.8 vs 0.6 steps/s, benchmarks/train_flow.py)")
    ap.add_argument("--until", default="sample", help="run the stages up to this one; the default leaves out "
                    "reference and evaluate: the judge scores the samples, and the stand-in Inception on a few hundred "
                    "32 px samples says nothing and costs ~1 s per image here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")  # the stages' lines, on stderr

    from stages.runner import run_pipeline

    cfg = load_config(args.config, [*args.overrides, "runtime.progress=false"])
    started = time.perf_counter()
    manifests = run_pipeline(cfg, until=args.until)
    pipeline_s = time.perf_counter() - started

    started = time.perf_counter()
    train_x, train_y = real_images(cfg, "train")
    val_x, val_y = real_images(cfg, "val")
    # 16 px and blur: the judge reads coarse shape, not the sharpness the decoders lose (with neither it
    # scored the decoders' own reconstructions of real codes at 0.29, chance; with both at 0.93)
    judge = train_judge(train_x, train_y, steps=args.judge_steps, size=16, blur=1.5, seed=0)
    judge_s = time.perf_counter() - started

    scores = {"real_val": accuracy(judge, val_x, val_y),
              "reconstruction": accuracy(judge, *reconstructions(cfg, manifests))}
    confusion = {}
    for w in cfg.sample.cfg_scale:
        from stages.sample import samples_path

        with np.load(samples_path(manifests["sample"].dir, w)) as f:
            images, labels = f["arr_0"], f["arr_1"]
        scores[f"samples_cfg{w:g}"] = accuracy(judge, images, labels)
        # rows: the class asked for, columns: the class the judge sees. Shapes drawn under the wrong
        # labels (a conditioning defect) would show as a permutation, noise as a flat or one-column matrix
        seen = predict(judge, images)
        classes = judge.head.out_features
        confusion[f"samples_cfg{w:g}"] = np.bincount(labels * classes + seen, minlength=classes**2).reshape(
            classes, classes).tolist()

    flow = manifests["train_flow"].metrics
    print(json.dumps({
        "config": args.config, "overrides": args.overrides,
        "classes": len(set(train_y.tolist())), "train_images": len(train_x), "val_images": len(val_x),
        "judge_accuracy": scores, "judge_confusion": confusion,
        "bits_per_dim": {"val": flow.get("val_bits_per_dim"), "train_ema": flow.get("train_ema_bits_per_dim"),
                         "val_uncond": flow.get("val_bits_per_dim_uncond"),
                         "val_gaussian": flow.get("val_gaussian_bits_per_dim")},
        "stage_wall_s": {name: round(stage_seconds(m), 1) for name, m in manifests.items()},
        "pipeline_wall_s_this_call": round(pipeline_s, 1), "judge_wall_s": round(judge_s, 1),
        "device": str(cfg.runtime.device), "torch_threads": torch.get_num_threads(),
    }, indent=2))


def real_images(cfg: Config, split: str) -> tuple[np.ndarray, np.ndarray]:
    """The split's source images (uint8 N x R x R x 3, R = data.resolution) and labels, in listing order.
    The tiny sets are generated at R; other sizes are resized (bicubic), not ADM-cropped."""
    from stages.inputs import source_listing

    listing = source_listing(cfg)
    side = cfg.data.resolution
    images, labels = [], []
    for im in listing.images[split]:
        with Image.open(Path(cfg.data.root) / im.rel_path) as f:
            rgb = f.convert("RGB")
            if rgb.size != (side, side):
                rgb = rgb.resize((side, side), Image.BICUBIC)
            images.append(np.asarray(rgb))
        labels.append(im.label)
    return np.stack(images), np.asarray(labels)


def reconstructions(cfg: Config, manifests: dict) -> tuple[np.ndarray, np.ndarray]:
    """Val codes (view 0) + flow.noise_sigma * eps (seed 0), decoded as the sample stage decodes a sample."""
    from pipeline.data.codes import open_codes, read_rows, split_rows
    from pipeline.device import resolve_device
    from stages.sample import ModelSources, decode, load_models

    device = resolve_device(cfg.runtime.device)
    group, attrs = open_codes(manifests["compress"].dir / "codes.zarr")
    start, stop = split_rows(attrs, "val")
    codes, labels = read_rows(group, start, stop)
    views = len(attrs["views"])
    codes, labels = torch.from_numpy(codes[::views]), labels[::views]
    noise = torch.randn(codes.shape, generator=torch.Generator().manual_seed(0))
    upstream = {k: manifests[k] for k in ("train_flow", "fit_src", "encode", "fit_decoder") if k in manifests}
    _, src, normalizer, decoder = load_models(ModelSources(cfg, upstream, str(device)))
    with torch.no_grad():
        pixels, _ = decode((codes + cfg.flow.noise_sigma * noise).to(device), src, normalizer, decoder, device)
    return pixels, labels


def stage_seconds(manifest) -> float:
    from datetime import datetime

    return (datetime.fromisoformat(manifest.ended) - datetime.fromisoformat(manifest.started)).total_seconds()


if __name__ == "__main__":
    main()
