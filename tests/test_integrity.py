"""Bytes verified where they are read: a byte flipped in place (size and mtime kept, so `status` still says done)
in a features shard, a shard tar, a codes shard or the flow's weights is refused in one line by the next stage
that reads it, nothing is committed from it, and after the repair every output is bit-identical to a clean run's.
An output built from other bytes than its upstream holds now is stale, and `run` rebuilds it.
"""

import hashlib
import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

import stages.fit_src as fit_src_stage
from pipeline.artifacts import VOLATILE, ArtifactStore, DamagedError, content_digest
from pipeline.data.batches import WindowShuffle
from pipeline.data.codes import TrainCodes, open_codes, rows_at
from pipeline.data.shards import iter_jpegs, jpeg_members
from pipeline.data.zarr_store import CRC32C, chunk_codecs, create_row_store, write_rows, write_small_array
from stages.runner import plan, run_pipeline
from storage_schemas import SchemaError
from storage_schemas.success import DAMAGED
from storage_schemas.success import FILENAME as SUCCESS
from storage_schemas.zarr_layouts import CODES, array_name
from tests.conftest import byte_in_row, flip_byte

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

    # 3b. a byte inside a row that train_flow's streamed reader reads as its bytes alone (part of an inner chunk,
    # whose CRC-32C it cannot check): the row's own CRC-32C catches it
    streamed = cfg.model_copy(update={"train": cfg.train.model_copy(update={"in_memory_limit_gb": 0.0})})
    codes, offset = byte_in_row(m["compress"].dir / "codes.zarr", "codes", first_streamed_row(streamed, m["compress"]))
    flip_byte(codes, offset)
    refused(streamed, "train_flow", codes, "`srcflow run` rebuilds it")
    assert states(cfg)["compress"] == "damaged"
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


class Killed(BaseException):
    """A crash nothing in the stage catches (stands in for SIGKILL)."""


def test_a_flipped_feature_byte_stops_fit_src_streamed_reader_and_the_repair_is_bit_identical(stores, monkeypatch):
    """fit_src trains on its rows of each shuffle window read as their bytes alone. A byte flipped inside a feature
    row while fit_src was interrupted (its PCA fitted, so the resumed run reads the features through that reader
    alone) stops the resumed run in one line naming the shard file, nothing of fit_src is committed, and after `run`
    every output equals a clean run's. Without the row CRC-32Cs it trained on the bad row and committed."""
    expected = outputs(Path(stores("src-clean", until="compress").storage.root))
    cfg = stores("src-damaged")
    real = fit_src_stage.code_noise

    def crash_at_step_8(seed, step, shape, device):
        if step == 8:
            raise Killed
        return real(seed, step, shape, device)

    monkeypatch.setattr(fit_src_stage, "code_noise", crash_at_step_8)
    with pytest.raises(Killed):
        run_pipeline(cfg, until="compress")
    monkeypatch.undo()
    s = {p.name: p for p in plan(cfg, "compress")}
    assert s["fit_src"].state == "partial" and (s["fit_src"].path / fit_src_stage.PCA_FILE).is_file()

    train_row = 25  # in epoch 1 of the resumed steps 5..11, every train row is read
    features, offset = byte_in_row(s["encode"].path / "features.zarr", "features", train_row)
    flip_byte(features, offset)
    with pytest.raises(DamagedError) as e:
        run_pipeline(cfg, until="fit_src")
    message = str(e.value)
    assert str(features) in message and "`srcflow run` rebuilds it" in message and "\n" not in message, message
    s = {p.name: p.state for p in plan(cfg, "compress")}
    assert s["encode"] == "damaged" and s["fit_src"] == "partial", s

    run_pipeline(cfg, until="compress")
    assert outputs(Path(cfg.storage.root)) == expected


def first_streamed_row(cfg, compress) -> int:
    """The last row of codes.zarr that train_flow's first step reads, streamed (its schedule, the views drawn): past
    the train rows that its closing likelihood reads through Zarr, so only the streamed reader can catch it."""
    t = cfg.train
    data = TrainCodes(compress.dir / "codes.zarr", in_memory_limit_gb=0.0)
    schedule = WindowShuffle(data.n, t.batch_size, t.seed, block=data.block, window=t.shuffle_window)
    return data.start + int(rows_at(data, schedule, t.seed, schedule.positions(0)).max())


@pytest.mark.parametrize("compress_too", ["intact", "damaged"])
def test_an_output_built_from_other_upstream_bytes_is_stale_and_rebuilt(stores, monkeypatch, compress_too):
    """fit_src rebuilt with other weights under the same fingerprint (a nondeterministic GPU run, say): compress,
    built from the old ones, is stale and `run` rebuilds it from the new ones; on main it stayed done. Damaged as
    well, it is rebuilt whole, never repaired shard by shard into a mix of codes from both SRCs."""
    cfg = stores(f"lineage-{compress_too}", *FIT, until="compress")
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
    if compress_too == "damaged":
        (m["compress"].dir / "codes.zarr" / "codes" / "c" / "0" / "0" / "0").unlink()
        assert states(cfg)["compress"] == "damaged"

    rebuilt = run_pipeline(cfg, until="compress")["compress"]
    assert states(cfg)["compress"] == "done"
    after = zarr.open_group(str(rebuilt.dir / "codes.zarr"), mode="r")["codes"][...]
    assert all(not np.array_equal(before[a:a + 8], after[a:a + 8]) for a in range(0, len(before), 8))  # every shard
    now = ArtifactStore(cfg.storage.root).manifest("fit_src", s["fit_src"].fingerprint)
    assert rebuilt.upstream_content["fit_src"] == content_digest(now)


def test_outputs_of_the_previous_layouts_are_read_as_before(stores):
    """A `_SUCCESS.json` of schema 2 (no upstream content) and Zarr stores of schema 1 (no chunk checksums) and 2 (no
    row checksums) stay done and readable, scattered rows too: nothing built before this change is rebuilt for it.
    A schema 3 store without its row checksums is refused in one line, never read unchecked."""
    cfg = stores("older", *FIT, until="compress")
    m = run_pipeline(cfg, until="compress")
    success = m["compress"].dir / SUCCESS
    raw = json.loads(success.read_text())
    raw["schema_version"] = 2
    del raw["upstream_content"]
    success.write_text(json.dumps(raw))
    assert states(cfg)["compress"] == "done"
    run_pipeline(cfg, until="compress")

    v3 = m["compress"].dir / "codes.zarr"
    new = zarr.open_group(str(v3), mode="r")
    assert new.attrs["schema_version"] == 3 and "codes_crc32c" in new
    attrs = {k: v for k, v in new.attrs.items() if k != "schema_version"}
    scattered = np.arange(1, new["codes"].shape[0], 3)
    for schema in (1, 2):
        old = m["compress"].dir.parent / f"v{schema}-codes.zarr"
        create_row_store(old, CODES, new["codes"].shape[0], rows_per_shard=8, rows_per_chunk=4,
                         row_shapes={"codes": (new["codes"].shape[1:], "float32")}, attrs=attrs, schema=schema)
        write_rows(old, 0, {name: new[name][...] for name in ("codes", "labels", "key", "view", "split")})
        for name in ("code_mean", "code_std"):
            write_small_array(old, name, new[name][...], ("code_channel",))
        group, read_attrs = open_codes(old)
        assert read_attrs["schema_version"] == schema and "codes_crc32c" not in group
        assert (CRC32C in chunk_codecs(group["codes"]._array)) == (schema == 2)
        for name in ("codes", "labels", "key", "code_mean"):  # versions 1 and 2 name the key array `keys`
            assert np.array_equal(group[array_name(group, name)][...], new[name][...]), name
        assert np.array_equal(group["codes"].read_rows(scattered), new["codes"][scattered])  # unchecked, as before

    zarr.open_group(str(old), mode="r+").attrs["schema_version"] = 3
    with pytest.raises(SchemaError, match=r"v2-codes.zarr: missing array 'codes_crc32c'$"):
        open_codes(old)


def test_one_tar_reader_rule_full_member_names_and_a_key_twice_refused(tmp_path):
    """encode kept a member's full name, fit_decoder dropped its folders and kept the last of two same-named
    JPEGs: a crafted tar made the two stages see different images. Now both read `jpeg_members`: the key is the
    full name up to the first dot of the file name (WebDataset's), and a key with two JPEGs is refused."""
    a, b = b"\xff\xd8 image a", b"\xff\xd8 image b"
    tar = tmp_path / "crafted.tar"
    write_tar(tar, [("sub/x.jpg", a), ("x.jpg", b), ("x.cls", b"0")])
    assert set(jpeg_members(tar)) == {"sub/x", "x"}
    wanted = {"x": hashlib.sha256(b).hexdigest(), "sub/x": hashlib.sha256(a).hexdigest()}
    assert dict(iter_jpegs([str(tar)], wanted)) == {"sub/x": a, "x": b}
    with pytest.raises(DamagedError, match="image x differs from its sha256"):  # the other image under x's key
        dict(iter_jpegs([str(tar)], {"x": hashlib.sha256(a).hexdigest()}))

    twice = tmp_path / "twice.tar"
    write_tar(twice, [("x.jpg", a), ("x.cls", b"0"), ("x.jpg", b)])
    with pytest.raises(DamagedError, match="holds the key 'x' twice") as e:
        jpeg_members(twice)
    assert str(twice) in str(e.value) and "\n" not in str(e.value)


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
