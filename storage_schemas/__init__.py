"""Every on-disk layout of srcflow, each with a schema version and a validator.

- `success`:  the `_SUCCESS.json` manifest that marks a stage output complete;
- `shards`:   the WebDataset sample fields and the Parquet manifests of the shard set;
- `zarr_layouts`: the Zarr groups (`features.zarr`, `codes.zarr`): arrays, dims, dtypes, attrs;
- `model_files`: trained models (`decoder`, `src`, `flow`: safetensors + a json to rebuild them);
- `samples`:  the ADM-format `samples-cfg{w}.npz` sample sets;
- `evaluation`: `metrics.json` of stage `evaluate`;
- `sweep`:    `sweeps/<id>/` of `srcflow sweep` (summary.json, runs.jsonl, the tables and plots).

Readers call the validators and refuse a layout or version they do not know.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ValidationError

Model = TypeVar("Model", bound=BaseModel)


class SchemaError(ValueError):
    """An on-disk layout that this code does not know; the message is one line."""


def check_version(what: str, found: object, supported: int) -> None:
    if found != supported:
        raise SchemaError(
            f"{what}: schema version {found!r} is not supported by this srcflow (reads version {supported})"
        )


def read_json_model(path: Path, model: type[Model], supported: int, what: str, older: tuple[int, ...] = ()) -> Model:
    """A JSON object file at schema version `supported` (or one of the `older` ones the model still reads),
    validated as `model`; any other content is one SchemaError line naming the file (`what`: e.g. "manifest", for
    "unreadable manifest")."""
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SchemaError(f"{path}: unreadable {what} ({e})") from None
    if not isinstance(raw, dict):
        raise SchemaError(f"{path}: unreadable {what} (a JSON object expected, got {type(raw).__name__})")
    if raw.get("schema_version") not in older:
        check_version(str(path), raw.get("schema_version"), supported)
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        raise SchemaError(f"{path}: {'.'.join(map(str, err['loc']))}: {err['msg']}") from None
