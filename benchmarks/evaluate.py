"""Stages `reference` and `evaluate`: Inception throughput and the cost of the metrics at paper sizes.

    python -m benchmarks.evaluate                              # CPU, 16 images -> prints JSON
    python -m benchmarks.evaluate --device cuda --out          # -> results/evaluate-cuda.json

- `images_per_s`: torch-fidelity's Inception (float64 inside, as the stages run it, or `--dtype float32`; pool features,
  logits and the sFID spatial features from one pass) on uint8 images at `--resolution`, batch
  `--batch-size`, the stages' own batch loop (stages.reference.pool_features), after one warm-up batch.
  Both stages are this loop, so the figure serves `reference` and `evaluate`.
- `metrics_seconds`: fidelity.metrics_from_features of `--samples` random pool features against a
  reference of `--reference` (FID's 2048 x 2048 and sFID's 2023 x 2023 eigenproblems, IS, KID,
  precision/recall with k = 3).
  Features are random: the timing holds, the values mean nothing.

The weights are a seeded stand-in of the same architecture: the cost is the real one.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--images", type=int, default=None, help="images through the Inception (cpu 16, cuda 2000)")
    parser.add_argument("--batch-size", type=int, default=None, help="cpu 8, cuda 250")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--samples", type=int, default=None, help="samples for the metrics (cpu 500, cuda 50000)")
    parser.add_argument("--reference", type=int, default=None, help="reference images (cpu 500, cuda 10000)")
    parser.add_argument("--dtype", default="float64", choices=("float64", "float32"),
                        help="the Inception's arithmetic (evaluate.inception_dtype)")
    parser.add_argument("--out", action="store_true", help="also write results/evaluate-<device>.json")
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    images = args.images or (2000 if cuda else 16)
    batch = args.batch_size or (250 if cuda else 8)
    n_samples, n_reference = args.samples or (50000 if cuda else 500), args.reference or (10000 if cuda else 500)

    from pipeline.metrics.fidelity import load_inception, make_standin_inception_weights, metrics_from_features
    from stages.reference import pool_features

    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "standin-inception.pth"
        sha = make_standin_inception_weights(weights)
        extractor = load_inception(weights, device, dtype=args.dtype)
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (batch, args.resolution, args.resolution, 3), dtype=np.uint8)
    pool_features(extractor, pixels, device)  # warm-up (cuDNN autotuning, allocations)
    sync(device)
    start = time.perf_counter()
    done = 0
    while done < images:
        pool_features(extractor, pixels, device)
        done += batch
    sync(device)
    seconds = time.perf_counter() - start

    features = {"2048": rng.gamma(2.0, 0.2, (n_samples, 2048)).astype(np.float32),
                "logits_unbiased": rng.normal(0, 3, (n_samples, 1008)).astype(np.float32),
                "spatial": rng.gamma(2.0, 0.2, (n_samples, 2023)).astype(np.float32)}
    reference_pool = rng.gamma(2.0, 0.2, (n_reference, 2048)).astype(np.float32)
    reference_spatial = rng.gamma(2.0, 0.2, (n_reference, 2023))
    reference = {"mu": reference_pool.mean(0).astype(np.float64), "sigma": np.cov(reference_pool, rowvar=False),
                 "mu_s": reference_spatial.mean(0), "sigma_s": np.cov(reference_spatial, rowvar=False),
                 "pr_features": reference_pool, "meta": {"inception_weights_sha256": sha}}
    t = time.perf_counter()
    metrics_from_features(features, reference, sha, device, kid_subset_size=1000, pr_k=3)
    metrics_seconds = time.perf_counter() - t

    rate = done / seconds
    result = {
        "stage": "evaluate", "images_per_s": rate, "device": args.device,
        "device_name": torch.cuda.get_device_name(device) if cuda else platform.processor() or platform.machine(),
        "torch": torch.__version__, "resolution": args.resolution, "batch_size": batch, "images": done,
        "inception_dtype": args.dtype,
        "metrics_seconds": round(metrics_seconds, 2), "metrics_samples": n_samples, "metrics_reference": n_reference,
        "records": [{"stage": "reference", "images_per_s": rate}],
        "date": datetime.date.today().isoformat(), "weights": "stand-in (same architecture; timing only)",
    }
    print(json.dumps(result, indent=2))
    if args.out:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / f"evaluate-{device.type}.json").write_text(json.dumps(result, indent=2) + "\n")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


if __name__ == "__main__":
    main()
