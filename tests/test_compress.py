"""Stage `compress`: the codes store, its statistics and lineage, resume after a kill, the images path,
and which stages a change of the compressor makes stale."""

import random

import numpy as np
import pytest
import torch
import zarr

import pipeline.artifacts as zs
import stages.compress as compress_stage
from pipeline.config import apply_override, validate_config
from pipeline.data.features import load_normalizer, read_features
from stages.fit_src import load_src
from stages.runner import plan, run_pipeline
from storage_schemas.zarr_layouts import CODES

FIT = ("src.steps=4",)  # a learned SRC whose residual branches are no longer zero, trained at sigma 0.2


@pytest.fixture(scope="module")
def compressed(stores):
    """(config, manifests) of one store through compress, shared by the module's tests."""
    cfg = stores("compress", *FIT, until="compress")  # test_faults' chain: built once per session
    return cfg, run_pipeline(cfg, until="compress")


def _with(cfg, *overrides):
    """cfg with `section.key=value` overrides applied (as `--set` does)."""
    raw = cfg.model_dump(by_alias=True)
    raw["flow"]["noise_sigma"] = None  # the dump holds the resolved level: let it follow src.noise_sigma again
    for o in overrides:
        apply_override(raw, o)
    return validate_config(raw)


def _arrays(store) -> dict:
    group = zarr.open_group(str(store), mode="r")
    return {name: arr[...] for name, arr in group.arrays()}


def test_codes_store_layout_lineage_and_statistics(compressed):
    cfg, m = compressed
    store = m["compress"].dir / "codes.zarr"
    attrs = CODES.validate(store)
    codes, features = _arrays(store), _arrays(m["encode"].dir / "features.zarr")
    assert codes["codes"].shape == (128, 64, 6) and codes["codes"].dtype == np.float32
    group = zarr.open_group(str(store), mode="r")
    assert tuple(group["codes"].metadata.dimension_names) == ("row", "token", "code_channel")
    assert group["codes"].shards[0] == cfg.encode.rows_per_shard == 8  # the feature store's shards
    for name in ("labels", "key", "view", "split"):
        assert np.array_equal(codes[name], features[name]), name
    assert attrs["features_fingerprint"] == m["encode"].fingerprint
    assert attrs["src_fingerprint"] == m["fit_src"].fingerprint
    assert attrs["schema_version"] == 3 and attrs["splits"] == {"train": [0, 96], "val": [96, 128]}
    assert attrs["src_noise_sigma"] == 0.2 and attrs["source"] == "features"

    train = codes["codes"][codes["split"] == 0].astype(np.float64).reshape(-1, 6)
    np.testing.assert_allclose(codes["code_mean"], train.mean(0), rtol=0, atol=1e-12)
    np.testing.assert_allclose(codes["code_std"], train.std(0), rtol=1e-10)
    assert np.abs(codes["code_mean"]).max() < 0.2 and np.all(np.abs(codes["code_std"] - 1) < 0.2)  # ~unit variance


def test_codes_are_the_noise_free_src_encoding_of_the_stored_features(compressed):
    _, m = compressed
    store = m["encode"].dir / "features.zarr"
    group = zarr.open_group(str(store), mode="r")
    src = load_src(m["fit_src"], "cpu")
    assert m["fit_src"].metrics["noise_sigma"] == 0.2  # trained with noise, yet no noise in the codes
    with torch.no_grad():
        expected = src.encode(load_normalizer(store)(read_features(group, slice(0, 128)))).numpy()
    codes = zarr.open_group(str(m["compress"].dir / "codes.zarr"), mode="r")["codes"][...]
    np.testing.assert_allclose(codes, expected, rtol=0, atol=1e-6)


class Killed(BaseException):
    """A crash that nothing in the stage catches (stands in for SIGKILL)."""


def test_kill_at_a_random_point_then_rerun_is_bit_identical(compressed, stores, monkeypatch):
    _, clean = compressed
    seed = random.randrange(1000)
    rng = random.Random(seed)
    die_at, before_commit = rng.randrange(1, 16), rng.random() < 0.5  # 16 shards of 8 rows
    calls = [0]
    real_write, real_commit = compress_stage.write_rows, zs.Commits.write

    def write(*a, **k):
        calls[0] += 1
        if calls[0] == die_at and not before_commit:
            raise Killed  # mid-shard: nothing of it written yet
        return real_write(*a, **k)

    def commit(self, *a, **k):
        if calls[0] == die_at and before_commit:
            raise Killed  # data written, commit marker not
        real_commit(self, *a, **k)

    cfg = stores("compress-killed", *FIT)
    monkeypatch.setattr(compress_stage, "write_rows", write)
    monkeypatch.setattr(zs.Commits, "write", commit)
    with pytest.raises(Killed):
        run_pipeline(cfg, until="compress")
    monkeypatch.undo()
    (p,) = [p for p in plan(cfg) if p.name == "compress"]
    assert p.state == "partial", f"seed {seed}"
    resumed = run_pipeline(cfg, until="compress")["compress"]
    assert resumed.fingerprint == clean["compress"].fingerprint
    a, b = _arrays(resumed.dir / "codes.zarr"), _arrays(clean["compress"].dir / "codes.zarr")
    assert a.keys() == b.keys()
    for name in a:
        assert np.array_equal(a[name], b[name]), f"{name} differs after resume (seed {seed})"


def test_images_and_features_paths_give_equal_codes(compressed):
    cfg, m = compressed
    out = run_pipeline(_with(cfg, "compress.from=images"), until="compress")
    assert out["fit_src"].fingerprint == m["fit_src"].fingerprint  # the same SRC, another compress output
    via_images, via_features = _arrays(out["compress"].dir / "codes.zarr"), _arrays(m["compress"].dir / "codes.zarr")
    np.testing.assert_allclose(via_images["codes"], via_features["codes"], rtol=0, atol=1e-6)
    for name in ("labels", "key", "view", "split"):
        assert np.array_equal(via_images[name], via_features[name]), name
    np.testing.assert_allclose(via_images["code_std"], via_features["code_std"], rtol=1e-6)
    assert zarr.open_group(str(out["compress"].dir / "codes.zarr")).attrs["source"] == "images"


def test_images_path_codes_every_image_when_only_a_subset_was_encoded(stores):
    cfg = stores("subset", "src.kind=pca", "encode.subset_per_class=6", "compress.from=images")
    m = run_pipeline(cfg, until="compress")
    features = zarr.open_group(str(m["encode"].dir / "features.zarr"), mode="r")
    codes = zarr.open_group(str(m["compress"].dir / "codes.zarr"), mode="r")
    assert features["features"].shape[0] == (4 * 6 + 4 * 4) * 2  # the fitting subset: 6 train images per class
    assert codes["codes"].shape[0] == (4 * 12 + 4 * 4) * 2  # every image of the shard set, both views
    assert codes.attrs["splits"] == {"train": [0, 96], "val": [96, 128]}
    assert set(features["key"][...]) < set(codes["key"][...])


def test_changing_the_compressor_marks_fit_src_and_downstream_stale(compressed):
    cfg, _ = compressed
    states = lambda c: {p.name: p.state for p in plan(c)}  # noqa: E731
    fps = lambda c: {p.name: p.fingerprint for p in plan(c)}  # noqa: E731
    changed = lambda *overrides: _with(cfg, *overrides)  # noqa: E731

    assert {k: v for k, v in states(cfg).items() if k in ("shard", "encode", "fit_src", "compress")} == \
        {"shard": "done", "encode": "done", "fit_src": "done", "compress": "done"}
    downstream = ("fit_src", "compress", "train_flow", "sample", "evaluate")
    for override in ("src.dim=4", "src.noise_sigma=0.3", "src.kind=pca", "src.arch=transformer"):
        new = changed(override)
        s, before, after = states(new), fps(cfg), fps(new)
        assert s["shard"] == s["encode"] == "done", override
        assert s["fit_src"] == "stale" and s["compress"] == "stale", override
        assert all(before[n] != after[n] for n in downstream), override
        assert before["reference"] == after["reference"], override
    # compress.from changes compress (and what reads codes), not the SRC
    new = changed("compress.from=images")
    assert states(new)["fit_src"] == "done" and fps(new)["fit_src"] == fps(cfg)["fit_src"]
    assert all(fps(new)[n] != fps(cfg)[n] for n in downstream[1:])
    # operational settings change nothing
    assert states(changed("compress.batch_size=7", "src.ckpt_every=3", "src.eval_batch_size=2", "runtime.workers=2")) \
        == states(cfg)
    # `srcflow run --stage fit_src`: only that stage reruns; compress stays stale until it is run
    new = changed("src.dim=4")
    ran = run_pipeline(new, only=["fit_src"])
    assert list(ran) == ["fit_src"] and ran["fit_src"].metrics["dim"] == 4
    assert states(new)["fit_src"] == "done" and states(new)["compress"] == "stale"
