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


class SchemaError(ValueError):
    """An on-disk layout that this code does not know; the message is one line."""


def check_version(what: str, found: object, supported: int) -> None:
    if found != supported:
        raise SchemaError(
            f"{what}: schema version {found!r} is not supported by this srcflow (reads version {supported})"
        )
