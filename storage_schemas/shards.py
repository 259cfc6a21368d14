"""The shard set written by `shard`: WebDataset tars plus Parquet manifests.

    shards/{split}-{NNNNNN}.tar     samples `<key>.jpg`, `<key>.cls`, `<key>.json`
    manifest.parquet                one row per stored sample (MANIFEST_SCHEMA)
    rejected.parquet                one row per file that could not be decoded (REJECTED_SCHEMA)
    shards.json                     {"schema_version", "splits": {split: {"shards", "samples"}}, ...}
    parts/{split}-{NNNNNN}.{manifest,rejected}.parquet   each shard's rows of the two tables
    commits/{k:06d}.npz             shard k's commit marker: size and CRC-32C of its tar and parts
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from storage_schemas import SchemaError, check_version

SCHEMA_VERSION = 1
INDEX = "shards.json"

# WebDataset sample fields: extension -> what it holds.
SAMPLE_FIELDS = {
    "jpg": "RGB JPEG bytes: the original baseline JPEG byte for byte, or a quality-95 conversion",
    "cls": "the label as ASCII digits: index of the synset among the sorted train synsets",
    "json": "{synset, source_path (relative to data.root), orig_format, orig_mode, width, height, converted}",
}


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


MANIFEST_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("split", pa.string()),
    ("synset", pa.string()),
    ("label", pa.int32()),
    ("source_path", pa.string()),
    ("shard", pa.string()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("orig_format", pa.string()),
    ("orig_mode", pa.string()),
    ("converted", pa.bool_()),
    ("sha256", pa.string()),
], metadata={"srcflow_schema": "shard-manifest", "schema_version": str(SCHEMA_VERSION)})

REJECTED_SCHEMA = pa.schema([
    ("source_path", pa.string()),
    ("split", pa.string()),
    ("reason", pa.string()),
], metadata={"srcflow_schema": "shard-rejected", "schema_version": str(SCHEMA_VERSION)})


def read_table(path: Path, schema: pa.Schema) -> pa.Table:
    """Read a manifest, refusing an unknown layout or version."""
    table = pq.read_table(path)
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    if meta.get("srcflow_schema") != schema.metadata[b"srcflow_schema"].decode():
        raise SchemaError(f"{path}: not a srcflow {schema.metadata[b'srcflow_schema'].decode()} table")
    check_version(str(path), int(meta.get("schema_version", -1)), SCHEMA_VERSION)
    if not table.schema.remove_metadata().equals(schema.remove_metadata()):
        raise SchemaError(f"{path}: columns {table.schema.names} differ from the schema {schema.names}")
    return table


def validate_shard_set(root: Path) -> dict:
    """Check a shard set directory against this layout; returns its index."""
    root = Path(root)
    try:
        index = json.loads((root / INDEX).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SchemaError(f"{root / INDEX}: unreadable shard index ({e})") from None
    check_version(str(root / INDEX), index.get("schema_version"), SCHEMA_VERSION)
    manifest = read_table(root / "manifest.parquet", MANIFEST_SCHEMA)
    read_table(root / "rejected.parquet", REJECTED_SCHEMA)
    for split, info in index["splits"].items():
        for i in range(info["shards"]):
            if not (root / "shards" / shard_name(split, i)).is_file():
                raise SchemaError(f"{root}: shard {shard_name(split, i)} is missing")
    if manifest.num_rows != sum(info["samples"] for info in index["splits"].values()):
        raise SchemaError(f"{root}: manifest rows {manifest.num_rows} != samples listed in {INDEX}")
    return index
