"""Bad inputs fail before any work, in one line naming the key or file (tracebacks only with --debug), and a run
with nothing to do starts nothing.

Each `srcflow run` below is on a fresh root: the assertion that no stage folder exists afterwards is what
"before `shard` starts" means.
"""

import os
import subprocess
import sys

import numpy as np
import pytest
import safetensors.torch
import torch
from typer.testing import CliRunner

import stages.inputs
from pipeline.artifacts import check_once
from pipeline.config import load_config
from pipeline.models.configured import decoder_arch, encoder_arch
from srcflow.cli import app, one_line_errors
from stages.runner import plan
from storage_schemas.samples import open_samples
from tests.conftest import REPO, SMOKE

cli = CliRunner()


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """A fresh check and digest cache per test: a pass remembered by another test must not hide a failure."""
    monkeypatch.setenv("SRCFLOW_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr("pipeline.artifacts._PASSED", set())
    monkeypatch.setattr("pipeline.artifacts._DIGESTS", {})


def sets(tmp_path, tiny_root, *overrides) -> list[str]:
    values = [f"storage.root={tmp_path / 'root'}", f"data.root={tiny_root}", "data.generate_tiny=null",
              f"evaluate.inception_weights={tiny_root.parent / 'standin-inception.pth'}", "data.resolution=32",
              "decoder.patch_size=4", *overrides]
    return [a for v in values for a in ("--set", v)]


def refused(tmp_path, tiny_root, *overrides, key: str):
    """`srcflow run` exits 2 with one line naming `key`, and no stage has started."""
    r = cli.invoke(app, ["run", "--config", str(SMOKE), *sets(tmp_path, tiny_root, *overrides)])
    lines = r.output.strip().splitlines()
    assert r.exit_code == 2 and len(lines) == 1 and key in lines[0] and "Traceback" not in r.output, r.output
    assert not (tmp_path / "root").exists() or not any((tmp_path / "root").iterdir()), "a stage started"
    return lines[0]


def smoke(tiny_root, *overrides):
    return load_config(SMOKE, [f"data.root={tiny_root}", "data.generate_tiny=null", "data.resolution=32",
                               "decoder.patch_size=4", *overrides])


# --- weights files, checked against the configured architecture at plan time ------------------------------


def decoder_state(cfg, **changes):
    from pipeline.models.rae import build_rae_decoder

    return build_rae_decoder(None, **{**decoder_arch(cfg), **changes}).state_dict()


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_a_wrong_shape_decoder_is_refused_before_shard(tmp_path, tiny_root, suffix):
    path = tmp_path / f"decoder{suffix}"
    state = decoder_state(smoke(tiny_root), hidden_size=64)  # the config says 128
    safetensors.torch.save_file(state, path) if suffix == ".safetensors" else torch.save(state, path)
    line = refused(tmp_path, tiny_root, f"decoder.weights={path}", key="decoder.weights")
    assert str(path) in line and "shape mismatches" in line


def test_a_fitting_decoder_is_checked_once_and_then_planned_without_torch(tmp_path, tiny_root, monkeypatch):
    path = tmp_path / "decoder.safetensors"
    cfg = smoke(tiny_root, f"decoder.weights={path}", f"storage.root={tmp_path / 'root'}",
                f"evaluate.inception_weights={tiny_root.parent / 'standin-inception.pth'}")
    safetensors.torch.save_file(decoder_state(cfg), path)
    assert {p.name for p in plan(cfg)} >= {"fit_src", "sample"} and "fit_decoder" not in {p.name for p in plan(cfg)}

    from pipeline.models import rae

    build = rae.build_rae_decoder

    def no_second_check(*args, **kwargs):
        raise AssertionError("the decoder was checked again")

    monkeypatch.setattr(rae, "build_rae_decoder", no_second_check)
    monkeypatch.setattr("pipeline.artifacts._PASSED", set())  # as a new process: only the on-disk cache remains
    plan(cfg)
    overrides = [f"data.root={tiny_root}", "data.generate_tiny=null", "data.resolution=32", "decoder.patch_size=4",
                 f"decoder.weights={path}", f"storage.root={tmp_path / 'root'}",
                 f"evaluate.inception_weights={tiny_root.parent / 'standin-inception.pth'}"]
    code = ("import sys; from pipeline.config import load_config; from stages.runner import plan; "
            f"plan(load_config({str(SMOKE)!r}, {overrides!r})); "
            "print(sorted(m for m in ('torch', 'timm', 'prefect') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("[]"), out

    monkeypatch.setattr(rae, "build_rae_decoder", build)
    safetensors.torch.save_file(decoder_state(cfg, depth=1), path)  # other bytes: checked again, and refused
    with pytest.raises(ValueError, match=r"decoder.weights: .* expected keys missing"):
        plan(cfg)


def test_garbage_and_wrong_shape_encoder_weights_are_refused_before_shard(tmp_path, tiny_root):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(os.urandom(4096))
    line = refused(tmp_path, tiny_root, f"encoder.weights={garbage}", key="encoder.weights")
    assert str(garbage) in line and "could not be read" in line

    from pipeline.models.rae import build_rae_encoder

    arch = encoder_arch(smoke(tiny_root))
    other = build_rae_encoder("random", **{**arch, "arch": {**arch["arch"], "embed_dim": 32, "num_heads": 2}})
    wrong = tmp_path / "encoder.safetensors"
    safetensors.torch.save_file(other.vit.state_dict(), wrong)
    line = refused(tmp_path, tiny_root, f"encoder.weights={wrong}", key="encoder.weights")
    assert str(wrong) in line and "shape" in line

    right = tmp_path / "right.safetensors"
    safetensors.torch.save_file(build_rae_encoder("random", **arch).vit.state_dict(), right)
    assert plan(smoke(tiny_root, f"encoder.weights={right}", f"storage.root={tmp_path / 'root'}",
                      f"evaluate.inception_weights={tiny_root.parent / 'standin-inception.pth'}"))


def test_a_file_that_is_not_the_inception_is_refused_at_plan_time(tmp_path, tiny_root):
    wrong = tmp_path / "inception.pth"
    torch.save({"fc.weight": torch.zeros(3, 3)}, wrong)
    line = refused(tmp_path, tiny_root, f"evaluate.inception_weights={wrong}", "evaluate.make_standin=false",
                   key="evaluate.inception_weights")
    assert str(wrong) in line and "not torch-fidelity's Inception" in line


# --- batch sizes and memory ------------------------------------------------------------------------------


def test_a_batch_larger_than_the_data_is_refused(tmp_path, tiny_root):
    line = refused(tmp_path, tiny_root, "train.batch_size=100000", key="train.batch_size")
    assert "100000" in line and "96 training rows" in line  # 4 classes x 12 images x 2 views


def test_a_batch_whose_memory_exceeds_the_machine_is_refused(tmp_path, tiny_root, monkeypatch):
    monkeypatch.setattr("stages.runner.machine_memory", lambda device: (2 * 1024**3, None))  # a 2 GB machine
    line = refused(tmp_path, tiny_root, "flow.width=2048", key="train.batch_size")
    assert "host memory" in line and "runtime.memory_check=false" in line
    assert cli.invoke(app, ["plan", "--config", str(SMOKE), *sets(tmp_path, tiny_root)]).exit_code == 0


def test_too_many_worker_processes_are_blamed_on_runtime_workers(tmp_path, tiny_root, monkeypatch):
    """64 encode processes do not fit an 8 GB machine, though one does: the key to change is runtime.workers
    (main blamed encode.batch_size)."""
    monkeypatch.setattr("stages.runner.machine_memory", lambda device: (8 * 1024**3, None))
    line = refused(tmp_path, tiny_root, "runtime.workers=64", key="runtime.workers")
    assert line.startswith("error: runtime.workers: 64 encode processes") and "use at most 10" in line, line


# --- data.root -------------------------------------------------------------------------------------------


def test_a_file_or_an_empty_folder_as_data_root_is_one_line(tmp_path, tiny_root):
    a_file = tmp_path / "imagenet.tar"
    a_file.write_bytes(b"x")
    assert "is a file" in refused(tmp_path, tiny_root, f"data.root={a_file}", key="data.root")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "is empty" in refused(tmp_path, tiny_root, f"data.root={empty}", key="data.root")
    (empty / "train" / "n01440764").mkdir(parents=True)
    (empty / "val" / "n01440764").mkdir(parents=True)
    assert "holds no train images" in refused(tmp_path, tiny_root, f"data.root={empty}", key="data.root")


def test_the_listing_digest_is_remembered_until_a_folder_changes(tmp_path, tiny_root, monkeypatch):
    import shutil

    root = tmp_path / "imagenet"
    shutil.copytree(tiny_root, root)
    cfg = smoke(root)
    first = stages.inputs.dataset_inputs(cfg)
    stages.inputs._scan.cache_clear()
    scans = []
    real_scan = stages.inputs.scan_split
    monkeypatch.setattr(stages.inputs, "scan_split", lambda *a, **k: scans.append(a) or real_scan(*a, **k))
    assert stages.inputs.dataset_inputs(cfg) == first and not scans  # remembered: nothing listed
    victim = next((root / "train").glob("*/*"))
    victim.rename(victim.with_name("renamed" + victim.suffix))
    assert stages.inputs.dataset_inputs(cfg) != first and scans  # the class folder's mtime changed


# --- messages --------------------------------------------------------------------------------------------


def test_a_truncated_samples_npz_names_the_file(tmp_path):
    path = tmp_path / "samples-cfg1.0.npz"
    np.savez(path, arr_0=np.zeros((4, 8, 8, 3), np.uint8), arr_1=np.arange(4))
    os.truncate(path, path.stat().st_size // 2)
    with pytest.raises(ValueError, match=f"^{path}: not a complete .npz .* truncated"):
        open_samples(path)


def test_an_os_error_is_one_line_naming_the_file_and_debug_shows_the_traceback(monkeypatch, capsys):
    import typer

    full = OSError(28, "No space left on device")
    full.filename = "/store/encode/x/features.zarr/c/0"
    with pytest.raises(typer.Exit), one_line_errors():
        raise full
    assert "No space left on device: '/store/encode/x/features.zarr/c/0'" in capsys.readouterr().err
    monkeypatch.setenv("SRCFLOW_DEBUG", "1")
    with pytest.raises(OSError), one_line_errors():
        raise full


def test_debug_shows_the_traceback_of_a_refusal(tmp_path, tiny_root, monkeypatch):
    monkeypatch.setenv("SRCFLOW_DEBUG", "0")  # --debug sets it to 1 for the process: monkeypatch restores it
    args = ["run", "--config", str(SMOKE), *sets(tmp_path, tiny_root, "train.batch_size=100000")]
    r = cli.invoke(app, ["--debug", *args])
    assert r.exit_code == 1 and isinstance(r.exception, ValueError) and "train.batch_size" in str(r.exception)


# --- a run with nothing to do ----------------------------------------------------------------------------


def test_a_no_op_run_reports_every_stage_done_and_starts_no_prefect(tmp_path, tiny_root, monkeypatch):
    from stages.runner import run_pipeline

    args = sets(tmp_path, tiny_root, "src.steps=2", "fit_decoder.steps=2", "train.steps=2", "sample.per_class=1",
                "reference.max_images=4", "reference.pr_images=4", "evaluate.kid_subset_size=4")
    cfg = load_config(SMOKE, [a for a in args if a != "--set"])
    run_pipeline(cfg, until="compress")
    monkeypatch.setitem(sys.modules, "flows.full", None)  # importing the flow (Prefect) would fail
    r = cli.invoke(app, ["run", "--config", str(SMOKE), *args, "--until", "compress"])
    assert r.exit_code == 0, r.output
    assert [line.split(":")[0] for line in r.output.splitlines()[:-1]] == ["shard", "encode", "fit_decoder", "fit_src",
                                                                           "compress"]
    assert "Prefect was not started" in r.output.splitlines()[-1]
    r = cli.invoke(app, ["run", "--config", str(SMOKE), *args, "--until", "compress", "--prefect"])
    assert r.exit_code != 0  # --prefect goes to the flow, which this test made unimportable


def test_check_once_remembers_a_pass_for_these_bytes_and_this_spec(tmp_path):
    path = tmp_path / "w.bin"
    path.write_bytes(b"abc")
    calls = []
    check_once(path, "arch-a", lambda: calls.append("a"))
    check_once(path, "arch-a", lambda: calls.append("again"))
    check_once(path, "arch-b", lambda: calls.append("b"))
    with pytest.raises(ValueError):
        check_once(path, "arch-c", lambda: (_ for _ in ()).throw(ValueError("bad")))
    with pytest.raises(ValueError):  # a failure is never remembered
        check_once(path, "arch-c", lambda: (_ for _ in ()).throw(ValueError("bad")))
    assert calls == ["a", "b"]


# --- a stage failing inside the Prefect flow ---------------------------------------------------------------

FAILING_RUN = """
import sys
import stages.shard
def fail(cfg, upstream, out):
    raise ValueError("shard: a stage failing at run time")
stages.shard.run = fail
from srcflow.cli import app
sys.argv = ["srcflow", *sys.argv[1:]]
app()
"""


@pytest.mark.e2e
def test_a_stage_failing_inside_the_flow_is_one_line_per_run_without_tracebacks(tmp_path, tiny_root, prefect_home):
    env = {**os.environ, "PREFECT_HOME": str(prefect_home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180"}
    env.pop("SRCFLOW_DEBUG", None)
    r = subprocess.run([sys.executable, "-c", FAILING_RUN, "run", "--config", str(SMOKE), "--until", "shard",
                        *sets(tmp_path, tiny_root)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    assert "error: flow run Failed" in r.stderr and "shard: a stage failing at run time" in r.stderr


def test_prefect_run_logs_keep_their_traceback_only_with_debug(monkeypatch):
    import logging

    from srcflow.cli import drop_traceback

    def record():
        try:
            raise ValueError("x")
        except ValueError:
            return logging.LogRecord("prefect.task_runs", logging.ERROR, __file__, 1, "failed: %r", (1,),
                                     sys.exc_info())

    monkeypatch.setenv("SRCFLOW_DEBUG", "0")
    r = record()
    assert drop_traceback(r) and r.exc_info is None
    monkeypatch.setenv("SRCFLOW_DEBUG", "1")
    r = record()
    assert drop_traceback(r) and r.exc_info is not None
