"""`srcflow rehearse`: every stage of a config run once at the config's real model shapes, on this machine, in a
scratch store, each measured in a process of its own beside what the planner predicts for the same work.

Only amounts shrink: the classes and images read (the data keeps all of the config's classes, so the labels and the
flow's class embeddings are the real ones), training steps, samples, reference and evaluation images, and batch
sizes where this machine cannot hold the config's per-process batch (the planner's memory estimate against a
budget; the plan is then made for the batch used, and the report says so). Data: the config's data.root when it
exists (a slice of it), else a stand-in (standin.py). Weights: the config's files where they exist; random ones in
the released file forms otherwise (or for all with `weights="random"`), and every figure resting on them is
labelled. Then the planner's whole-run estimate is recomputed from the rates measured here.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline.config import Config, config_dict, load_config, validate_config

log = logging.getLogger("srcflow")

RATIO_BOUNDS = (0.67, 1.5)  # planned vs measured: outside these, the planner is wrong for this stage
MARKER = "rehearsal.json"  # in a scratch folder a rehearsal may clear and reuse


@dataclass(frozen=True)
class Amounts:
    """What a rehearsal reads and makes: small, at the config's real shapes."""

    classes: int = 2  # classes whose images are read, spread over all of the config's (first and last included)
    images_per_class: int = 2  # train images of each class read
    val_per_class: int = 1
    steps: int = 1  # of every training stage
    samples_per_class: int = 1
    sample_classes: int = 4  # the flow's first classes sampled, per CFG scale
    cfg_scales: int = 1  # of the config's sample.cfg_scale: its first (2: and last; more: evenly between)
    reference_images: int = 8  # reference.max_images, or the images of the ADM batch
    eval_images: int = 1  # held-out images of the fit reports and of the flow's Bayes-rule classifier

    def check(self) -> None:
        for name, value in asdict(self).items():
            if value < 1:
                raise ValueError(f"--{name.replace('_', '-')}: {value} must be at least 1")
        from stages.evaluate import PR_K  # precision/recall's k nearest neighbours need k + 1 of each

        if self.samples_per_class * self.sample_classes <= PR_K or self.reference_images <= PR_K:
            raise ValueError(f"--sample-classes x --samples-per-class ({self.sample_classes * self.samples_per_class})"
                             f" and --reference-images ({self.reference_images}) must exceed {PR_K}: evaluate's "
                             f"precision/recall takes {PR_K} nearest neighbours")


def rehearse(config: str | Path, overrides: list[str] | tuple[str, ...] = (), amounts: Amounts = Amounts(),
             weights: str = "auto", scratch: Path | None = None, keep: bool = False,
             memory_gb: float | None = None, results_dir: Path | None = None) -> dict:
    """Run the rehearsal of `config` (+ overrides) and return its report (README "Rehearsal")."""
    from stages.plan.measured import RESULTS_DIR

    started = time.perf_counter()
    amounts.check()
    if weights not in ("auto", "real", "random"):
        raise ValueError(f"--weights: {weights!r} is not auto, real or random")
    full = load_config(config, overrides)  # a bad key or shapes that do not fit: one line, before anything runs
    work = _scratch(scratch, full)
    cache = os.environ.get("SRCFLOW_CACHE_DIR")
    os.environ["SRCFLOW_CACHE_DIR"] = str(work / "cache")  # listing and weight-check caches stay in the scratch
    try:
        device, device_note = _device(full)
        target = _target(device)
        budget = _budget(device, memory_gb)
        data, data_root, classes = _data(full, amounts, work)
        files = _weights(full, weights, work / "weights", amounts)
        flow_classes = data["classes_read"]  # the flow learns and samples the classes it was trained on
        cfg = rehearsal_config(full, work / "store", device, data_root, classes, files, amounts, flow_classes)
        cfg, batches = fit_batches(cfg, full, budget, target, results_dir or RESULTS_DIR)
        report = {
            "config": str(config), "overrides": list(overrides), "scratch": str(work),
            "device": {"name": target.name, "kind": target.kind, "note": device_note,
                       "peak_tflops": target.tflops, "source": target.source},
            "memory_budget_bytes": budget, "amounts": asdict(amounts), "data": data,
            "weights": files, "random_weights": any(f["random"] for f in files.values()),
            "batches": batches, "ratio_bounds": list(RATIO_BOUNDS),
        }
        report["stages"] = run_stages(cfg, work, target, results_dir or RESULTS_DIR, report)
        report["whole_run"] = whole_run(full, report["stages"], target, results_dir or RESULTS_DIR)
        report["within_bounds"] = {k: all(_within(s.get(f"{k}_ratio")) for s in report["stages"].values())
                                   for k in ("peak_rss", "seconds", "bytes")}
        report["wall_seconds"] = time.perf_counter() - started
        (work / MARKER).write_text(json.dumps(report, indent=1, default=str))
        return report
    finally:
        if cache is None:
            os.environ.pop("SRCFLOW_CACHE_DIR", None)
        else:
            os.environ["SRCFLOW_CACHE_DIR"] = cache
        if not keep and scratch is None:
            shutil.rmtree(work, ignore_errors=True)


# --- where, on what, with what --------------------------------------------------------------------------------


def _scratch(scratch: Path | None, cfg: Config) -> Path:
    """A fresh scratch folder (a temporary one by default); never the config's storage.root nor inside it."""
    if scratch is None:
        return Path(tempfile.mkdtemp(prefix="srcflow-rehearse-"))
    scratch = Path(scratch).absolute()
    root = Path(cfg.storage.root).absolute()
    if scratch == root or root in scratch.parents or scratch in root.parents:
        raise ValueError(f"--scratch: {scratch} overlaps storage.root {root}; a rehearsal never writes the real store")
    if scratch.exists() and any(scratch.iterdir()):
        if not (scratch / MARKER).exists() and not (scratch / "store").exists():
            raise ValueError(f"--scratch: {scratch} is not empty and holds no earlier rehearsal; use an empty folder")
        shutil.rmtree(scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    return scratch


def _device(cfg: Config) -> tuple[str, str]:
    import torch

    want = cfg.runtime.device
    if want in ("cuda", "auto") and torch.cuda.is_available():
        return "cuda", ""
    if want == "cuda":
        return "cpu", "runtime.device is cuda but no GPU is visible here: the stages run on the CPU, where device " \
                      "memory is host memory"
    return "cpu", ""


def _target(device: str):
    from stages.plan.compute import cpu_target, gpu_target
    from stages.plan.measured import Measurement

    if device == "cuda":
        import torch

        name = torch.cuda.get_device_name()
        return gpu_target([Measurement("", "", 1.0, name, "this GPU", {"device": "cuda"})])
    return cpu_target(cpu_gflops(), gbs=cpu_gbs())


def cpu_gflops(windows: int = 5, n: int = 2048) -> float:
    """This process's fp32 matmul rate (n x n, torch's threads), the best of a few windows (on a shared machine
    the others are other processes' time): the CPU's peak that the estimates scale."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm the kernels and the threads
    best = 0.0
    for _ in range(windows):
        t0 = time.perf_counter()
        a @ b
        best = max(best, 2 * n**3 / (time.perf_counter() - t0) / 1e9)
    return best


def cpu_gbs(windows: int = 5, megabytes: int = 256) -> float:
    """This process's memory bandwidth (a copy of `megabytes` reads and writes each byte), the best of a few windows."""
    import torch

    a = torch.ones(megabytes * 2**18)
    b = torch.empty_like(a)
    b.copy_(a)
    best = 0.0
    for _ in range(windows):
        t0 = time.perf_counter()
        b.copy_(a)
        best = max(best, 2 * a.numel() * 4 / (time.perf_counter() - t0) / 1e9)
    return best


def _budget(device: str, memory_gb: float | None) -> int:
    """The memory one stage's process may plan to use: --memory-gb, else 80 % of what is available now (host) or of
    the GPU's memory."""
    if memory_gb is not None:
        if memory_gb <= 0:
            raise ValueError(f"--memory-gb: {memory_gb} must be positive")
        return int(memory_gb * 2**30)
    if device == "cuda":
        import torch

        return int(0.8 * torch.cuda.get_device_properties(0).total_memory)
    import psutil

    return int(0.8 * psutil.virtual_memory().available)


def _data(cfg: Config, amounts: Amounts, work: Path) -> tuple[dict, Path, list[str] | None]:
    """(what was used, data.root for the rehearsal, data.classes: the synsets read, or None for a generated tiny
    set). The config's data.root when it exists (a slice: spread classes, max_per_class), else a stand-in."""
    from pipeline.data.imagenet import detect_layout, list_synsets
    from stages.plan.dataset import IMAGENET_CLASSES
    from stages.rehearse.standin import make_standin_imagenet, spread, standin_synsets

    root = Path(cfg.data.root)
    if root.is_dir() and any(root.iterdir()):
        synsets = list_synsets(root, detect_layout(root) if cfg.data.layout == "auto" else cfg.data.layout)
        if isinstance(cfg.data.classes, list):
            synsets = [s for s in synsets if s in set(cfg.data.classes)]
        elif cfg.data.classes is not None:
            synsets = synsets[:cfg.data.classes]
        read = spread(synsets, amounts.classes)
        return {"source": f"a slice of data.root {root}", "classes": len(synsets), "classes_read": len(read),
                "max_per_class": amounts.images_per_class}, root, read
    if cfg.data.generate_tiny is not None:  # the smoke config's own generated set, made in the scratch
        tiny = cfg.data.generate_tiny
        return {"source": "the config's generate_tiny set, generated in the scratch", "classes": tiny.classes,
                "classes_read": min(amounts.classes, tiny.classes)}, work / "data", None
    count = (len(cfg.data.classes) if isinstance(cfg.data.classes, list) else cfg.data.classes) or IMAGENET_CLASSES
    synsets = standin_synsets(count)
    read = spread(synsets, amounts.classes)
    made = make_standin_imagenet(work / "imagenet", synsets, read, amounts.images_per_class, amounts.val_per_class)
    return {"source": f"stand-in ({root} does not exist here)", **made}, work / "imagenet", read


# config key -> (writer kind, when the config uses it)
WEIGHT_KEYS = {
    "encoder.weights": ("encoder", lambda c: c.encoder.weights != "random"),
    "decoder.weights": ("decoder", lambda c: c.decoder.weights is not None),
    "evaluate.inception_weights": ("inception", lambda c: True),
    "reference.path": ("reference", lambda c: c.reference.kind == "adm_npz"),
    "encode.stats_file": ("stats", lambda c: c.encode.stats == "file"),
}


def _weights(cfg: Config, mode: str, folder: Path, amounts: Amounts) -> dict[str, dict]:
    """{config key: {path, form, random}} for every weights file the config reads: its own file (mode auto or real;
    an ADM batch is sliced to amounts.reference_images), or random weights in the released form (mode random, or
    auto when the file is missing)."""
    from pipeline.config import select
    from stages.rehearse.standin import write_random_weights

    used, missing = {}, []
    for key, (kind, applies) in WEIGHT_KEYS.items():
        if not applies(cfg):
            continue
        path = select(cfg, key)
        if mode != "random" and path and Path(path).is_file():
            used[key] = {"path": str(path), "form": "the config's file", "random": False}
        elif mode == "real":
            raise FileNotFoundError(f"{key}: {path} does not exist (--weights real uses the config's files; "
                                    f"--weights random writes random ones in the released forms)")
        else:
            missing.append(kind)
    if "reference.path" in used:  # the real ADM batch, its images cut to the rehearsal's amount
        used["reference.path"] = _slice_adm(Path(used["reference.path"]["path"]), folder, amounts.reference_images)
    written = write_random_weights(cfg, missing, folder) if missing else {}
    return used | {k: {**v, "random": True} for k, v in written.items()}


def _slice_adm(path: Path, folder: Path, images: int) -> dict:
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    out = folder / path.name
    with np.load(path, mmap_mode="r") as npz:
        np.savez(out, **{k: (npz[k][:images] if k == "arr_0" else npz[k]) for k in npz.files})
    return {"path": str(out), "form": f"the config's ADM batch, its first {images} images", "random": False}


def rehearsal_config(full: Config, store: Path, device: str, data_root: Path, classes: list[str] | None,
                     files: dict[str, dict], amounts: Amounts, flow_classes: int) -> Config:
    """The config with the amounts shrunk and the rehearsal's store, data and weights; every shape kept.
    `classes`: the synsets read (None: the first of a generated tiny set); `flow_classes`: the labels' range."""
    from stages.evaluate import PR_K
    from stages.rehearse.standin import spread

    steps, val = amounts.steps, amounts.classes * amounts.val_per_class
    report = min(amounts.eval_images, val)
    # samples for evaluate's precision/recall: more than its k neighbours, from the flow's first classes
    sampled = min(amounts.sample_classes, flow_classes)
    per_class = max(amounts.samples_per_class, math.ceil((PR_K + 1) / sampled))
    samples = per_class * sampled
    real_data = classes is not None and Path(data_root) == Path(full.data.root)
    values = {
        "storage.root": str(store), "runtime.device": device, "runtime.workers": 1, "runtime.nproc": 1,
        "runtime.dask_address": None, "runtime.progress": False, "shard.workers": 1, "train.torchrun_args": None,
        "data.root": str(data_root),
        # the generated tiny set: made in the scratch, its first classes; else the synsets read
        "data.classes": min(amounts.classes, full.data.generate_tiny.classes) if classes is None else classes,
        "data.max_per_class": amounts.images_per_class if classes is None or real_data else None,
        # the tiny set is generated only where data.generate_tiny.root names: the scratch's data folder
        **({"data.generate_tiny.root": str(data_root)} if classes is None else {"data.generate_tiny": None}),
        **{key: f["path"] for key, f in files.items()}, "evaluate.make_standin": False,
        **{f"{section}.{key}": value for section in ("fit_decoder", "src", "train")
           for key, value in (("steps", steps), ("ckpt_every", steps), ("log_every", 1))},
        "fit_decoder.warmup_steps": min(full.fit_decoder.warmup_steps or steps // 16, steps),
        "src.warmup_steps": min(full.src.warmup_steps, steps),
        "train.warmup_steps": min(full.train.warmup_steps, steps),
        "fit_decoder.report_images": min(full.fit_decoder.report_images or report, report),
        "src.report_images": min(full.src.report_images, report),
        "sample.per_class": per_class, "sample.classes": amounts.sample_classes,
        "sample.cfg_scale": spread(list(dict.fromkeys(full.sample.cfg_scale)), amounts.cfg_scales),
        "sample.batch_size": min(full.sample.batch_size, samples),
        "reference.max_images": max(2, min(full.reference.max_images or amounts.reference_images,
                                           amounts.reference_images)),
        "reference.pr_images": max(4, min(full.reference.pr_images, amounts.reference_images)),
        "evaluate.kid_subset_size": max(2, min(full.evaluate.kid_subset_size, samples, amounts.reference_images)),
        "evaluate.bayes_max_images": min(full.evaluate.bayes_max_images or report, report),
        "reference.allow_class_subset": True,  # a few classes read of the config's; its scores are no result
    }
    raw = config_dict(full)
    for key, value in values.items():
        _put(raw, key, value)
    return validate_config(raw, source="the rehearsal config")


# --- batch sizes that fit ------------------------------------------------------------------------------------


def fit_batches(cfg: Config, full: Config, budget: int, target, results_dir: Path) -> tuple[Config, dict]:
    """Each stage's batch: the config's per-process one (a training batch over all of its processes), no larger
    than the rehearsal's rows, halved while the planner's peak for the stage exceeds `budget`. Returns the config
    and, per stage, {key, config, used, why}."""
    from pipeline.config import select
    from stages.plan.scale import scale_of

    scale = scale_of(full)
    raw = config_dict(cfg)
    chosen = {}
    for _ in range(64):  # each round halves at least one batch, or stops
        report = _plan(cfg, target, results_dir)
        plans = {s["stage"]: s for s in report["stages"]}
        changed = False
        for name, s in plans.items():
            key = s["batch_key"]
            if key in ("shard.workers", ""):
                continue
            value = select(cfg, key)
            if name not in chosen:
                per_process = (math.ceil(select(full, key) / scale.gpus) if name in TRAINING_BATCH
                               else select(full, key))
                chosen[name] = {"key": key, "config": per_process, "used": value, "why": []}
                if name in TRAINING_BATCH:
                    rows = report["dataset"]["train"] * len(cfg.encode.views)  # train rows (images x views)
                    value = max(1, min(per_process, rows))
                    if value < per_process:
                        chosen[name]["why"].append(f"{rows} training rows here")
                    _put(raw, key, value)
                    if value != select(cfg, key):
                        changed = True
                        continue  # its plan is for the config's batch: planned again next round
            need = planned_peak(s, target)
            if need > budget and value > 1:
                _put(raw, key, max(1, value // 2))
                if "memory" not in " ".join(chosen[name]["why"]):
                    chosen[name]["why"].append(f"planned memory above the {budget / 2**30:.1f} GiB budget")
                changed = True
        cfg = validate_config(raw, source="the rehearsal config")
        if not changed:
            break
    for c in chosen.values():
        c["used"] = select(cfg, c["key"])
        c["why"] = "; ".join(c["why"]) or ("as configured" if c["used"] == c["config"] else "the rehearsal's amounts")
    return cfg, chosen


TRAINING_BATCH = ("fit_decoder", "fit_src", "train_flow")


def _put(raw: dict, key: str, value) -> None:
    """raw["a"]["b"] = value for key "a.b"."""
    *sections, name = key.split(".")
    for part in sections:
        raw = raw.setdefault(part, {})
    raw[name] = value


def _plan(cfg: Config, target, results_dir: Path) -> dict:
    from stages.plan import capacity_plan
    from stages.plan.scale import Scale

    return capacity_plan(cfg, results_dir=results_dir, scale=Scale(1, 1, "this machine"), target=target)


def planned_peak(stage_plan: dict, target) -> int:
    """The planned peak of one process: on a CPU its device memory is host memory too."""
    m = stage_plan["memory"]
    return m["host_bytes"] + (m["device_bytes"] if target.kind == "cpu" else 0)


# --- running and measuring ------------------------------------------------------------------------------------


def run_stages(cfg: Config, work: Path, target, results_dir: Path, report: dict) -> dict[str, dict]:
    """Preflight (the real checks of `srcflow run`), then each stage in its own process, beside its plan. A stage
    that fails, or whose plan cannot fit this machine even at batch 1, stops the rehearsal: `report["stopped"]`
    holds its one-line error and `report["not_run"]` the plan of it and of every stage after it."""
    from stages.runner import plan, preflight

    planned_stages = plan(cfg)
    preflight(planned_stages, cfg)
    plans = {s["stage"]: s for s in _plan(cfg, target, results_dir)["stages"]}  # the listing counts the images
    measured = {}
    for i, p in enumerate(planned_stages):
        s = plans[p.name]
        need = planned_peak(s, target)
        if need > report["memory_budget_bytes"]:
            error = (f"{p.name}: cannot fit this machine: the planner predicts {need / 2**30:.1f} GiB per process at "
                     f"{s['batch_key']}={_value(cfg, s['batch_key'])} ({s['memory']['basis']}), over the "
                     f"{report['memory_budget_bytes'] / 2**30:.1f} GiB budget (--memory-gb)")
        else:
            log.info("rehearse: %s (planned %s, %.1f GiB peak)", p.name, _hours_text(s), need / 2**30)
            result = _run_one(cfg, p.name, work)
            error = f"rehearse: stage {result['error']}" if "error" in result else None
        if error:
            report["stopped"] = {"stage": p.name, "error": error}
            report["not_run"] = {q.name: _planned_only(plans[q.name], target, report) for q in planned_stages[i:]}
            return measured
        measured[p.name] = _compare(p.name, result, s, target, report)
        log.info("rehearse: %s done in %.1f s, peak %.2f GiB (planned %.2f GiB)", p.name, result["seconds"],
                 result["peak_rss_bytes"] / 2**30, need / 2**30)
    return measured


def _planned_only(s: dict, target, report: dict) -> dict:
    """What the planner predicts for a stage the rehearsal could not run."""
    return {"planned_seconds": s["hours"]["device_hours"] * 3600, "planned_peak_rss_bytes": planned_peak(s, target),
            "planned_bytes": s["bytes"], "memory_basis": s["memory"]["basis"],
            "batch": report["batches"].get(s["stage"]), "hours_terms": s["hours"]["terms"]}


def _value(cfg: Config, key: str):
    from pipeline.config import select

    return select(cfg, key) if key else None


def _hours_text(s: dict) -> str:
    return f"{s['hours']['device_hours'] * 3600:.1f} s"


def _run_one(cfg: Config, stage: str, work: Path) -> dict:
    request, result = work / f"request-{stage}.json", work / f"result-{stage}.json"
    request.write_text(json.dumps({"config": config_dict(cfg), "stage": stage}))
    result.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[2]),
                                                          os.environ.get("PYTHONPATH", "")])}
    try:  # the child's log goes where ours goes: stderr itself, or (a stream without a file) through a pipe
        sys.stderr.fileno()
        out = sys.stderr
    except (AttributeError, OSError):  # io.UnsupportedOperation is an OSError
        out = subprocess.PIPE
    proc = subprocess.run([sys.executable, "-m", "stages.rehearse.measure", str(request), str(result)],
                          env=env, stdout=out, stderr=subprocess.STDOUT if out is subprocess.PIPE else None,
                          text=True, check=False)
    if out is subprocess.PIPE:
        sys.stderr.write(proc.stdout)
    if not result.exists():
        return {"error": f"{stage}: the measuring process ended with exit status {proc.returncode} and no result "
                         f"(killed, e.g. by the OOM killer?)"}
    return json.loads(result.read_text())


def _ratio(measured, planned):
    return measured / planned if measured is not None and planned else None


def _within(ratio) -> bool:
    return ratio is None or RATIO_BOUNDS[0] <= ratio <= RATIO_BOUNDS[1]


UNITS = {"rows_per_s": "rows", "samples_per_s": "samples", "steps_per_s": "steps"}


def _compare(name: str, result: dict, s: dict, target, report: dict) -> dict:
    """One stage's measured figures beside the plan's, with their ratios (measured / planned)."""
    planned_seconds = s["hours"]["device_hours"] * 3600
    peak = max(result["peak_rss_bytes"], result.get("children_peak_rss_bytes", 0))
    work = s["timed_in"] or {s["unit"]: s["work"]}
    unit, amount = next(iter(work.items()))
    rate = _stage_rate(result["metrics"], unit, s) or amount / max(result["seconds"], 1e-9)
    out = {
        "seconds": result["seconds"], "cpu_seconds": result.get("cpu_seconds"), "planned_seconds": planned_seconds,
        "seconds_ratio": _ratio(result["seconds"], planned_seconds),
        "work": amount, "unit": unit, "rate": rate,
        "planned_rate": amount / planned_seconds if planned_seconds else None,
        "peak_rss_bytes": peak, "planned_peak_rss_bytes": planned_peak(s, target),
        "peak_rss_ratio": _ratio(peak, planned_peak(s, target)),
        "rss_before_bytes": result.get("rss_before_bytes"), "startup_seconds": result.get("startup_seconds"),
        "bytes_written": result["bytes_written"], "planned_bytes": s["bytes"],
        "bytes_ratio": _ratio(result["bytes_written"], s["bytes"]),
        "batch": report["batches"].get(name), "memory_basis": s["memory"]["basis"],
        "hours_terms": s["hours"]["terms"], "random_weights": _rests_on_random(name, report),
    }
    if target.kind == "gpu":
        out |= {"peak_device_bytes": result.get("peak_device_bytes"),
                "planned_peak_device_bytes": s["memory"]["device_bytes"],
                "peak_device_ratio": _ratio(result.get("peak_device_bytes"), s["memory"]["device_bytes"])}
    return out


def _stage_rate(metrics: dict, unit: str, s: dict) -> float | None:
    """The stage's own rate of its loop (start-up left out), in the plan's unit, where it reports one."""
    if unit == "rows" and metrics.get("rows_per_s"):
        return metrics["rows_per_s"]
    if unit == "samples" and s["stage"] == "sample" and metrics.get("samples_per_s"):
        return metrics["samples_per_s"]
    if unit == "samples" and metrics.get("steps_per_s") and s["work"]:
        return metrics["steps_per_s"] * (s["timed_in"]["samples"] / s["work"])  # steps/s x batch
    return None


# which weights each stage's figures rest on (random weights make its outputs, not its costs, meaningless)
RESTS_ON = {"encode": ("encoder.weights",), "fit_decoder": ("encoder.weights",),
            "fit_src": ("encoder.weights", "decoder.weights"), "compress": ("encoder.weights",),
            "train_flow": ("encoder.weights",), "sample": ("encoder.weights", "decoder.weights"),
            "reference": ("evaluate.inception_weights", "reference.path"),
            "evaluate": ("evaluate.inception_weights", "reference.path", "encoder.weights", "decoder.weights")}


def _rests_on_random(stage: str, report: dict) -> bool:
    return any(report["weights"].get(k, {}).get("random") or (k == "encoder.weights" and k not in report["weights"])
               for k in RESTS_ON.get(stage, ()))


def whole_run(full: Config, stages: dict[str, dict], target, results_dir: Path) -> dict:
    """The planner's estimate of the config's whole run on this machine's device, and the same recomputed from what
    was measured here: each stage's compute terms scaled by its measured / planned seconds for the rehearsal's work
    (the same terms at a smaller amount; communication terms kept). On a GPU at the config's scale; on a CPU for
    one process (a CPU is not a cluster)."""
    from stages.plan import capacity_plan
    from stages.plan.scale import Scale, scale_of

    scale = scale_of(full) if target.kind == "gpu" else Scale(1, 1, "one process on this CPU")
    plan = capacity_plan(full, results_dir=results_dir, scale=scale, target=target)
    out = {}
    for s in plan["stages"]:
        m = stages.get(s["stage"])
        h = s["hours"]
        factor = m["seconds_ratio"] if m else None
        comm = sum(t["hours"] for t in h["terms"] if t["term"].startswith("DDP"))
        recomputed = None if factor is None else (h["device_hours"] - comm) * factor + comm
        wall = None if recomputed is None else h["wall_hours"] * recomputed / max(h["device_hours"], 1e-12)
        out[s["stage"]] = {"work": s["work"], "unit": s["unit"], "planned_device_hours": h["device_hours"],
                           "planned_wall_hours": h["wall_hours"], "recomputed_device_hours": recomputed,
                           "recomputed_wall_hours": wall, "factor": factor, "communication_hours": comm}
    done = [v for v in out.values() if v["recomputed_device_hours"] is not None]
    return {"device": target.name, "scale": plan["scale"], "stages": out,
            "planned_wall_hours": plan["total"]["wall_hours"],
            "recomputed_wall_hours": sum(v["recomputed_wall_hours"] for v in done)
            + sum(v["planned_wall_hours"] for v in out.values() if v["recomputed_device_hours"] is None)}
