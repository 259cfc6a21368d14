"""The CLI: status states and JSON, staleness after semantic vs operational changes, one-line errors, inspect."""

import json

import pytest
from typer.testing import CliRunner

from srcflow.cli import app
from tests.conftest import SMOKE

runner = CliRunner()
ENCODE = ("encode.rows_per_shard=8", "encode.rows_per_chunk=4")


@pytest.fixture(scope="module")
def store(module_config, tiny_root, prebuilt):
    """shard and encode done (built once per session, copied); returns the --set arguments that point the CLI at
    them."""
    cfg = prebuilt(module_config(*ENCODE))
    sets = [f"storage.root={cfg.storage.root}", f"data.root={tiny_root}", "data.generate_tiny=null",
            "data.resolution=32", "decoder.patch_size=4", "shard.samples_per_shard=16", *ENCODE,
            f"evaluate.inception_weights={tiny_root.parent / 'standin-inception.pth'}"]
    return [arg for s in sets for arg in ("--set", s)]


def status(store, *extra) -> dict:
    result = runner.invoke(app, ["status", "--config", str(SMOKE), *store, *[a for s in extra for a in ("--set", s)],
                                 "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert all({"stage", "state", "fingerprint", "path", "bytes"} <= row.keys() for row in rows)
    return {row["stage"]: row["state"] for row in rows}


def test_status_json_reports_done_stages_and_missing_ones(store):
    states = status(store)
    assert states["shard"] == states["encode"] == "done"
    later = ("fit_decoder", "fit_src", "compress", "train_flow", "sample", "evaluate")
    assert {states[s] for s in later} == {"missing"}


def test_a_semantic_change_marks_the_stage_and_its_downstream_stale_and_leaves_upstream_done(store):
    states = status(store, "encode.views=[plain]")
    assert states["shard"] == "done" and states["encode"] == "stale"
    states = status(store, "shard.samples_per_shard=8")
    assert states["shard"] == "stale" and states["encode"] == "stale"


def test_an_operational_change_marks_nothing_stale(store):
    states = status(store, "encode.batch_size=3", "runtime.workers=2", "shard.workers=3", "runtime.log_level=DEBUG")
    assert states["shard"] == states["encode"] == "done"


def test_a_bad_config_key_is_a_one_line_error(store):
    result = runner.invoke(app, ["run", "--config", str(SMOKE), *store, "--set", "encode.batchsize=3"])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "unknown key encode.batchsize" in lines[0]


def test_stage_of_a_run_needs_its_upstream_done(store):
    result = runner.invoke(app, ["run", "--config", str(SMOKE), *store, "--stage", "compress"])
    assert result.exit_code == 2 and "needs" in result.output and "srcflow run --until compress" in result.output


def test_inspect_summarises_a_manifest_a_shard_set_and_a_zarr_store(module_config, store):
    from stages.runner import plan

    paths = {p.name: p.path for p in plan(module_config(*ENCODE))}
    manifest = json.loads(runner.invoke(app, ["inspect", str(paths["shard"] / "manifest.parquet")]).stdout)
    assert manifest["rows"] == 64 and manifest["count_by_split"] == {"train": 48, "val": 16}
    shards = json.loads(runner.invoke(app, ["inspect", str(paths["shard"])]).stdout)
    assert shards["splits"]["train"]["samples"] == 48 and shards["tar_files"] == 4
    features = json.loads(runner.invoke(app, ["inspect", str(paths["encode"] / "features.zarr")]).stdout)
    assert features["arrays"]["features"]["dimension_names"] == ["row", "token", "channel"]
    assert features["attrs"]["srcflow_schema"] == "features"
