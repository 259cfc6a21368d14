"""Measured throughputs (benchmarks/results/*.json) and the device-hours they give a stage of a config."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import Config
from pipeline.models.configured import encoder_depth
from stages.plan.sizers import geometry, param_count

RATE_KEYS = {"rows_per_s": "rows", "images_per_s": "images", "steps_per_s": "steps", "samples_per_s": "samples"}
RESULTS_DIR = Path(__file__).resolve().parents[2] / "benchmarks" / "results"


@dataclass(frozen=True)
class Measurement:
    stage: str
    unit: str
    rate: float
    device: str
    source: str
    fields: dict

    @property
    def kind(self) -> str:
        """cpu or gpu: a record says `"device": "cpu"` when it ran on the CPU (else it names the GPU or says cuda)."""
        return "cpu" if self.fields.get("device") == "cpu" else "gpu"


def _params_m(model: str, cfg: Config) -> float:  # as the benchmarks print it
    return round(param_count(model, cfg) / 1e6, 2)


def _encode(cfg: Config) -> dict:
    tokens, channels = geometry(cfg)
    return {"encoder_name": cfg.encoder.name, "input_size": cfg.encoder.input_size, "tokens": tokens,
            "channels": channels, "depth": encoder_depth(cfg), "encode_precision": cfg.encode.precision}


def _trained(model: str) -> Callable[[Config], dict]:
    """A model's size and its input's shape: the flow's input is the codes (src.dim channels)."""
    def fields(cfg: Config) -> dict:
        tokens, channels = geometry(cfg)
        return {"params_m": _params_m(model, cfg), "tokens": tokens,
                "channels": cfg.src.dim if model == "flow" else channels}
    return fields


def _sample(cfg: Config) -> dict:
    f, (tokens, _) = cfg.flow, geometry(cfg)
    return {"width": f.width, "heads": f.heads, "num_blocks": f.num_blocks, "layers_per_block": f.layers_per_block,
            "deep_layers": f.deep_layers, "tokens": tokens, "channels": cfg.src.dim}


# The one identity table: the fields, with this config's values, that a throughput record must state to apply
# to a stage. A stage not listed (shard, reference, evaluate) takes any record of its name.
IDENTITY: dict[str, Callable[[Config], dict]] = {
    "encode": _encode,
    "compress": _trained("src"),
    "fit_decoder": _trained("decoder"),
    "fit_src": _trained("src"),
    "train_flow": _trained("flow"),
    "sample": _sample,
}


def identity(cfg: Config, stage: str) -> dict:
    return IDENTITY[stage](cfg) if stage in IDENTITY else {}


def load_measurements(results_dir: Path = RESULTS_DIR) -> list[Measurement]:
    found: list[Measurement] = []
    for path in sorted(Path(results_dir).glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        found.extend(_records(data, {}, path.name, None))
    return found


def _records(node, context: dict, source: str, key: str | None) -> list[Measurement]:
    if isinstance(node, list):
        return [m for item in node for m in _records(item, context, source, key)]
    if not isinstance(node, dict):
        return []
    here = {**context, **{k: v for k, v in node.items() if not isinstance(v, (dict, list))}}
    stage = node.get("stage") or node.get("benchmark") or ("sample" if key == "kv_cache" else None)  # sample.py
    device = str(here.get("device_name") or here.get("device") or "unknown device")
    found = [Measurement(stage, unit, float(node[k]), device, source, here) for k, unit in RATE_KEYS.items()
             if stage and isinstance(node.get(k), (int, float)) and not isinstance(node[k], bool) and node[k] > 0]
    for k, v in node.items():
        if isinstance(v, (dict, list)):
            found.extend(_records(v, here, source, k))
    return found


def device_hours(stage: str, work: dict[str, int], expect: dict, measured: list[Measurement],
                 accept: Callable[[Measurement], bool] | None = None) -> tuple[dict | None, str]:
    """Hours of `work` ({unit: amount}) on one measured device that `accept`s (None: any, a GPU first); else
    (None, why not)."""
    fits = [m for m in measured if m.stage == stage and m.unit in work and (accept is None or accept(m))
            and all(m.fields.get(k) == v if k in m.fields else v is None for k, v in expect.items())]
    if not fits:
        others = sorted({m.source for m in measured if m.stage == stage})
        why = f" (other models or devices only: {', '.join(others)})" if others else ""
        return None, "not measured" + why
    best = min(fits, key=lambda m: (m.kind == "cpu", -m.rate))  # a GPU first, then the fastest
    return ({"hours": work[best.unit] / best.rate / 3600, "device": best.device, "rate": best.rate,
             "unit": f"{best.unit}/s", "source": best.source, "cpu_count": best.fields.get("cpu_count")}, "")

