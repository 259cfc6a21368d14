"""`srcflow inspect PATH`: a JSON summary of a shard set, a Parquet manifest, a Zarr store or a stage output."""

from __future__ import annotations

from pathlib import Path

from storage_schemas.success import FILENAME as SUCCESS
from storage_schemas.success import read_manifest


def summarize(path: Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if path.suffix == ".parquet":
        return parquet_summary(path)
    if path.suffix == ".zarr" or (path / "zarr.json").is_file():
        return zarr_summary(path)
    if (path / "shards.json").is_file():
        return shard_set_summary(path)
    if (path / SUCCESS).is_file():
        out = read_manifest(path).model_dump()
        out["files"] = f"{len(out['files'])} files, {sum(f['bytes'] for f in out['files'])} bytes"
        return out
    raise ValueError(f"{path}: not a shard set, .parquet manifest, .zarr store or stage output")


def parquet_summary(path: Path) -> dict:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items() if not k.startswith(b"ARROW")}
    summary = {"path": str(path), "rows": table.num_rows, "columns": {f.name: str(f.type) for f in table.schema},
               "metadata": meta, "head": table.slice(0, 3).to_pylist()}
    for col in ("split", "label", "reason", "converted"):
        if col in table.column_names and table.num_rows:
            counts = table.group_by(col).aggregate([([], "count_all")]).to_pylist()
            summary[f"count_by_{col}"] = {str(r[col]): r["count_all"] for r in counts}
    return summary


def shard_set_summary(path: Path) -> dict:
    from storage_schemas.shards import validate_shard_set

    index = validate_shard_set(path)
    tars = sorted((path / "shards").glob("*.tar"))
    return {"path": str(path), **index, "tar_files": len(tars), "tar_bytes": sum(t.stat().st_size for t in tars),
            "manifest": parquet_summary(path / "manifest.parquet"),
            "rejected": parquet_summary(path / "rejected.parquet")}


def zarr_summary(path: Path) -> dict:
    import zarr

    group = zarr.open_group(path, mode="r")
    arrays = {}
    for name, arr in group.arrays():
        arrays[name] = {"shape": list(arr.shape), "dtype": str(arr.dtype), "chunks": list(arr.chunks),
                        "shards": list(arr.shards) if arr.shards else None,
                        "dimension_names": list(arr.metadata.dimension_names or []), "attrs": dict(arr.attrs)}
    return {"path": str(path), "attrs": dict(group.attrs), "arrays": arrays}
