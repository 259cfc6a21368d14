"""Zarr v3 group layouts: `features.zarr` (stage encode) and `codes.zarr` (stage compress).

Rows are (image, view) pairs, image-major: row = image_index * n_views + view, with the train
split first, then val (`attrs.splits` gives each split's row range). Every per-row array is
sharded by `rows_per_shard` rows, so a writer that owns a row range of whole shards owns whole
files of every array (concurrent writes inside one Zarr shard lose data, see STACK.md).

Open with `dask.array.from_zarr(path, component="features")` or `xarray.open_zarr(path)`.

The row layout, and why it stays (schema version 1): `features` and `codes` are uncompressed (float16
features are incompressible: zstd level 3 shrinks the stage's own features 1.08x, row by row) and stored in
`rows_per_chunk`-row inner chunks (16: one random row read fetches 6.3 MB at DINOv2-B shapes) inside
`rows_per_shard`-row shard files (the sharding codec, crc32c shard index at the end; 512 in the paper
configs: the unit of a writer, of a commit and of resume). The readers want exactly that: fit_decoder
reads random rows, train_flow shuffles chunk-aligned windows, Dask and xarray scan sequentially.
The cost was the writer: Zarr 3.1's sharding codec fills and copies every inner chunk and concatenates
the shard on one event-loop thread per process, 0.18-0.48 of a raw write of the same bytes
(benchmarks/encode.py `write`, 2026-12). Measured candidates, MB/s against raw, page cache:
- the same layout through the codec (`zarr`): 0.18-0.37 with one process, 0.34-0.43 with three;
- one chunk per shard (no codec): 0.53-1.0, but then a random row read fetches a whole 200 MB shard and
  the train shuffle's blocks are whole shards;
- several writer processes per GPU: three codec writers at once reach 0.34-0.43 of three raw writers;
- whole shard files without the codec's copies (`direct`, pipeline.data.zarr_store.shard_file_parts):
  0.77-1.08 with one process, 0.93-1.04 with three. A shard file of an uncompressed array is its rows' bytes,
  zero rows up to its last inner chunk, and the (offset, nbytes) index with its CRC-32C: written in one
  pass, byte for byte the file the codec writes (tests/test_parallel.py compares them), so it is no
  layout change and no reader changes.
The decision: the direct writer, the layout unchanged. A change of layout (one chunk per shard, other
codecs) would bump SCHEMA_VERSION, and the readers refuse a version they do not know (`check_version`).

Schema version 2 adds Zarr v3's `crc32c` codec after every array's chunk codecs (inside the shards: per inner
chunk), so every read checks the CRC-32C of each chunk it decodes, whatever reads it (the stages, Dask,
xarray): a flipped byte anywhere in a shard file fails the read of its chunk (or of the shard index, which had
its own CRC-32C already). Measured against the alternative, the CRC-32C of each whole shard file checked
against its commit record before a read (benchmarks/integrity.py `zarr_read`): the same cost on sequential
reads, and the only one of the two that a random row read can use without reading its whole shard.
Version 1 stores (no chunk checksums) are read as before; `srcflow verify --deep` still checks their files.

Version 3 (2026-12): the image key array is `key` (versions 1-2's `keys` shadowed `Dataset.keys()` in xarray); the
`features` and `codes` arrays name the per-row arrays as their coordinates (CF `coordinates`, so xarray opens
`labels`, `split`, `view` and `key` as coordinates of `row`: `ds.features.groupby("labels")`); every array has a
`long_name` and `units` ("1": dimensionless), `split` and `view` their `flag_values` / `flag_meanings`. A version 1
or 2 store is read as before (`array_name` spells its arrays), and a resumed or repaired one keeps its version.

Version 3 also adds, beside each large per-row array (`features`, `codes`), `<name>_crc32c`: the CRC-32C of each
row's bytes as stored (uint32, dims (row,), one per row; `row_crc_name`), written with the rows by the one writer
(pipeline.data.zarr_store.write_rows, so in the shard's commit unit) and itself read through Zarr (its chunks carry
their CRC-32C). A reader of scattered rows (`zarr_store.read_rows`: a DDP rank's share of a shuffle window) reads
part of an inner chunk, whose CRC it cannot check without reading the whole chunk (10-15x its share at world sizes
8-64); it checks every row it returns against its row CRC instead. Version 1 and 2 stores (no row CRCs) are read as
before, their scattered rows unchecked; a writer repairing or resuming one writes its layout (the arrays it has).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from storage_schemas import SchemaError, check_version

SCHEMA_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)  # 1: no chunk checksums; 2: no row checksums; both: the key array named `keys`
RENAMED = {1: {"key": "keys"}, 2: {"key": "keys"}}  # version -> {array: its name in stores of that version}
ROW_CRC_SUFFIX = "_crc32c"


def array_name(group, name: str) -> str:
    """`name` as the store `group` spells it (versions 1 and 2 named the image key array `keys`)."""
    return RENAMED.get(group.attrs.get("schema_version"), {}).get(name, name)


@dataclass(frozen=True)
class ArraySpec:
    dims: tuple[str, ...]
    dtype: str  # numpy dtype name, or "str" for variable-length UTF-8
    also: tuple[str, ...] = ()  # other accepted on-disk dtypes
    per_row: bool = True  # sharded along rows; False = a small whole array (statistics)
    doc: str = ""  # its `long_name` attribute
    attrs: dict = field(default_factory=dict)  # further attributes: units, flag_values, coordinates
    since: int = 1  # the first schema version that has this array

    @property
    def attributes(self) -> dict:
        """Its attributes in the store: long_name, units ("1": dimensionless; none for text), and `attrs`."""
        return {"long_name": self.doc, **({} if self.dtype == "str" else {"units": "1"}), **self.attrs}


def row_crc_name(name: str) -> str:
    """The array holding the CRC-32C of each row of array `name` (schema 3)."""
    return name + ROW_CRC_SUFFIX


@dataclass(frozen=True)
class ZarrLayout:
    kind: str
    arrays: dict[str, ArraySpec]
    required_attrs: tuple[str, ...]

    def arrays_of(self, version: int) -> dict[str, ArraySpec]:
        """The arrays a store of schema `version` has."""
        return {name: spec for name, spec in self.arrays.items() if spec.since <= version}

    def validate(self, path: str | Path) -> dict:
        """Refuse a store of another kind, version, or with missing/misshapen arrays. Returns its attrs."""
        import zarr

        try:
            group = zarr.open_group(str(path), mode="r")
        except (FileNotFoundError, ValueError, zarr.errors.GroupNotFoundError) as e:
            raise SchemaError(f"{path}: not a Zarr group ({e})") from None
        attrs = dict(group.attrs)
        if attrs.get("srcflow_schema") != self.kind:
            raise SchemaError(f"{path}: expected a srcflow {self.kind} store, found {attrs.get('srcflow_schema')!r}")
        if attrs.get("schema_version") not in READABLE_VERSIONS:
            check_version(str(path), attrs.get("schema_version"), SCHEMA_VERSION)  # the one-line refusal
        missing = [a for a in self.required_attrs if a not in attrs]
        if missing:
            raise SchemaError(f"{path}: missing attributes {missing}")
        for name, spec in self.arrays_of(attrs["schema_version"]).items():
            name = array_name(group, name)
            if name not in group:
                raise SchemaError(f"{path}: missing array {name!r}")
            arr = group[name]
            dims = tuple(arr.metadata.dimension_names or ())
            if dims != spec.dims:
                raise SchemaError(f"{path}/{name}: dimension_names {dims} != {spec.dims}")
            if spec.dtype != "str" and str(arr.dtype) not in (spec.dtype, *spec.also):
                raise SchemaError(f"{path}/{name}: dtype {arr.dtype} != {spec.dtype}")
            if spec.per_row:
                check_shard_files(path, name, arr)
        return attrs


def check_shard_files(path: str | Path, name: str, arr) -> None:
    """Zarr reads a missing chunk as its fill value: refuse a store with a missing shard file instead."""
    unit = (arr.shards or arr.chunks)[0]
    for k in range(-(-arr.shape[0] // unit)):
        key = arr.metadata.encode_chunk_key((k,) + (0,) * (arr.ndim - 1))
        if not (Path(path) / name / key).is_file():
            raise SchemaError(f"{Path(path) / name / key}: missing shard file (rows {k * unit} to "
                              f"{min((k + 1) * unit, arr.shape[0])}): the store is damaged; `srcflow run` rebuilds it")


ROW_ARRAYS = {
    "labels": ArraySpec(("row",), "int32", doc="class label (index among the sorted train synsets)"),
    "key": ArraySpec(("row",), "str", doc="WebDataset key of the source image"),
    "view": ArraySpec(("row",), "uint8", doc="view of the image: 0 = as is, 1 = horizontally flipped",
                      attrs={"flag_values": [0, 1], "flag_meanings": "plain flip"}),
    "split": ArraySpec(("row",), "uint8", doc="split: 0 = train, 1 = val",
                       attrs={"flag_values": [0, 1], "flag_meanings": "train val"}),
}
SPLIT_IDS = {"train": 0, "val": 1}
ROW_COORDINATES = {"coordinates": " ".join(ROW_ARRAYS)}  # xarray: these are coordinates of `row`
ROW_CRC_DOC = "CRC-32C of each row of `{}` as stored (its little-endian bytes), checked by readers of single rows"

FEATURES = ZarrLayout(
    kind="features",
    arrays={
        "features": ArraySpec(("row", "token", "channel"), "float16", also=("uint16",),
                              doc="RAE encoder tokens after the affine-free LayerNorm, BEFORE the per-position "
                                  "normalization; bf16 is stored as uint16 with attrs.logical_dtype = bfloat16",
                              attrs=ROW_COORDINATES),
        row_crc_name("features"): ArraySpec(("row",), "uint32", since=3, doc=ROW_CRC_DOC.format("features")),
        **ROW_ARRAYS,
        "stats_mean": ArraySpec(("channel", "y", "x"), "float64", per_row=False,
                                doc="exact per-position mean over the train rows"),
        "stats_var": ArraySpec(("channel", "y", "x"), "float64", per_row=False,
                               doc="exact per-position (population) variance over the train rows"),
    },
    required_attrs=("encoder", "weights_sha256", "resolution", "input_size", "crop", "normalization", "logical_dtype",
                    "views", "splits", "grid_size", "source_fingerprint", "stats_count"),
)

CODES = ZarrLayout(
    kind="codes",
    arrays={
        "codes": ArraySpec(("row", "token", "code_channel"), "float32",
                           doc="SRC codes, unit variance per channel on the train rows (before any noise)",
                           attrs=ROW_COORDINATES),
        row_crc_name("codes"): ArraySpec(("row",), "uint32", since=3, doc=ROW_CRC_DOC.format("codes")),
        **ROW_ARRAYS,
        "code_mean": ArraySpec(("code_channel",), "float64", per_row=False, doc="per-channel mean over train rows"),
        "code_std": ArraySpec(("code_channel",), "float64", per_row=False, doc="per-channel std over train rows"),
    },
    required_attrs=("features_fingerprint", "src_fingerprint", "views", "splits", "grid_size"),
)
