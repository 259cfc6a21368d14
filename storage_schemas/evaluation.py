"""`metrics.json` (stage evaluate) and `reference.npz` (stage reference).

metrics.json, schema_version 2 (2: sfid):
    {"schema_version": 2, "inception_weights": "official" | "stand-in", "inception_weights_sha256": str,
     "evaluations": [one entry per CFG scale, sorted by cfg_scale]}
an entry holds the metrics (fid, sfid, inception_score_mean/std, kid_mean/std, precision, recall; sfid is
null when the reference has no mu_s/sigma_s) and what
they were made with: cfg_scale, evaluator, evaluator_version, feature_extractor, inception_weights,
inception_weights_sha256, num_samples, num_reference (pool features behind KID and P/R), pr_k,
kid_subset_size, samples_file, num_classes, samples_per_class (None when unbalanced),
nonfinite_samples, reference {source, file, file_sha256, num_images (behind mu/sigma), pr_images,
fingerprint} and flow {"<stage>.<metric>": the flow's bits/dim figures}.
"inception_weights": "stand-in" marks numbers from any weights but torch-fidelity's Inception: they
check the code path and are never an FID of the method.

reference.npz is versioned and validated by pipeline.metrics.fidelity (save_reference/load_reference,
REFERENCE_SCHEMA_VERSION 2): mu (2048,), sigma (2048, 2048) float64; mu_s (2023,), sigma_s (2023, 2023)
float64, the statistics of ADM's spatial features (first 7 channels of mixed_6/conv, 17 x 17 x 7; optional
in the layout, always written by the stage); optional pr_features (N, 2048); meta (JSON: source, num_images,
resolution, inception_weights_sha256, ...).
"""

from __future__ import annotations

import json
from pathlib import Path

from storage_schemas import SchemaError, check_version

SCHEMA_VERSION = 2
METRIC_KEYS = ("fid", "sfid", "inception_score_mean", "inception_score_std", "kid_mean", "kid_std", "precision", "recall")
LABEL_KEYS = ("cfg_scale", "evaluator", "evaluator_version", "inception_weights", "inception_weights_sha256",
              "num_samples", "num_reference", "samples_file", "reference", "flow")


def read_metrics(path: str | Path) -> dict:
    """A metrics.json this code knows, or a one-line SchemaError."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SchemaError(f"{path}: unreadable metrics ({e})") from None
    check_version(str(path), raw.get("schema_version"), SCHEMA_VERSION)
    for i, entry in enumerate(raw.get("evaluations", [])):
        missing = [k for k in METRIC_KEYS + LABEL_KEYS if k not in entry]
        if missing:
            raise SchemaError(f"{path}: evaluations[{i}] lacks {', '.join(missing)}")
        if entry["inception_weights"] not in ("official", "stand-in"):
            raise SchemaError(f"{path}: evaluations[{i}].inception_weights is {entry['inception_weights']!r}, "
                              f"expected 'official' or 'stand-in'")
    return raw
