"""A first run that just works and says what it does: Prefect's temporary server (its start-up limit, a stop by
Ctrl-C or SIGTERM), a mistyped data root, planning that writes nothing, model file modes, `srcflow config`, the Zarr
stores in xarray, the progress display and TensorBoard's validation curves and run names."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
import zarr
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from typer.testing import CliRunner

from pipeline.config import config_dict, load_config
from srcflow.cli import app
from stages.runner import plan, run_pipeline
from tests.conftest import REPO, SMOKE, smoke_overrides
from tests.test_prefect import free_port

cli = CliRunner()


def write_config(cfg, path: Path) -> str:
    path.write_text(yaml.safe_dump(config_dict(cfg)))
    return str(path)


def tree(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


def srcflow_env(tmp_path: Path, prefect_home: Path | None, **extra: str) -> dict[str, str]:
    """A `srcflow run` subprocess's environment: this checkout's code, the ephemeral server (no PREFECT_API_URL) with
    srcflow's own start-up limit (the setting unset), a private digest cache."""
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "SRCFLOW_DEBUG",
                                                            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS")}
    env |= {"PYTHONPATH": str(REPO), "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
            "SRCFLOW_CACHE_DIR": str(tmp_path / "cache"), "PREFECT_HOME": str(prefect_home or tmp_path / "ph")}
    return env | extra


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


# --- Prefect's temporary server: start-up, and a run stopped by a signal -------------------------------------


def test_the_start_up_limit_defaults_high_and_a_configured_one_is_kept():
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, temporary_settings

    from srcflow.cli import STARTUP_TIMEOUT_S, startup_timeout

    if "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS" in os.environ:
        pytest.skip("the start-up limit is set in this environment")
    assert startup_timeout() == STARTUP_TIMEOUT_S >= 180  # Prefect's 20 s failed on this loaded machine
    with temporary_settings(updates={PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: 45}):
        assert startup_timeout() == 45  # a profile's (or the environment's) value is the user's


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_a_temporary_server_that_does_not_start_in_time_is_one_line_naming_the_setting(tmp_path, tiny_root):
    args = [a for s in smoke_overrides(tmp_path / "store", tiny_root) for a in ("--set", s)]
    env = srcflow_env(tmp_path, None, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="1")  # a fresh home: migrations
    r = subprocess.run([sys.executable, "-m", "srcflow.cli", "run", "--config", str(SMOKE), "--until", "shard", *args],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=280)
    assert r.returncode == 2, r.stdout + r.stderr
    (line,) = error_lines(r.stderr)
    assert "within 1 s" in line and "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS" in line
    assert "PREFECT_API_URL" in line and "Traceback" not in r.stderr
    assert not (tmp_path / "store" / "shard").exists()  # nothing ran


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_an_unreachable_prefect_api_url_is_one_line_before_any_work(tmp_path, tiny_root):
    url = f"http://127.0.0.1:{free_port()}/api"
    args = [a for s in smoke_overrides(tmp_path / "store", tiny_root) for a in ("--set", s)]
    r = subprocess.run([sys.executable, "-m", "srcflow.cli", "run", "--config", str(SMOKE), "--until", "shard", *args],
                       cwd=REPO, env=srcflow_env(tmp_path, None, PREFECT_API_URL=url), capture_output=True, text=True,
                       timeout=280)
    assert r.returncode == 2, r.stdout + r.stderr
    (line,) = error_lines(r.stderr)
    assert line.startswith(f"error: PREFECT_API_URL={url}: no Prefect server answers") and "Traceback" not in r.stderr
    assert not (tmp_path / "store" / "shard").exists()


def run_until_then_signal(command: list[str], env: dict, log: Path, ready: str, signum: int, group: bool,
                          ) -> tuple[int, float, str]:
    """Start `srcflow run` in its own session, wait for `ready` in its log, send the signal (to its process group, as
    a terminal's Ctrl-C does, or to the process alone); (exit code, seconds to exit, log)."""
    with open(log, "w") as out:
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 400
        while ready not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        sent = time.monotonic()
        os.killpg(proc.pid, signum) if group else os.kill(proc.pid, signum)
        code = proc.wait(timeout=120)
        return code, time.monotonic() - sent, log.read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.e2e
@pytest.mark.timeout(1200)
def test_ctrl_c_and_sigterm_under_the_temporary_server_stop_in_seconds_with_one_line_and_the_run_resumes(
        stores, tmp_path, prefect_home):
    cfg = stores("stopped", "src.steps=100000", "src.ckpt_every=20", "src.log_every=20")
    config = write_config(cfg, tmp_path / "config.yaml")
    command = [sys.executable, "-m", "srcflow.cli", "run", "--config", config, "--until", "fit_src"]
    env = srcflow_env(tmp_path, prefect_home)

    # Ctrl-C in a terminal: SIGINT to the whole foreground process group, the temporary server's process included
    code, seconds, log = run_until_then_signal(command, env, tmp_path / "first.log", "fit_src: step 20/", signal.SIGINT,
                                               group=True)
    print(f"SIGINT -> exit in {seconds:.1f} s")
    assert code == 130, log[-3000:]
    (line,) = error_lines(log)
    assert line.startswith("error: fit_src: stopped by signal 2 at step") and "run again to resume" in line
    for flood in ("Traceback", "Error logging to API", "ConnectError", "Task run failed"):
        assert flood not in log, log[-3000:]
    assert seconds < 30  # was ~150 s of retries against the server the Ctrl-C had killed

    # the next run resumes from the checkpoint; SIGTERM to the process alone stops it the same way
    code, seconds, log = run_until_then_signal(command, env, tmp_path / "second.log", "fit_src: resumed at step",
                                               signal.SIGTERM, group=False)
    print(f"SIGTERM -> exit in {seconds:.1f} s")
    assert code == 143, log[-3000:]
    (line,) = error_lines(log)
    assert line.startswith("error: fit_src: stopped by signal 15 at step") and seconds < 30
    resumed = int(log.split("fit_src: resumed at step ")[1].split()[0])
    assert resumed >= 20 and "Traceback" not in log
    (p,) = [p for p in plan(cfg) if p.name == "fit_src"]
    assert p.state == "partial"  # never done by a stop; the next run goes on from its last checkpoint


# --- data.root and read-only planning -------------------------------------------------------------------------


def test_a_mistyped_data_root_is_one_line_and_creates_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SRCFLOW_CACHE_DIR", raising=False)
    typo = ["--set", "data.root=data/tiny-imagnet", "--set", "storage.root=store"]
    for command in (["run"], ["status"], ["plan"]):
        r = cli.invoke(app, [*command, "--config", str(SMOKE), *typo])
        if command == ["plan"]:  # plan estimates from the config; it never lists or makes data
            assert r.exit_code == 0, r.output
            continue
        assert r.exit_code == 2, r.output
        (line,) = [line for line in r.output.splitlines() if line.strip()]
        assert line.startswith("error: data.root: data/tiny-imagnet does not exist")
        assert "generates the tiny set only at data/tiny-imagenet" in line
    assert tree(tmp_path) == []  # no dataset at the typo, no store, no cache


def test_status_plan_and_verify_write_no_data_weights_or_caches(tmp_path, monkeypatch, tiny_root):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SRCFLOW_CACHE_DIR", raising=False)
    # a fresh checkout: the tiny dataset and the stand-in Inception are still to be made
    r = cli.invoke(app, ["status", "--config", str(SMOKE), "--json"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)
    assert {row["state"] for row in rows} == {"missing"}
    waits = {row["stage"]: row["waits_for"] for row in rows}
    assert waits["shard"] == "data/tiny-imagenet (`srcflow run` generates it)"
    assert "standin-inception.pth" in waits["reference"] and set(waits) == {row["stage"] for row in rows}
    for command in (["status"], ["plan"], ["plan", "--json"], ["verify"]):
        r = cli.invoke(app, [*command, "--config", str(SMOKE)])
        assert r.exit_code == 0, (command, r.output)
    assert tree(tmp_path) == []

    # existing data and weights: their digests are computed, and not cached by a read-only command
    standin = tiny_root.parent / "standin-inception.pth"
    sets = [a for s in (f"data.root={tiny_root}", "data.generate_tiny=null", f"evaluate.inception_weights={standin}",
                        "storage.root=store", "runtime.progress=false") for a in ("--set", s)]
    for command in (["status"], ["plan"], ["verify"]):
        r = cli.invoke(app, [*command, "--config", str(SMOKE), *sets])
        assert r.exit_code == 0, (command, r.output)
    assert tree(tmp_path) == []
    run_pipeline(load_config(SMOKE, sets[1::2]), only=["shard"])  # a run keeps its caches
    assert (tmp_path / ".srcflow" / "listings").is_dir()
    before = tree(tmp_path)
    assert cli.invoke(app, ["status", "--config", str(SMOKE), *sets]).exit_code == 0
    assert tree(tmp_path) == before


def test_generate_tiny_makes_the_set_only_at_its_own_root(tmp_path):
    from stages.inputs import PENDING, dataset_inputs

    root = tmp_path / "tiny"
    cfg = load_config(SMOKE, [f"data.root={root}", f"data.generate_tiny.root={tmp_path / 'elsewhere'}"])
    with pytest.raises(FileNotFoundError, match=f"generates the tiny set only at {tmp_path / 'elsewhere'}"):
        dataset_inputs(cfg)
    assert not root.exists()
    cfg = load_config(SMOKE, [f"data.root={root}", f"data.generate_tiny.root={root}", "data.generate_tiny.per_class=2",
                              "data.generate_tiny.val_per_class=1"])
    digest = dataset_inputs(cfg)["dataset_listing"]  # a run: the set is made, then listed
    assert not digest.startswith(PENDING) and (root / "train").is_dir()


# --- files ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_model_files_get_the_umask_mode_like_every_other_output(tmp_path, umask):
    import safetensors.torch

    from pipeline.training import save_safetensors
    from storage_schemas.success import write_atomic

    previous = os.umask(umask)
    try:
        save_safetensors(torch.nn.Linear(2, 2), tmp_path / "model.safetensors", metadata={})
        write_atomic(tmp_path / "by-name.safetensors",
                     lambda f: safetensors.torch.save_file({"a": torch.zeros(2)}, f.name))  # writes 0600 by itself
        write_atomic(tmp_path / "plain.json", "{}")
    finally:
        os.umask(previous)
    for name in ("model.safetensors", "by-name.safetensors", "plain.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask, name


def test_every_file_of_a_trained_output_is_readable_by_others(stores):
    umask = os.umask(0)
    os.umask(umask)
    m = run_pipeline(stores("modes", "src.steps=4"), until="fit_src")["fit_src"]
    modes = {f.path: stat.S_IMODE((m.dir / f.path).stat().st_mode) for f in m.files}
    assert "src.safetensors" in modes and set(modes.values()) == {0o666 & ~umask}, modes


# --- srcflow config and the command line ---------------------------------------------------------------------


def test_srcflow_config_prints_the_resolved_config_with_each_values_source():
    r = cli.invoke(app, ["config", "--config", str(SMOKE), "--set", "src.dim=16", "--set", "train.steps=7"])
    assert r.exit_code == 0, r.output
    assert yaml.safe_load(r.stdout) == config_dict(load_config(SMOKE, ["src.dim=16", "train.steps=7"]))
    lines = [line.strip() for line in r.stdout.splitlines()]
    assert any(line.startswith("dim: 16 ") and line.endswith("# --set src.dim=16") for line in lines)
    assert any(line.startswith("name: vit_base_patch14_reg4_dinov2 ") and line.endswith("# default") for line in lines)
    r = cli.invoke(app, ["config", "--config", str(SMOKE), "--set", "src.dim=16", "--json"])
    sources = {row["key"]: row["source"] for row in json.loads(r.stdout)}
    assert sources["src.dim"] == "--set src.dim=16" and sources["encoder.arch.depth"] == str(SMOKE)
    assert sources["encoder.name"] == "default" and sources["flow.noise_sigma"] == f"derived (null in {SMOKE})"
    operational = {row["key"] for row in json.loads(r.stdout) if row["operational"]}
    assert {"runtime.device", "storage.root", "train.ckpt_every"} <= operational and "src.dim" not in operational


def test_a_key_error_names_its_set_or_its_file_and_the_closest_key(tmp_path):
    r = cli.invoke(app, ["config", "--config", str(SMOKE), "--set", "src.dimm=16"])
    assert r.exit_code == 2
    (line,) = r.output.splitlines()
    assert line.startswith("error: --set src.dimm=16: unknown key src.dimm (did you mean src.dim?); known: ")
    r = cli.invoke(app, ["status", "--config", str(SMOKE), "--set", "train.steps=many"])
    assert r.output.startswith("error: --set train.steps=many: train.steps: Input should be a valid integer")
    bad = tmp_path / "bad.yaml"
    bad.write_text("src:\n  dimm: 3\n")
    r = cli.invoke(app, ["run", "--config", str(bad), "--set", "src.dim=16"])
    assert r.output.startswith(f"error: {bad}: unknown key src.dimm (did you mean src.dim?)")


def test_run_help_lists_the_stages_and_its_switches_take_no_value():
    r = subprocess.run([sys.executable, "-m", "srcflow.cli", "run", "--help"], cwd=REPO, capture_output=True,
                       text=True, env={**os.environ, "COLUMNS": "200"}, timeout=120)
    assert r.returncode == 0, r.stderr
    from stages import STAGE_NAMES

    assert ", ".join(STAGE_NAMES) in " ".join(r.stdout.split())
    (prefect,) = [line for line in r.stdout.splitlines() if line.lstrip("│ ").startswith("--prefect")]  # its row
    assert "<bool>" not in prefect and "Prefect flow" in prefect


# --- the Zarr stores in xarray ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compressed(stores):
    cfg = stores("xarray", until="compress")
    return {p.name: p.path for p in plan(cfg)}


@pytest.mark.parametrize("store, data", [("encode/features.zarr", "features"), ("compress/codes.zarr", "codes")])
def test_the_stores_open_in_xarray_with_row_coordinates_and_attributes(compressed, store, data):
    import xarray as xr

    stage, name = store.split("/")
    ds = xr.open_dataset(compressed[stage] / name, engine="zarr")
    assert set(ds.coords) == {"labels", "split", "view", "key"} and "keys" not in ds.variables
    assert callable(ds.keys) and all(ds[c].dims == ("row",) for c in ds.coords)
    for name, variable in ds.variables.items():
        assert variable.attrs["long_name"] and variable.attrs.get("units") == (None if name == "key" else "1")
    assert ds.split.attrs["flag_meanings"] == "train val" and ds.view.attrs["flag_meanings"] == "plain flip"
    means = ds[data].astype("float64").groupby("labels").mean()
    values, labels = ds[data].values.astype(np.float64), ds.labels.values
    for label in np.unique(labels):
        np.testing.assert_allclose(means.sel(labels=label).values, values[labels == label].mean(0), rtol=1e-3)


def test_a_version_1_store_is_read_and_repaired_as_before_and_other_versions_are_refused(compressed, tmp_path):
    from pipeline.data.zarr_store import consolidate, write_rows
    from storage_schemas import SchemaError
    from storage_schemas.zarr_layouts import FEATURES, array_name

    v1 = tmp_path / "features.zarr"
    shutil.copytree(compressed["encode"] / "features.zarr", v1)
    keys = zarr.open_group(str(v1), mode="r")["key"][...]
    (v1 / "key").rename(v1 / "keys")  # version 1's name, and its version number
    zarr.open_group(str(v1), mode="r+", use_consolidated=False).attrs["schema_version"] = 1
    consolidate(v1)
    group = zarr.open_group(str(v1), mode="r")
    FEATURES.validate(v1)
    assert array_name(group, "key") == "keys" and list(group["keys"][...]) == list(keys)
    rows = (group["keys"].shards or group["keys"].chunks)[0]
    files = write_rows(v1, 0, {"key": keys[:rows]})  # a repair of shard 0 writes into the store's own names
    assert [f.relative_to(v1).parts[0] for f in files] == ["keys"] and not (v1 / "key").exists()
    zarr.open_group(str(v1), mode="r+", use_consolidated=False).attrs["schema_version"] = 4
    consolidate(v1)
    with pytest.raises(SchemaError, match="schema version 4 is not supported") as e:
        FEATURES.validate(v1)
    assert "\n" not in str(e.value)


# --- progress -----------------------------------------------------------------------------------------------------


def test_meters_share_one_display_and_report_done_total_rate_and_eta(monkeypatch):
    from pipeline import progress as progress_module
    from pipeline.progress import progress, set_reporter

    reports = []
    monkeypatch.setattr(progress_module, "_MODE", True)
    set_reporter(lambda m: reports.append((m.desc, m.done, m.total, m.finished, m.summary())))
    try:
        with progress("train", 10, "steps", done=4) as train:  # resumed at step 4
            display = progress_module._display
            with progress("report", 2, "img") as report:
                assert progress_module._display is display and len(display.tasks) == 2  # one display, two lines
                report.advance(2)
            assert len(display.tasks) == 1
            time.sleep(0.05)
            train.advance(3)
            assert "7/10 steps" in train.summary() and ", ETA " in train.summary()
            assert train.rate < 4 / 0.05  # the 4 resumed steps are not this run's
            train.advance(3)
    finally:
        set_reporter(None)
    assert progress_module._display is None  # the last meter closed the display
    assert [r[:4] for r in reports] == [("train", 4, 10, False), ("report", 0, 2, False), ("report", 2, 2, True),
                                       ("train", 10, 10, True)]
    assert reports[-1][4].startswith("10/10 steps, ") and "ETA" not in reports[-1][4]


# --- TensorBoard -------------------------------------------------------------------------------------------------


def test_training_logs_validation_curves_an_image_at_the_end_and_readable_run_names(stores):
    cfg = stores("curves", "src.steps=12", "src.log_every=5", "train.steps=10", "train.log_every=5",
                 "train.batch_size=16", "train.eval_batch_size=8", "flow.width=16", "flow.heads=2", "flow.num_blocks=1",
                 "flow.layers_per_block=1")
    manifests = run_pipeline(cfg, until="train_flow")
    src = EventAccumulator(str(manifests["fit_src"].dir / "tensorboard"), size_guidance={"images": 0}).Reload()
    for tag in ("val/feature_mse", "val/feature_cosine"):
        assert [e.step for e in src.Scalars(tag)] == [5, 10, 12]
    assert [e.step for e in src.Images("train/reconstructions")] == [12]  # image_every (1000) is longer than the run
    flow = EventAccumulator(str(manifests["train_flow"].dir / "tensorboard")).Reload()
    assert [e.step for e in flow.Scalars("val/bits_per_dim")] == [5, 10]
    assert all(np.isfinite(e.value) for e in flow.Scalars("val/bits_per_dim"))

    # a second SRC width in the same store: every run is named by the keys in which the runs differ
    run_pipeline(load_config(write_config(cfg, Path(cfg.storage.root) / "cfg.yaml"), ["src.dim=4"]), until="fit_src")
    runs = Path(cfg.storage.root) / "tensorboard"
    names = {link.name: os.readlink(link) for link in runs.iterdir()}
    assert names["fit_src src.dim=6"] == f"../fit_src/{manifests['fit_src'].fingerprint[:16]}/tensorboard"
    assert "fit_src src.dim=4" in names and names["train_flow"].startswith("../train_flow/")
    named = EventAccumulator(str(runs / "fit_src src.dim=6")).Reload()
    assert [e.step for e in named.Scalars("val/feature_mse")] == [5, 10, 12]
