"""Stage `encode`: the Zarr feature store, its statistics, resume after a kill, and browsing it."""

import os
import random
import signal
import subprocess
import sys
import warnings

import dask.array as da
import numpy as np
import pytest
import torch
import zarr

from pipeline.data.features import load_normalizer, load_released_stats, widen
from stages.runner import plan, run_pipeline
from storage_schemas import SchemaError
from storage_schemas.zarr_layouts import FEATURES
from tests.conftest import REPO

SMALL = ("encode.rows_per_shard=8", "encode.rows_per_chunk=4", "encode.batch_size=5")


def _encode(make_config, *overrides):
    cfg = make_config(*SMALL, *overrides)
    return cfg, run_pipeline(cfg, until="encode")["encode"]


@pytest.fixture(scope="module")
def encoded(module_config):
    """The default store, encoded once for the tests that only read it."""
    return _encode(module_config)[1]


def _arrays(store) -> dict:
    group = zarr.open_group(str(store), mode="r")
    return {name: arr[...] for name, arr in group.arrays()}


def test_store_layout_shapes_and_dimension_names(encoded):
    out = encoded
    store = out.dir / "features.zarr"
    attrs = FEATURES.validate(store)
    group = zarr.open_group(str(store), mode="r")
    n_images = 4 * 12 + 4 * 4
    # smoke encoder: input 56, patch 7 -> 8x8 tokens of 64 channels; views plain + flip side by side
    assert group["features"].shape == (n_images * 2, 64, 64) and group["features"].dtype == np.float16
    assert tuple(group["features"].metadata.dimension_names) == ("row", "token", "channel")
    for name in ("labels", "key", "view", "split"):
        assert group[name].shape == (n_images * 2,) and tuple(group[name].metadata.dimension_names) == ("row",)
    assert list(group["view"][:4]) == [0, 1, 0, 1] and group["key"][0] == group["key"][1]
    assert attrs["splits"] == {"train": [0, 96], "val": [96, 128]} and attrs["grid_size"] == 8
    assert group["stats_var"].shape == (64, 8, 8)
    # the flipped view is the encoding of the mirrored image, not a copy
    assert not np.array_equal(group["features"][0], group["features"][1])


def test_statistics_are_exact_over_the_train_rows(encoded):
    out = encoded
    arrays = _arrays(out.dir / "features.zarr")
    train = widen(arrays["features"][arrays["split"] == 0]).astype(np.float64)
    mean, var = train.mean(0), train.var(0)  # (T, C)
    np.testing.assert_allclose(arrays["stats_mean"], mean.T.reshape(64, 8, 8), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(arrays["stats_var"], var.T.reshape(64, 8, 8), rtol=1e-10, atol=1e-12)
    assert zarr.open_group(str(out.dir / "features.zarr")).attrs["stats_count"] == len(train)


def test_tokens_are_layernormed_without_affine(encoded):
    out = encoded
    f = widen(zarr.open_group(str(out.dir / "features.zarr"))["features"][:8]).astype(np.float64)
    np.testing.assert_allclose(f.mean(-1), 0, atol=2e-3)
    np.testing.assert_allclose(f.var(-1), 1, atol=2e-2)


def test_bfloat16_store_round_trips_exactly(make_config):
    _cfg, out = _encode(make_config, "encode.dtype=bfloat16", "encode.views=[plain]")
    group = zarr.open_group(str(out.dir / "features.zarr"), mode="r")
    assert group["features"].dtype == np.uint16 and group.attrs["logical_dtype"] == "bfloat16"
    widened = torch.from_numpy(widen(group["features"][:4]))
    assert torch.equal(widened.to(torch.bfloat16).float(), widened)  # exactly representable in bf16


def test_precision_enters_the_fingerprint_of_encode_and_of_every_stage_downstream(make_config):
    fp32 = {p.name: p.fingerprint for p in plan(make_config())}
    bf16 = {p.name: p.fingerprint for p in plan(make_config("encode.precision=bf16"))}
    assert make_config().encode.precision == "fp32"  # the default, as RAE encodes
    unchanged = {"shard", "reference"}  # they do not read the features
    assert {s for s in fp32 if fp32[s] == bf16[s]} == unchanged
    assert {"encode", "fit_decoder", "fit_src", "compress", "train_flow", "sample", "evaluate"} <= fp32.keys()


def test_bf16_features_differ_from_fp32_ones_but_stay_close(module_config, encoded):
    _, bf16 = _encode(module_config, "encode.precision=bf16")
    assert bf16.fingerprint != encoded.fingerprint
    stores = [zarr.open_group(str(out.dir / "features.zarr"), mode="r") for out in (encoded, bf16)]
    assert [g.attrs["precision"] for g in stores] == ["fp32", "bf16"]
    f32, f16 = (widen(g["features"][:]).astype(np.float64) for g in stores)
    relative = np.linalg.norm(f16 - f32) / np.linalg.norm(f32)
    # bf16 keeps 8 mantissa bits (~0.4% a value); the stored float16 rounds at ~0.05%, so the two stores differ
    assert 1e-3 < relative < 3e-2, relative
    assert np.abs(f16 - f32).max() < 0.25


KILL_SCRIPT = """
import itertools, os, random, signal, sys, threading
import pipeline.artifacts as zs
import stages.encode as enc
rng = random.Random(int(sys.argv[1]))
die_at, before_commit = rng.randrange(2, 10), rng.random() < 0.5
calls, mine = itertools.count(1), threading.local()   # jobs run in threads: each knows its own call
real_write, real_commit = enc.write_rows, zs.Commits.write
def write(*a, **k):
    mine.call = next(calls)
    if mine.call == die_at and not before_commit:
        os.kill(os.getpid(), signal.SIGKILL)   # mid-shard: nothing of it written yet
    return real_write(*a, **k)
def commit(self, *a, **k):
    if getattr(mine, "call", None) == die_at and before_commit:
        os.kill(os.getpid(), signal.SIGKILL)   # data written, commit marker not
    real_commit(self, *a, **k)
enc.write_rows, zs.Commits.write = write, commit
from pipeline.config import load_config
from stages.runner import run_pipeline
run_pipeline(load_config(None, sys.argv[2:]), until="encode")
"""


def test_kill_at_a_random_point_then_rerun_is_bit_identical(make_config, tmp_path):
    from tests.conftest import SMOKE

    seed = random.randrange(1000)
    killed = make_config(*SMALL, f"storage.root={tmp_path / 'killed'}")
    args = [str(SMOKE)]  # the smoke config file, then the same overrides make_config applied
    overrides = [f"storage.root={tmp_path / 'killed'}", f"data.root={killed.data.root}", "data.generate_tiny=null",
                 "data.resolution=32", "decoder.patch_size=4", "runtime.progress=false", "shard.workers=1",
                 "shard.samples_per_shard=16", *SMALL]
    script = KILL_SCRIPT.replace("load_config(None, sys.argv[2:])", "load_config(sys.argv[2], sys.argv[3:])")
    proc = subprocess.run([sys.executable, "-c", script, str(seed), *args, *overrides], cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == -signal.SIGKILL, f"seed {seed}"
    (p,) = [p for p in plan(killed) if p.name == "encode"]
    assert p.state == "partial"
    resumed = run_pipeline(killed, until="encode")["encode"]
    _, reference = _encode(make_config, f"storage.root={tmp_path / 'clean'}")
    a, b = _arrays(resumed.dir / "features.zarr"), _arrays(reference.dir / "features.zarr")
    assert a.keys() == b.keys()
    for name in a:
        assert np.array_equal(a[name], b[name]), f"{name} differs after resume (seed {seed})"


@pytest.mark.parametrize("parallel", [("encode.jobs_per_worker=3", "encode.decode_threads=2"),
                                      ("runtime.workers=2", "encode.jobs_per_worker=2")],
                         ids=["three-jobs-in-threads", "two-dask-workers"])
def test_jobs_in_threads_or_dask_workers_give_the_same_store_as_one_job_at_a_time(make_config, tmp_path, parallel):
    _, one = _encode(make_config, f"storage.root={tmp_path / 'one'}", "encode.jobs_per_worker=1")
    _, many = _encode(make_config, f"storage.root={tmp_path / 'many'}", *parallel)
    assert one.fingerprint == many.fingerprint  # how the jobs ran is operational
    a, b = _arrays(one.dir / "features.zarr"), _arrays(many.dir / "features.zarr")
    assert a.keys() == b.keys()
    for name in a:
        assert np.array_equal(a[name], b[name]), name
    seconds = many.metrics["job_seconds"]
    assert set(seconds) == {"read", "decode_wait", "forward", "write", "commit"}
    assert all(v >= 0 for v in seconds.values()) and seconds["forward"] > 0


def test_dask_and_xarray_open_the_store(encoded):
    import xarray as xr

    out = encoded
    store = str(out.dir / "features.zarr")
    f = da.from_zarr(store, component="features")
    assert f.shape[1:] == (64, 64)
    channel_mean = f.astype("float64").mean(axis=(0, 1)).compute()
    assert channel_mean.shape == (64,)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # consolidated metadata: the defaults open it without a warning
        ds = xr.open_zarr(store)
    assert ds["features"].dims == ("row", "token", "channel") and ds["labels"].dims == ("row",)
    assert int(ds["labels"].max()) == 3
    # the statistics broadcast against the features once (channel, y, x) is flattened to (token, channel)
    mean = ds["stats_mean"].stack(token=("y", "x")).transpose("token", "channel")
    assert (ds["features"] - mean.values).shape == ds["features"].shape


def test_released_statistics_loader(tmp_path):
    var = torch.rand(1, 64, 8, 8) + 0.5
    torch.save({"mean": None, "var": var}, tmp_path / "stats.pt")
    mean, loaded = load_released_stats(str(tmp_path / "stats.pt"))
    assert mean is None and loaded.shape == (64, 8, 8)
    norm = load_normalizer(tmp_path, "file", str(tmp_path / "stats.pt"))
    f = torch.randn(2, 64, 64)
    expected = f / (var[0].reshape(64, 64).T + 1e-5).sqrt()
    torch.testing.assert_close(norm(f), expected)
    torch.testing.assert_close(norm.inverse(norm(f)), f)
    with pytest.raises(FileNotFoundError, match=r"encode.stats_file: .*nope.pt does not exist"):
        load_released_stats(str(tmp_path / "nope.pt"))


def test_wrong_encoder_weights_path_is_one_line(make_config, tmp_path):
    cfg = make_config(f"encoder.weights={tmp_path / 'missing.safetensors'}")
    with pytest.raises(FileNotFoundError) as e:
        plan(cfg)
    assert "\n" not in str(e.value) and "encoder.weights" in str(e.value) and "missing.safetensors" in str(e.value)


def test_an_unknown_store_layout_is_refused(tmp_path):
    g = zarr.open_group(str(tmp_path / "x.zarr"), mode="w", attributes={"srcflow_schema": "features",
                                                                        "schema_version": 99})
    g.create_array("features", shape=(1,), dtype="float16")
    with pytest.raises(SchemaError, match="schema version 99"):
        FEATURES.validate(tmp_path / "x.zarr")


def test_the_decode_path_enters_the_fingerprint_and_the_default_keeps_todays(make_config):
    from pipeline.artifacts import fingerprint
    from pipeline.config import select, semantic_values
    from stages import STAGE_NAMES, STAGES

    pil = {p.name: p for p in plan(make_config())}
    tensor = {p.name: p.fingerprint for p in plan(make_config("encode.decode=tensor"))}
    assert make_config().encode.decode == "pil"
    assert {s for s in pil if pil[s].fingerprint == tensor[s]} == {"shard", "reference"}
    # encode.decode at pil is left out of the semantic values: the fingerprint of every store encoded before
    stage, p = STAGES[STAGE_NAMES.index("encode")], pil["encode"]
    before = {s: (semantic_values(v) if hasattr(v, "model_fields") else v)
              for s in stage.sections if s != "encode.decode" for v in [select(make_config(), s)]}
    assert "encode.decode" not in p.semantic and p.semantic == before
    assert p.fingerprint == fingerprint("encode", stage.code_version, before, p.upstream, p.external)


def test_the_tensor_path_writes_the_pil_store_when_no_resize_is_needed_and_nvjpeg_needs_cuda(module_config, encoded):
    # the tiny images are 32 px at data.resolution 32: no resize, and torchvision decodes PIL's pixels
    _, tensor = _encode(module_config, "encode.decode=tensor")
    assert tensor.fingerprint != encoded.fingerprint
    a, b = _arrays(encoded.dir / "features.zarr"), _arrays(tensor.dir / "features.zarr")
    assert all(np.array_equal(a[name], b[name]) for name in a)
    assert zarr.open_group(str(tensor.dir / "features.zarr")).attrs["decode"] == "tensor"
    with pytest.raises(ValueError, match=r"encode.decode: nvjpeg decodes on a CUDA device") as e:
        _encode(module_config, "encode.decode=nvjpeg", "runtime.device=cpu")
    assert "\n" not in str(e.value)


def test_compile_is_operational_and_a_padded_batch_gives_the_rows_of_the_unpadded_one(make_config):
    from stages.encode import encode_pixels, encoder_spec, load_encoder

    assert plan(make_config("encode.compile=true"))[1].fingerprint == plan(make_config())[1].fingerprint
    cfg = make_config()
    encoder = load_encoder(encoder_spec(cfg), "cpu")
    shapes = []

    def recorded(x):
        shapes.append(tuple(x.shape))
        return encoder(x)

    recorded.pixel_mean, recorded.pixel_std = encoder.pixel_mean, encoder.pixel_std  # what encode_pixels reads

    pixels = torch.randint(0, 256, (5, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    padded = encode_pixels(recorded, pixels, cfg.encoder.input_size, "fp32", "float16", pad_to=8)
    plain = encode_pixels(encoder, pixels, cfg.encoder.input_size, "fp32", "float16")
    assert shapes == [(8, 3, cfg.encoder.input_size, cfg.encoder.input_size)] and padded.shape == plain.shape
    torch.testing.assert_close(padded.float(), plain.float(), rtol=0, atol=2e-3)  # one float16 step at most


def test_the_encoder_attends_with_fused_sdpa(make_config):
    from stages.encode import encoder_spec, load_encoder

    encoder = load_encoder(encoder_spec(make_config()), "cpu")
    flags = [m.fused_attn for m in encoder.modules() if hasattr(m, "fused_attn")]
    assert len(flags) == len(encoder.vit.blocks) and all(flags)


def test_encoder_weights_are_read_once_from_the_bytes_of_the_planned_digest(make_config, tmp_path, monkeypatch):
    """The encoder's weights are read once and checked against the sha256 its fingerprint holds: a byte flipped
    in place after planning (size and mtime kept: the remembered digest still says the old bytes) is refused in
    one line naming encoder.weights; main encoded with the changed weights."""
    import safetensors.torch

    from pipeline.artifacts import DamagedError
    from pipeline.models.configured import encoder_arch
    from pipeline.models.rae import build_rae_encoder
    from stages.encode import encoder_spec, rae_encoder
    from tests.conftest import flip_byte

    monkeypatch.setenv("SRCFLOW_CACHE_DIR", str(tmp_path / "cache"))
    weights = tmp_path / "encoder.safetensors"
    arch = encoder_arch(make_config())
    safetensors.torch.save_file(build_rae_encoder("random", **arch, seed=3).vit.state_dict(), weights)
    cfg = make_config(f"encoder.weights={weights}")
    planned = plan(cfg)[1]  # encode, with the weights' digest in its fingerprint
    spec = encoder_spec(cfg)
    rae_encoder(spec, "cpu")
    flip_byte(weights, weights.stat().st_size - 3)  # inside the last tensor's data
    with pytest.raises(DamagedError, match=r"encoder\.weights: .* has sha256 .* not the") as e:
        rae_encoder(spec, "cpu")
    assert str(weights) in str(e.value) and "\n" not in str(e.value)
    assert spec.weights_sha256 == planned.external["encoder_weights"]  # what the stage's workers check against
