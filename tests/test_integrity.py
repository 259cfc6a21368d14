"""Bytes verified where they are read: a byte flipped in place (size and mtime kept, so `status` still says done)
in a features shard, a shard tar, a codes shard or the flow's weights is refused in one line by the next stage
that reads it, nothing is committed from it, and after the repair every output is bit-identical to a clean run's.
An output built from other bytes than its upstream holds now is stale, and `run` rebuilds it.
"""

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from zarr.codecs import BloscCodec

import stages.fit_src as fit_src_stage
from pipeline.artifacts import VOLATILE, ArtifactStore, DamagedError, content_digest
from pipeline.data.codes import open_codes
from pipeline.data.shards import jpeg_members
from pipeline.data.zarr_store import CRC32C, chunk_codecs
from stages.runner import plan, run_pipeline
from storage_schemas.success import DAMAGED
from storage_schemas.success import FILENAME as SUCCESS
from tests.conftest import flip_byte

FIT = ("src.steps=4",)
TINY_FLOW = ("flow.width=16", "flow.heads=2", "flow.num_blocks=1", "flow.layers_per_block=1",
             "flow.deep_layers=null", "train.steps=6", "train.batch_size=8", "train.warmup_steps=1",
             "train.log_every=3", "train.ckpt_every=3", "train.eval_batch_size=16", "sample.per_class=2",
             "sample.cfg_scale=[1.0]", "sample.batch_size=4", "sample.chunk_size=4")


def outputs(root: Path) -> dict[str, dict[str, str]]:
    """stage -> {file: sha256} of every committed output under a root, less the files whose bytes record when
    they were written (timings, TensorBoard, zip timestamps of commit markers; artifacts.VOLATILE)."""
    found = {}
    for success in sorted(root.glob(f"*/*/{SUCCESS}")):
        d = success.parent
        found[d.parent.name] = {p.relative_to(d).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                                for p in sorted(d.rglob("*")) if p.is_file() and p.name not in (SUCCESS, DAMAGED)
                                and not p.relative_to(d).as_posix().startswith(VOLATILE)}
    return found


def states(cfg) -> dict[str, str]:
    return {p.name: p.state for p in plan(cfg, "sample")}


@pytest.fixture
def chain(stores, tmp_path):
    """A root holding every stage through sample (with a released decoder: no fit_decoder), and a clean copy."""
    cfg = stores("integrity", *FIT, *TINY_FLOW, until="sample")
    manifests = run_pipeline(cfg, until="sample")
    clean = tmp_path / "clean"
    shutil.copytree(cfg.storage.root, clean)
    return cfg, manifests, clean


def refused(cfg, force: str, victim: Path, repair: str) -> str:
    """`run --force <force>` stops in the stage that reads `victim`, in one line naming it and `repair`."""
    with pytest.raises(DamagedError) as e:
        run_pipeline(cfg, until="sample", force=[force])
    message = str(e.value)
    assert str(victim) in message and repair in message and "\n" not in message, message
    return message


def test_a_flipped_byte_is_refused_by_the_next_reader_and_every_output_ends_bit_identical(chain):
    cfg, m, clean = chain
    root, expected = Path(cfg.storage.root), outputs(clean)
    assert set(expected) == {"shard", "encode", "fit_src", "compress", "train_flow", "sample"}

    # 1. a features shard: compress reads it
    features = m["encode"].dir / "features.zarr" / "features" / "c" / "3" / "0" / "0"
    flip_byte(features, features.stat().st_size // 3)
    assert states(cfg)["encode"] == "done"  # the fast check sees sizes only
    refused(cfg, "compress", features, "`srcflow run` rebuilds it")
    assert states(cfg)["encode"] == "damaged"  # the reader recorded it
    run_pipeline(cfg, until="sample")
    assert outputs(root) == expected

    # 2. a JPEG inside a shard tar: encode reads it (and checks it against the manifest's sha256)
    tar = m["shard"].dir / "shards" / "train-000001.tar"
    offset, size = next(iter(jpeg_members(tar).values()))
    flip_byte(tar, offset + size // 2)
    refused(cfg, "encode", tar, "`srcflow run` rebuilds it")
    assert states(cfg)["shard"] == "damaged"
    run_pipeline(cfg, until="sample")
    assert outputs(root) == expected

    # 3. a codes shard: train_flow reads it
    codes = m["compress"].dir / "codes.zarr" / "codes" / "c" / "5" / "0" / "0"
    flip_byte(codes, 100)
    refused(cfg, "train_flow", codes, "`srcflow run` rebuilds it")
    run_pipeline(cfg, until="sample")
    assert outputs(root) == expected

    # 4. the flow's weights: sample reads them; a trained output is rebuilt only when asked to
    weights = m["train_flow"].dir / "flow.safetensors"
    flip_byte(weights, weights.stat().st_size // 2)
    refused(cfg, "sample", weights, "`srcflow run --force train_flow`")
    with pytest.raises(DamagedError, match="--force train_flow"):
        run_pipeline(cfg, until="sample")
    run_pipeline(cfg, until="sample", force=["train_flow"])
    assert outputs(root) == expected
    assert all(s == "done" for s in states(cfg).values()), states(cfg)


def test_an_output_built_from_other_upstream_bytes_is_stale_and_rebuilt(stores, monkeypatch):
    """fit_src rebuilt with other weights under the same fingerprint (a nondeterministic GPU run, say): compress,
    built from the old ones, is stale and `run` rebuilds it from the new ones; on main it stayed done."""
    cfg = stores("lineage", *FIT, until="compress")
    m = run_pipeline(cfg, until="compress")
    before = zarr.open_group(str(m["compress"].dir / "codes.zarr"), mode="r")["codes"][...]
    real = fit_src_stage.save_src

    def other_weights(src, *args):
        with torch.no_grad():
            for p in src.parameters():
                p.add_(0.01)
        return real(src, *args)

    monkeypatch.setattr(fit_src_stage, "save_src", other_weights)
    run_pipeline(cfg, until="fit_src", force=["fit_src"])
    monkeypatch.undo()
    s = {p.name: p for p in plan(cfg)}
    assert s["fit_src"].state == "done" and s["compress"].state == "stale", s["compress"]
    assert "built from other bytes of fit_src" in s["compress"].problem

    rebuilt = run_pipeline(cfg, until="compress")["compress"]
    assert states(cfg)["compress"] == "done"
    after = zarr.open_group(str(rebuilt.dir / "codes.zarr"), mode="r")["codes"][...]
    assert not np.array_equal(before, after)
    now = ArtifactStore(cfg.storage.root).manifest("fit_src", s["fit_src"].fingerprint)
    assert rebuilt.upstream_content["fit_src"] == content_digest(now)


def test_outputs_of_the_previous_layouts_are_read_as_before(stores):
    """A `_SUCCESS.json` of schema 2 (no upstream content) and a Zarr store of schema 1 (no chunk checksums) stay
    done and readable: nothing built before this change is rebuilt for it."""
    cfg = stores("older", *FIT, until="compress")
    m = run_pipeline(cfg, until="compress")
    success = m["compress"].dir / SUCCESS
    raw = json.loads(success.read_text())
    raw["schema_version"] = 2
    del raw["upstream_content"]
    success.write_text(json.dumps(raw))
    assert states(cfg)["compress"] == "done"
    run_pipeline(cfg, until="compress")

    v2 = m["compress"].dir / "codes.zarr"
    v1 = without_chunk_checksums(v2, m["compress"].dir.parent / "v1-codes.zarr")
    group, attrs = open_codes(v1)
    assert attrs["schema_version"] == 1
    new = zarr.open_group(str(v2), mode="r")
    for name in ("codes", "labels", "keys", "code_mean"):
        assert np.array_equal(group[name][...], new[name][...]), name


def without_chunk_checksums(store: Path, to: Path) -> Path:
    """A copy of a Zarr store of schema 2 in schema 1's layout: the same arrays without the crc32c codec."""
    old = zarr.open_group(str(store), mode="r")
    group = zarr.open_group(str(to), mode="w", attributes={**old.attrs, "schema_version": 1})
    for name, arr in old.arrays():
        big = arr.ndim == 3
        copy = group.create_array(name, shape=arr.shape, dtype=arr.dtype, chunks=arr.chunks, shards=arr.shards,
                                  compressors=None if big or (arr.ndim == 1 and name.startswith("code_")) else
                                  [BloscCodec(cname="zstd", clevel=3)], dimension_names=arr.metadata.dimension_names,
                                  fill_value=arr.metadata.fill_value, config={"write_empty_chunks": True})
        copy[...] = arr[...]
        assert CRC32C not in chunk_codecs(copy)
    return to
