"""The arithmetic a stage computes in (pipeline/device.py): TF32 only inside the encoder's forward, and every stage
as in a fresh process whatever ran before it in this one.

On a CPU the TF32 flags change no number, so these tests watch the process-wide flags themselves: set inside the
encoder's fp32 forward on CUDA (as RAE encodes), restored after it, never seen by the stage that runs next.
"""

import threading

import numpy as np
import pytest
import torch
import zarr

import stages.compress as compress_stage
import stages.encode as encode_stage
import stages.shard as shard_stage
from pipeline.device import FRESH_PROCESS, inference_precision, precision_flags, set_precision_flags
from stages.runner import plan, run_stage

TF32 = dict.fromkeys(FRESH_PROCESS, True)


@pytest.fixture
def flags():
    """The test's own TF32 flags, restored whatever it leaves behind."""
    saved = precision_flags()
    yield
    set_precision_flags(saved)


def test_the_encoders_tf32_lasts_as_long_as_its_forward(flags):
    before = precision_flags()
    assert before == FRESH_PROCESS
    with inference_precision("cuda", "fp32"):  # the flags alone: no CUDA device is touched
        assert precision_flags() == TF32
    assert precision_flags() == before
    with inference_precision("cpu", "fp32"):
        assert precision_flags() == before  # nothing to set on the CPU
    with inference_precision("cpu", "bf16"):
        assert torch.is_autocast_enabled("cpu") and precision_flags() == before
    assert not torch.is_autocast_enabled("cpu")
    with pytest.raises(ValueError, match="precision must be"), inference_precision("cuda", "fp16"):
        pass
    assert precision_flags() == before


def test_forwards_that_overlap_in_threads_keep_tf32_until_the_last_one_ends(flags):
    """encode runs jobs in threads: one job leaving its forward must not turn TF32 off under another's."""
    first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def first():
        with inference_precision("cuda", "fp32"):
            first_in.set()
            second_in.wait(10)
        first_out.set()

    def second():
        first_in.wait(10)
        with inference_precision("cuda", "fp32"):
            second_in.set()
            first_out.wait(10)
            seen["after the first left"] = precision_flags()

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert seen == {"after the first left": TF32}
    assert precision_flags() == FRESH_PROCESS


def test_a_stage_computes_with_the_flags_of_a_fresh_process_whatever_ran_before(make_config, flags, monkeypatch):
    """Something earlier in the process left TF32 on (main's encode did, for good, on every GPU run): the next stage
    still computes with torch's defaults, and the caller gets its own flags back."""
    seen = []
    real = shard_stage.run
    monkeypatch.setattr(shard_stage, "run", lambda *args: seen.append(precision_flags()) or real(*args))
    cfg = make_config()
    set_precision_flags(TF32)
    run_stage({p.name: p for p in plan(cfg, "shard")}["shard"], cfg)
    assert seen == [FRESH_PROCESS]
    assert precision_flags() == TF32


def test_two_stages_in_one_process_give_the_same_outputs_in_either_order(stores, flags, monkeypatch):
    """encode and compress run in one process in both orders (each forced): compress computes with the same flags
    (a fresh process's) and writes the same codes whether encode ran before it or not, and each stage leaves the
    process's flags as it found them. encode is told it runs on CUDA, so its forward sets TF32 as on a GPU."""
    cfg = stores("numerics", until="compress")
    planned = {p.name: p for p in plan(cfg, "compress")}
    real_precision = encode_stage.inference_precision
    monkeypatch.setattr(encode_stage, "inference_precision", lambda _, precision: real_precision("cuda", precision))
    inside_compress = []
    real_codes = compress_stage.encode_codes
    monkeypatch.setattr(compress_stage, "encode_codes",
                        lambda *args: inside_compress.append(precision_flags()) or real_codes(*args))

    def run(name):
        before = precision_flags()
        manifest = run_stage(planned[name], cfg, force=True)
        assert precision_flags() == before, name
        group = zarr.open_group(str(manifest.dir / ("codes.zarr" if name == "compress" else "features.zarr")))
        return group["codes" if name == "compress" else "features"][...]

    features_a, codes_a = run("encode"), run("compress")
    seen_a, inside_compress[:] = list(inside_compress), []
    codes_b, features_b = run("compress"), run("encode")
    assert seen_a and set(map(str, seen_a)) == set(map(str, inside_compress)) == {str(FRESH_PROCESS)}
    assert np.array_equal(codes_a, codes_b) and np.array_equal(features_a, features_b)
