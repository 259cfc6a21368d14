"""`srcflow plan`: per stage, what a config will write and what it will cost, before anything runs.

Runs nothing and needs no dataset. Every figure says how it was obtained:
- bytes are `exact` when computed from an on-disk layout that fixes them (the uncompressed,
  sharded Zarr arrays and their commit markers) or read from a stage that is already done (the
  shard tars listed in its `_SUCCESS.json`); otherwise they are an `estimate` (JPEG sizes,
  compressed arrays, checkpoints, samples);
- peak memory per process is always an estimate, from batch sizes and parameter counts;
- hours come from measured throughputs in `benchmarks/results/*.json` where a record matches the config and the
  device kind (a GPU for `runtime.device` cuda or auto, the CPU for cpu); otherwise they are an `estimate` from the
  model's FLOPs at a stated share of the device's peak (stages/plan/compute.py). Each stage's hours are a list of
  terms, each labelled measured or estimate with its source;
- at a scale (`srcflow plan --gpus G --nodes N`, else runtime.nproc x train.torchrun_args' --nnodes) the training
  stages are planned per process (the global batch over G processes) with DDP's gradient all-reduce per step, and
  every stage gets its wall-clock hours besides its device-hours.

Image counts come from, in this order: the shard stage's index when it is done; the listing of
`data.root` when it exists; the parameters of the generated tiny dataset; ImageNet's 1,281,167
train / 50,000 val images, narrowed by `data.classes` and `data.max_per_class`.

Measured throughputs: any JSON object (at any depth) naming a stage in `"stage"` (or `"benchmark"`)
with a rate key (`rows_per_s`, `images_per_s`, `steps_per_s`, `samples_per_s`), and also the layout
that benchmarks/sample.py prints (`models.<name>.kv_cache.samples_per_s`). Scalar fields of the
enclosing objects apply to the records inside them. A record applies to a config only when it
states every identity field of that stage (`IDENTITY` below) with the config's value (a field the
config leaves None may be absent). Rates are per device: training stages are timed in samples
(steps x train batch) so that a rate measured at any per-device batch applies.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from pipeline.config import Config
from stages.plan.compute import Target, cpu_target, gpu_target, stage_hours
from stages.plan.dataset import dataset_counts
from stages.plan.measured import RESULTS_DIR, load_measurements
from stages.plan.scale import Scale, scale_of
from stages.plan.sizers import SIZERS


def capacity_plan(cfg: Config, results_dir: Path = RESULTS_DIR, scale: Scale | None = None,
                  target: Target | None = None) -> dict:
    """The whole plan as JSON-ready data: dataset counts, the scale and device, one entry per enabled stage, totals.
    `scale` defaults to the config's (scale_of), `target` to a GPU (the one the records name) unless
    runtime.device is cpu."""
    from stages import STAGES

    scale = scale or scale_of(cfg)
    states, note = stage_states(cfg)
    data = dataset_counts(cfg, states.get("shard"))
    measured = load_measurements(results_dir)
    target = target or (cpu_target() if cfg.runtime.device == "cpu" else gpu_target(measured))
    plans = []
    for stage in STAGES:
        if not stage.enabled(cfg):
            continue
        p = SIZERS[stage.name](cfg, data, scale)
        planned = states.get(stage.name)
        p.state = planned.state if planned else "unknown"
        if planned is not None and planned.state == "done":
            from pipeline.artifacts import ArtifactStore

            p.written_bytes = ArtifactStore(cfg.storage.root).manifest(stage.name, planned.fingerprint).bytes
        p.hours = stage_hours(p, cfg, data, measured, target, scale)
        p.memory["node_host_bytes"] = p.memory["host_bytes"] * p.processes
        plans.append(p)
    gpu_stages = [p for p in plans if p.stage != "shard"]
    wall = sum(p.hours["wall_hours"] for p in plans)
    return {
        "storage_root": cfg.storage.root,
        "dataset": {k: v for k, v in asdict(data).items() if k not in ("train_per_class", "tar_files")},
        "states_note": note,
        "scale": {"nodes": scale.nodes, "processes_per_node": scale.per_node, "gpus": scale.gpus,
                  "source": scale.source, "intra_node_gbs": scale.intra_node_gbs,
                  "inter_node_gbs": scale.inter_node_gbs},
        "device": {"name": target.name, "kind": target.kind, "peak_tflops": target.tflops, "source": target.source},
        "stages": [{**asdict(p), "bytes": p.bytes, "peak_bytes": p.peak_bytes} for p in plans],
        "total_bytes": sum(p.bytes for p in plans),
        "total": {"wall_hours": wall,
                  "device_hours": sum(p.hours["device_hours"] for p in gpu_stages),
                  "allocated_device_hours": sum(p.hours["wall_hours"] for p in gpu_stages) * scale.gpus,
                  "estimate": any(p.hours["estimate"] for p in plans)},
    }


def stage_states(cfg: Config) -> tuple[dict, str]:
    """runner.plan's view of the store, when it can be had without running anything."""
    from stages.runner import plan

    if not Path(cfg.data.root).is_dir():  # never generate the tiny dataset or scan a missing one
        return {}, f"data.root {cfg.data.root} does not exist: stage states unknown"
    try:
        return {p.name: p for p in plan(cfg)}, ""
    except (OSError, ValueError) as e:  # a missing weights file, a foreign folder at data.root, ...
        return {}, f"stage states unknown: {e}"

