"""Trained models in the store: `<name>.safetensors` (EMA weights) beside `<name>.json` (how to rebuild it).

    fit_decoder/<fp>/decoder.{safetensors,json}  json: arch (RAEDecoder kwargs), steps, pixels
    fit_src/<fp>/src.{safetensors,json}          json: kind, arch, dim, noise_sigma, decoder_noise_sigma, model
                                                       (SRC kwargs), features_fingerprint
    train_flow/<fp>/flow.{safetensors,json}      json: arch (TARFlow kwargs), noise_sigma, classes, views,
                                                       codes_fingerprint, code_stats
Each json carries `schema_version`, per model (VERSIONS); `read_model_info` refuses another version or missing keys.
src 2: decoder_noise_sigma, the code noise the SRC decoder was trained under (src.noise_sigma for a learned SRC,
0 for PCA, which never sees noise); noise_sigma stays the configured src.noise_sigma.
flow 2: classes, the sorted labels the flow was trained on (its train codes' labels); under a class subset
(data.classes) labels keep their ImageNet numbers, so arch.num_classes (max label + 1) can exceed them.
"""

from __future__ import annotations

import json
from pathlib import Path

from storage_schemas import SchemaError, check_version

VERSIONS = {"decoder": 1, "src": 2, "flow": 2}

REQUIRED = {
    "decoder": ("arch",),
    "src": ("kind", "arch", "dim", "decoder_noise_sigma", "model"),
    "flow": ("arch", "noise_sigma", "classes", "code_stats"),
}
MADE_BY = {"decoder": "fit_decoder", "src": "fit_src", "flow": "train_flow"}


def model_info(model: str, /, **fields) -> str:
    """The json text for a `model` (decoder, src or flow)."""
    missing = [k for k in REQUIRED[model] if k not in fields]
    if missing:
        raise ValueError(f"{model}.json needs {missing}")
    return json.dumps({"schema_version": VERSIONS[model], **fields}, indent=1)


def read_model_info(directory: str | Path, kind: str) -> dict:
    path = Path(directory) / f"{kind}.json"
    try:
        info = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SchemaError(f"{path}: unreadable {kind} description ({type(e).__name__}); expected the output of "
                          f"stage {MADE_BY[kind]}") from None
    check_version(str(path), info.get("schema_version"), VERSIONS[kind])
    missing = [k for k in REQUIRED[kind] if k not in info]
    if missing:
        raise SchemaError(f"{path}: missing {', '.join(missing)}")
    return info
