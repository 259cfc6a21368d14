"""`metrics.json` (stage evaluate) and `reference.npz` (stage reference).

metrics.json, schema_version 4 (2: sfid; 3: flow_classifier; 4: sampling):
    {"schema_version": 4, "inception_weights": "official" | "stand-in", "inception_weights_sha256": str,
     "evaluations": [one entry per CFG scale, sorted by cfg_scale],
     "flow_classifier": {accuracy, images, classes, split, view, mean_posterior, mean_bits_per_dim,
                         mean_bits_per_dim_marginal, mean_bits_per_dim_uncond, note}}
an entry holds the metrics (fid, sfid, inception_score_mean/std, kid_mean/std, precision, recall; sfid is
null when the reference has no mu_s/sigma_s) and what
they were made with: cfg_scale, evaluator, evaluator_version, feature_extractor, inception_weights,
inception_weights_sha256, num_samples, num_reference (pool features behind KID and P/R), pr_k,
kid_subset_size, samples_file, num_classes, samples_per_class (None when unbalanced),
nonfinite_samples, reference {source, file, file_sha256, num_images (behind mu/sigma), pr_images,
fingerprint}, flow {"<stage>.<metric>": the flow's bits/dim figures} and sampling: how the samples were made, the
samples file's record (storage_schemas/samples.py `sampling`: classes, per_class, seed, cfg_rule, cfg_scale,
cfg_anneal, solver (+ jacobi_* settings), solver_stats per flow block, network_precision, denoise and
denoise_setting, flow_noise_sigma, decoder_noise_sigma, pixel_rounding, warnings); with evaluate.dinov2_weights
also fd_dinov2, fd_dinov2_extractor, dinov2_weights_sha256, fd_dinov2_reference and fd_dinov2_note (not the paper's).
"inception_weights": "stand-in" marks numbers from any weights but torch-fidelity's Inception: they
check the code path and are never an FID of the method.
flow_classifier is the flow as a Bayes-rule classifier on clean val codes (stages/likelihood.py flow_classifier;
`images` 0 and only `note` when the val split is empty): a property of the model, not a metric of the paper.

reference.npz is versioned and validated by pipeline.metrics.fidelity (save_reference/load_reference,
REFERENCE_SCHEMA_VERSION 2): mu (2048,), sigma (2048, 2048) float64; mu_s (2023,), sigma_s (2023, 2023)
float64, the statistics of ADM's spatial features (first 7 channels of mixed_6/conv, 17 x 17 x 7; optional
in the layout, always written by the stage); optional pr_features (N, 2048); meta (JSON: source, num_images,
resolution, inception_weights_sha256, ...).
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

from storage_schemas import SchemaError, check_version
from storage_schemas.samples import npz_array_shape

SCHEMA_VERSION = 4
# The external files the evaluation reads, checked from their headers when a run is planned:
INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's FID Inception
INCEPTION_WEIGHTS_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                         "weights-inception-2015-12-05-6726825d.pth")  # torch_fidelity URL_INCEPTION_V3
ADM_KEYS = ("mu", "sigma", "mu_s", "sigma_s", "arr_0")  # guided-diffusion evaluations/evaluator.py read_statistics
METRIC_KEYS = ("fid", "sfid", "inception_score_mean", "inception_score_std", "kid_mean", "kid_std", "precision",
               "recall")
CLASSIFIER_KEYS = ("accuracy", "images", "classes", "split", "view", "mean_posterior", "mean_bits_per_dim",
                   "mean_bits_per_dim_marginal", "mean_bits_per_dim_uncond", "note")
LABEL_KEYS = ("cfg_scale", "evaluator", "evaluator_version", "inception_weights", "inception_weights_sha256",
              "num_samples", "num_reference", "samples_file", "reference", "flow", "sampling")


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
    classifier = raw.get("flow_classifier")
    if not isinstance(classifier, dict) or "note" not in classifier or "images" not in classifier:
        raise SchemaError(f"{path}: flow_classifier is missing or lacks images / note")
    missing = [k for k in CLASSIFIER_KEYS if classifier["images"] and k not in classifier]
    if missing:
        raise SchemaError(f"{path}: flow_classifier lacks {', '.join(missing)}")
    return raw


def check_inception_file(path) -> None:
    """A one-line error when `evaluate.inception_weights` is unset, missing or empty."""
    need = f"needs torch-fidelity's {INCEPTION_WEIGHTS_FILE}, from {INCEPTION_WEIGHTS_URL}; place it locally"
    if path is None or str(path) == "":
        raise ValueError(f"evaluate.inception_weights is not set ({need})")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"evaluate.inception_weights: {path} does not exist ({need})")
    if not path.is_file() or path.stat().st_size == 0:
        raise ValueError(f"evaluate.inception_weights: {path} is not a non-empty file ({need})")


def check_adm_reference(path, resolution: int | None = None) -> int:
    """The resolution of an ADM reference batch (its arr_0 is (N, R, R, 3)), read from the headers only; a
    one-line error for a missing ADM key or an R other than `resolution` (data.resolution)."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = [n[:-len(".npy")] for n in zf.namelist()]
    except zipfile.BadZipFile:
        raise ValueError(f"reference.path: {path} is not an .npz (expected ADM's reference batch)") from None
    missing = [k for k in ADM_KEYS if k not in names]
    if missing:
        raise ValueError(f"reference.path: {path} lacks {', '.join(missing)} (has {', '.join(names)}); "
                         f"expected ADM's reference batch layout")
    shape = npz_array_shape(path, "arr_0")
    if len(shape) != 4 or shape[1] != shape[2] or shape[3] != 3:
        raise ValueError(f"reference.path: {path} has arr_0 of shape {shape}, expected (N, R, R, 3) images")
    if resolution is not None and shape[1] != resolution:
        raise ValueError(f"reference.path: {path} holds {shape[1]}x{shape[2]} images but data.resolution is "
                         f"{resolution}; use ADM's reference batch of {resolution} px")
    return int(shape[1])
