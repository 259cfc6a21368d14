"""Stage `evaluate`: FID, sFID, IS, KID, precision/recall of each CFG scale's samples against the reference.

SRC-FLOW.md "Evaluation protocol": the `sample` stage writes one ADM-format `samples-cfg{w}.npz`
(`arr_0` uint8 N x H x W x 3, `arr_1` labels) per `sample.cfg_scale`; each goes once through
torch-fidelity's Inception (float64 inside, pipeline/metrics/fidelity.py: pool features, logits and
ADM's spatial features from one pass) against the `reference` stage's statistics. Output:

- `metrics.json` (storage_schemas/evaluation.py): one entry per CFG scale, every number labelled with the
  evaluator and its version, the Inception weights' sha256, `inception_weights: official|stand-in`,
  the sample and reference counts, the CFG scale, the flow's bits/dim from upstream manifests, and how the
  samples were made (`sampling`: the samples file's record: CFG rule, annealing, solver and its statistics,
  denoising, pixel rounding, the warnings raised while sampling), so two metric files compare without configs;
- `grid-cfg{w}.png` (a few samples of the first classes) and `report.md` (the table and grids);
- the flow as a Bayes-rule classifier on the clean val codes (stages/likelihood.py flow_classifier, at most
  `evaluate.bayes_max_images`): accuracy and mean bits/dim in metrics.json `flow_classifier`, the stage metrics
  (`bayes_accuracy`, ...) and the report; a property of the model that needs no Inception, not a paper metric.

With `evaluate.dinov2_weights`, each entry also holds `fd_dinov2` (the Frechet distance in DINOv2-L/14 space,
torch-fidelity's DINOv2 extractor on a local file, against the reference stage's `reference-dinov2.npz` made with
the same weights), labelled as not a number of the paper (pipeline/metrics/fd_dinov2.py).

Metrics made with stand-in weights (any file but torch-fidelity's 6726825d Inception) prove the
code path only; they are never an FID of the method. A killed run keeps the CFG scales already
in `metrics.json` and evaluates the rest.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from pipeline.artifacts import ArtifactStore, StageOutput
from pipeline.config import Config
from pipeline.device import resolve_device
from pipeline.images import save_grid
from pipeline.integrity import check_file
from pipeline.metrics.fidelity import (
    FEATURES,
    check_inception_weights,
    check_reference_weights,
    load_inception,
    load_reference,
    metrics_from_features,
)
from pipeline.progress import progress
from stages.likelihood import flow_classifier
from stages.reference import (
    REFERENCE_FILE,
    pool_features,
    weights_label,
)
from storage_schemas.evaluation import SCHEMA_VERSION as METRICS_SCHEMA_VERSION
from storage_schemas.evaluation import read_metrics
from storage_schemas.samples import open_samples, read_sampling
from storage_schemas.success import Manifest, write_atomic

METRICS_FILE = "metrics.json"  # layout: storage_schemas/evaluation.py
PR_K = 3  # precision/recall neighbourhood, as ADM's evaluator
SAMPLES_GLOB = "samples-cfg*.npz"
GRID_CLASSES, GRID_PER_CLASS = 8, 4
REPORT_ROWS = (("fid", "FID"), ("sfid", "sFID"), ("inception_score_mean", "Inception Score"), ("kid_mean", "KID"),
               ("precision", "precision"), ("recall", "recall"))  # metrics.json key, report.md row
# metrics.json key -> the short name of the flattened stage metric (`fid_cfg1.0`)
FLAT_NAMES = {"fid": "fid", "sfid": "sfid", "inception_score_mean": "is", "kid_mean": "kid", "precision": "precision",
              "recall": "recall"}


def run(cfg: Config, upstream: dict[str, Manifest], out: StageOutput) -> dict:
    weights = cfg.evaluate.inception_weights
    weights_sha256 = check_inception_weights(weights)  # the one-line error, before any work
    reference = load_reference(check_file(upstream["reference"].dir / REFERENCE_FILE))
    check_reference_weights(reference, weights_sha256)
    sample_sets = find_samples(upstream["sample"].dir, cfg.sample.cfg_scale)  # every file, before any Inception
    made = {w: sampling_of(path) for w, path in sample_sets}
    flow = flow_metrics(cfg, upstream["sample"])
    classifier = flow_classifier(cfg, upstream, cfg.evaluate.bayes_max_images)  # needs no Inception
    reference_label = reference_summary(reference, upstream["reference"])
    device = resolve_device(cfg.runtime.device)

    evaluations = read_evaluations(out.path / METRICS_FILE, sample_sets)  # a resumed run keeps finished scales
    fd = FdDinov2(cfg, upstream["reference"].dir, device)  # the reference checked now, the weights read when used
    extractor = None
    for cfg_scale, path in sample_sets:
        if any(e["cfg_scale"] == cfg_scale for e in evaluations):
            continue
        samples, labels, nonfinite = open_samples(check_file(path))  # memory-mapped: checked whole first
        check_resolution(samples, reference, path)
        extractor = extractor or load_inception(weights, device, dtype=cfg.evaluate.inception_dtype)
        features = sample_features(extractor, samples, device, cfg.evaluate.batch_size, out, f"evaluate cfg "
                                                                                             f"{cfg_scale}")
        metrics = metrics_from_features(features, reference, weights_sha256, device, cfg.evaluate.kid_subset_size, PR_K)
        grid, ncol = grid_images(samples, labels)
        save_grid(grid, out.path / f"grid-cfg{cfg_scale}.png", ncol=ncol)
        evaluations.append({"cfg_scale": cfg_scale, **metrics, "inception_weights": weights_label(weights_sha256),
                            "samples_file": path.name, **class_counts(labels), "nonfinite_samples": nonfinite,
                            "reference": reference_label, "flow": flow, "sampling": made[cfg_scale],
                            **fd(samples, out, f"evaluate fd_dinov2 cfg {cfg_scale}")})
        write_atomic(out.path / METRICS_FILE, metrics_json(evaluations, weights_sha256, classifier))  # scale done

    evaluations.sort(key=lambda e: e["cfg_scale"])
    write_atomic(out.path / METRICS_FILE, metrics_json(evaluations, weights_sha256, classifier))
    write_atomic(out.path / "report.md", report_markdown(evaluations, classifier))
    return stage_metrics(evaluations, flow, classifier)


# --- samples ------------------------------------------------------------------------------------


def find_samples(sample_dir: Path, cfg_scales: list[float]) -> list[tuple[float, Path]]:
    """(cfg scale, samples-cfg{w}.npz) for each `sample.cfg_scale`; a one-line error naming a missing one."""
    found = {}
    for path in Path(sample_dir).glob(SAMPLES_GLOB):
        try:
            found[float(path.name[len("samples-cfg"):-len(".npz")])] = path
        except ValueError:
            continue
    out = []
    for w in cfg_scales:
        match = [p for s, p in found.items() if math.isclose(s, w, rel_tol=1e-9, abs_tol=1e-12)]
        if not match:
            raise FileNotFoundError(f"sample output {sample_dir} has no samples-cfg{w}.npz for sample.cfg_scale {w} "
                                    f"(has: {', '.join(sorted(p.name for p in found.values())) or 'none'})")
        out.append((float(w), match[0]))
    return out


def sampling_of(path: Path) -> dict:
    """The samples file's record of how its samples were made; a one-line error where there is none."""
    record = read_sampling(path)
    if record is None:
        raise ValueError(f"{path}: no `sampling` record of how the samples were made (stage sample writes one)")
    return record


def check_resolution(samples: np.ndarray, reference: dict, path: Path) -> None:
    resolution = reference["meta"].get("resolution")
    if resolution is not None and samples.shape[1:3] != (resolution, resolution):
        raise ValueError(f"{path}: samples are {samples.shape[1]}x{samples.shape[2]}, the reference statistics are "
                         f"of {resolution}x{resolution} crops (data.resolution)")


def sample_features(extractor, samples: np.ndarray, device, batch_size: int, out: StageOutput,
                    desc: str) -> dict[str, np.ndarray]:
    """Inception pool features, unbiased logits and spatial features of all samples (one pass), batch by batch,
    with a progress bar."""
    parts: dict[str, list[np.ndarray]] = {name: [] for name in FEATURES}
    with progress(desc, len(samples), "img") as meter:
        for start in range(0, len(samples), batch_size):
            features = pool_features(extractor, samples[start:start + batch_size], device)
            for name in FEATURES:
                parts[name].append(features[name])
            meter.advance(len(features["2048"]))
            out.report_progress(meter.done, len(samples), "images")
    return {name: np.concatenate(p) for name, p in parts.items()}


def class_counts(labels: np.ndarray | None) -> dict:
    if labels is None:
        return {"num_classes": None, "samples_per_class": None}
    counts = np.bincount(labels.astype(np.int64))
    counts = counts[counts > 0]
    return {"num_classes": len(counts),
            "samples_per_class": int(counts[0]) if (counts == counts[0]).all() else None}  # None: not balanced


def grid_images(samples: np.ndarray, labels: np.ndarray | None) -> tuple[np.ndarray, int]:
    """Up to GRID_PER_CLASS samples of each of the first GRID_CLASSES classes, one class per row; and the row length."""
    if labels is None:
        return np.asarray(samples[: GRID_CLASSES * GRID_PER_CLASS]), GRID_PER_CLASS
    rows = [np.flatnonzero(labels == c) for c in np.unique(labels)[:GRID_CLASSES]]
    per = min(GRID_PER_CLASS, *(len(r) for r in rows))
    return np.stack([np.asarray(samples[i]) for r in rows for i in r[:per]]), per


class FdDinov2:
    """FD_DINOv2 of a sample set when evaluate.dinov2_weights is set ({} otherwise): its value, extractor, weights'
    sha256 and the note that it is not the paper's."""

    def __init__(self, cfg: Config, reference_dir: Path, device):
        self.weights, self.device, self.batch_size = cfg.evaluate.dinov2_weights, device, cfg.evaluate.batch_size
        self.extractor = self.reference = None
        if self.weights:
            from pipeline.artifacts import file_sha256
            from pipeline.metrics.fd_dinov2 import check_reference_dinov2, weights_file
            from stages.reference import DINOV2_REFERENCE_FILE

            self.sha256 = file_sha256(weights_file(self.weights))
            self.reference = load_reference(reference_dir / DINOV2_REFERENCE_FILE)
            check_reference_dinov2(self.reference, self.sha256)

    def __call__(self, samples: np.ndarray, out: StageOutput, desc: str) -> dict:
        if not self.weights:
            return {}
        from pipeline.metrics.fd_dinov2 import LABEL, dinov2_features, fd_dinov2, load_dinov2

        self.extractor = self.extractor or load_dinov2(self.weights, self.device)
        parts = []
        with progress(desc, len(samples), "img") as meter:
            for start in range(0, len(samples), self.batch_size):
                parts.append(dinov2_features(self.extractor, samples[start:start + self.batch_size], self.device))
                meter.advance(len(parts[-1]))
        return {"fd_dinov2": fd_dinov2(np.concatenate(parts), self.reference),
                "fd_dinov2_extractor": self.extractor.name, "dinov2_weights_sha256": self.sha256,
                "fd_dinov2_reference": self.reference["meta"]["source"], "fd_dinov2_note": LABEL}


# --- labels: where every number comes from ------------------------------------------------------


def flow_metrics(cfg: Config, sample_manifest) -> dict:
    """The flow's likelihood figures (metrics named *bits*) of the sample stage and the train_flow it read."""
    out = {f"sample.{k}": v for k, v in sample_manifest.metrics.items() if "bits" in k}
    fp = sample_manifest.upstream.get("train_flow")
    store = ArtifactStore(cfg.storage.root)
    if fp is not None and store.state("train_flow", fp) == "done":
        out |= {f"train_flow.{k}": v for k, v in store.manifest("train_flow", fp).metrics.items() if "bits" in k}
    return out


def reference_summary(reference: dict, manifest) -> dict:
    meta = reference["meta"]
    n_pr = None if reference["pr_features"] is None else len(reference["pr_features"])
    return {"source": meta.get("source"), "file": meta.get("file"), "file_sha256": meta.get("file_sha256"),
            "num_images": meta.get("num_images"), "pr_images": n_pr, "fingerprint": manifest.fingerprint}


def metrics_json(evaluations: list[dict], weights_sha256: str, classifier: dict) -> str:
    return json.dumps({"schema_version": METRICS_SCHEMA_VERSION, "inception_weights": weights_label(weights_sha256),
                       "inception_weights_sha256": weights_sha256, "evaluations": evaluations,
                       "flow_classifier": classifier}, indent=2)


def read_evaluations(path: Path, sample_sets: list[tuple[float, Path]]) -> list[dict]:
    """The entries of a partial metrics.json (a killed run) whose samples file is still the same."""
    if not path.is_file():
        return []
    files = {w: p.name for w, p in sample_sets}
    return [e for e in read_metrics(path)["evaluations"] if files.get(e["cfg_scale"]) == e["samples_file"]]


def stage_metrics(evaluations: list[dict], flow: dict, classifier: dict) -> dict:
    """Flattened for _SUCCESS.json and `srcflow status`: `fid_cfg1.0`, `is_cfg1.0`, ..., how they were made, and the
    flow as a classifier (`bayes_accuracy`, `bayes_bits_per_dim`, ...: a property of the model, no paper metric)."""
    out: dict = {f"bayes_{k.removeprefix('mean_')}": v for k, v in classifier.items()
                 if k in ("accuracy", "images", "mean_bits_per_dim", "mean_bits_per_dim_marginal",
                          "mean_bits_per_dim_uncond")}
    for e in evaluations:
        out |= {f"{short}_cfg{e['cfg_scale']}": e[key] for key, short in FLAT_NAMES.items()}
        if "fd_dinov2" in e:  # not a number of the paper (fd_dinov2_note)
            out[f"fd_dinov2_cfg{e['cfg_scale']}"] = e["fd_dinov2"]
    first = evaluations[0]
    return out | {"inception_weights": first["inception_weights"], "evaluator": first["evaluator"],
                  "evaluator_version": first["evaluator_version"], "num_samples": first["num_samples"],
                  "num_reference": first["num_reference"], **flow}


def metrics_table(evaluations: list[dict]) -> list[dict]:
    """One row per CFG scale (the Prefect table artifact)."""
    return [{"cfg_scale": e["cfg_scale"], "fid": e["fid"], "sfid": e["sfid"],
             "inception_score": e["inception_score_mean"], "kid": e["kid_mean"], "precision": e["precision"],
             "recall": e["recall"], "samples": e["num_samples"],
             "reference": e["num_reference"], "inception_weights": e["inception_weights"]} for e in evaluations]


def report_markdown(evaluations: list[dict], classifier: dict) -> str:
    e0 = evaluations[0]
    lines = ["# srcflow evaluate", ""]
    if e0["inception_weights"] != "official":
        lines += [f"**Stand-in Inception weights** (sha256 {e0['inception_weights_sha256'][:12]}..): these numbers "
                  "check the code path and are not FIDs of the method.", ""]
    lines += [f"{e0['evaluator']} {e0['evaluator_version']}, {e0['feature_extractor']}, Inception weights "
              f"{e0['inception_weights']}; {e0['num_samples']} samples per CFG scale against "
              f"{e0['reference']['source']} ({e0['reference']['num_images']} images, {e0['num_reference']} for KID "
              "and precision/recall).", ""]
    # a metric per row and a CFG scale per column: narrow enough for the Prefect UI's artifact pane
    lines += ["| metric | " + " | ".join(f"cfg {e['cfg_scale']}" for e in evaluations) + " |",
              "|---|" + "---|" * len(evaluations)]
    lines += [f"| {name} | " + " | ".join(_fmt(e[key]) for e in evaluations) + " |" for key, name in REPORT_ROWS]
    if "fd_dinov2" in e0:
        lines += ["", f"FD_DINOv2 ({e0['fd_dinov2_extractor']}, torch-fidelity's DINOv2 extractor, weights sha256 "
                  f"{e0['dinov2_weights_sha256'][:12]}.., reference: {e0['fd_dinov2_reference']}), "
                  f"{e0['fd_dinov2_note']}: "
                  + ", ".join(f"cfg {e['cfg_scale']}: {_fmt(e['fd_dinov2'])}" for e in evaluations)]
    lines += ["", "## How the samples were made", ""] + [sampling_line(e) for e in evaluations]
    if classifier.get("images"):
        c = classifier
        lines += ["", "## The flow as a classifier", "",
                  (f"A property of the model, not a published metric of the paper: the Bayes-rule class argmax_y "
                   f"log p(c | y) (uniform prior over {c['classes']} classes) on {c['images']} clean {c['split']} "
                   f"codes ({c['view']} view), no Inception involved."), "",
                  "| accuracy | bits/dim (predicted class) | bits/dim (marginal) | bits/dim (unconditional) |",
                  "|---|---|---|---|",
                  "| " + " | ".join(_fmt(c[k]) for k in ("accuracy", "mean_bits_per_dim", "mean_bits_per_dim_marginal",
                                                      "mean_bits_per_dim_uncond")) + " |"]
    for e in evaluations:
        classes = f"the first {min(GRID_CLASSES, e['num_classes'])} classes" if e["num_classes"] else "unlabelled"
        lines += ["", f"![samples, cfg {e['cfg_scale']}](grid-cfg{e['cfg_scale']}.png)", "",
                  f"*Samples at CFG scale {e['cfg_scale']} ({e['samples_file']}): up to {GRID_PER_CLASS} of each of "
                  f"{classes}, one class per row, in label order.*"]
    return "\n".join(lines) + "\n"


def sampling_line(entry: dict) -> str:
    """One line of the report per CFG scale: the sampling record's settings and its warnings."""
    m = entry["sampling"]
    passes = "; ".join(f"block {b['block']}: " + (f"{b['token_steps']} token steps" if "token_steps" in b else
                                                   f"{b['mean_passes_per_chunk']:.3g} passes per chunk (most "
                                                   f"{b['max_passes_per_chunk']}, {b['capped_chunks']} capped)")
                       for b in m["solver_stats"])
    text = (f"- cfg {entry['cfg_scale']}: {m['cfg_rule']} CFG{' annealed' if m['cfg_anneal'] else ''}, "
            f"{m['solver']} solver ({passes}), denoise {m['denoise']} ({m['denoise_setting']}), pixels "
            f"{m['pixel_rounding']}")
    return text + "".join(f"\n  - warning: {w}" for w in m["warnings"])


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else "n/a" if v is None else str(v)
