"""Fault injection: damaged, copied, moved and concurrently written stores are detected and never used.

Each test damages a store the way a user or a machine would (a deleted Zarr shard file, a truncated
tar, a garbage `_SUCCESS.json`, a copy, a move, two runs at once, a killed `--force`) and checks both
the detection (`status`, `verify`, the readers) and the recovery (`run`).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
import zarr
from typer.testing import CliRunner

from pipeline.artifacts import ArtifactStore
from pipeline.config import config_dict, load_config
from pipeline.data.features import open_features
from srcflow.cli import app
from stages.runner import plan, run_pipeline
from storage_schemas import SchemaError
from tests.conftest import REPO

cli = CliRunner()
FIT = ("src.steps=4",)


def write_config(cfg, path: Path) -> str:
    path.write_text(yaml.safe_dump(config_dict(cfg)))
    return str(path)


def with_root(config: str, root: Path, path: Path) -> str:
    """The config file `config` with storage.root = root, written to `path`."""
    raw = yaml.safe_load(Path(config).read_text())
    raw["storage"]["root"] = str(root)
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def states(config: str) -> dict[str, dict]:
    r = cli.invoke(app, ["status", "--config", config, "--json"])
    assert r.exit_code == 0, r.output
    return {row["stage"]: row for row in json.loads(r.stdout)}


def files_of(directory: Path) -> dict[str, tuple[int, int]]:
    """path -> (inode, mtime_ns) of every file: what was rewritten and what was not."""
    return {str(p.relative_to(directory)): (p.stat().st_ino, p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*")) if p.is_file()}


def arrays(store: Path) -> dict[str, np.ndarray]:
    return {name: arr[...] for name, arr in zarr.open_group(str(store), mode="r").arrays()}


@pytest.fixture
def chain(stores, tmp_path):
    """A fresh root holding shard, encode, fit_src and compress (built once per session, copied), and its config
    file."""
    cfg = stores("faults", *FIT, until="compress")
    manifests = run_pipeline(cfg, until="compress")  # nothing to build: reads the copy's manifests
    return cfg, manifests, write_config(cfg, tmp_path / "config.yaml")


def test_a_deleted_zarr_shard_file_is_damaged_refused_by_readers_and_only_its_shard_rebuilt(chain):
    cfg, m, config = chain
    features = m["encode"].dir / "features.zarr"
    before, codes_before = arrays(features), arrays(m["compress"].dir / "codes.zarr")
    victim = features / "features" / "c" / "3" / "0" / "0"
    victim.unlink()

    row = states(config)["encode"]
    assert row["state"] == "damaged" and str(victim) in row["problem"] and "missing" in row["problem"]
    with pytest.raises(SchemaError, match="missing shard file"):
        open_features(features)  # never the fill value
    r = cli.invoke(app, ["verify", "--config", config, "--stage", "encode"])
    assert r.exit_code == 1 and str(victim) in r.stdout

    untouched = files_of(m["encode"].dir / "features.zarr" / "features")
    run_pipeline(cfg, until="compress")
    assert states(config)["encode"]["state"] == "done"
    after = files_of(m["encode"].dir / "features.zarr" / "features")
    rewritten = {f for f in after if after[f] != untouched.get(f)}
    assert rewritten == {"c/3/0/0"}, rewritten  # one shard of 16, nothing else
    assert all(np.array_equal(before[k], v) for k, v in arrays(features).items())
    assert all(np.array_equal(codes_before[k], v) for k, v in arrays(m["compress"].dir / "codes.zarr").items())


def test_a_truncated_tar_is_damaged_and_rebuilt_bit_identically_leaving_downstream_done(chain):
    cfg, m, config = chain
    tar = m["shard"].dir / "shards" / "train-000001.tar"
    original = tar.read_bytes()
    with open(tar, "r+b") as f:
        f.truncate(2000)
    s = states(config)
    assert s["shard"]["state"] == "damaged" and "train-000001.tar" in s["shard"]["problem"]
    encode_files = files_of(m["encode"].dir)

    run_pipeline(cfg, until="compress")
    assert tar.read_bytes() == original
    assert {k: v["state"] for k, v in states(config).items() if k in ("shard", "encode", "compress")} == \
        {"shard": "done", "encode": "done", "compress": "done"}
    assert files_of(m["encode"].dir) == encode_files  # the features were never rebuilt


def test_a_corrupted_byte_is_found_by_verify_deep_only_and_then_repaired(chain):
    cfg, m, config = chain
    victim = m["compress"].dir / "codes.zarr" / "codes" / "c" / "5" / "0" / "0"
    data = bytearray(victim.read_bytes())
    data[100] ^= 0xFF
    victim.write_bytes(bytes(data))
    assert cli.invoke(app, ["verify", "--config", config, "--stage", "compress"]).exit_code == 0  # sizes agree
    r = cli.invoke(app, ["verify", "--config", config, "--stage", "compress", "--deep"])
    assert r.exit_code == 1 and "checksum" in r.stdout and str(victim) in r.stdout
    assert states(config)["compress"]["state"] == "damaged"  # recorded in _DAMAGED.json
    run_pipeline(cfg, until="compress")
    assert cli.invoke(app, ["verify", "--config", config, "--deep"]).exit_code == 0


@pytest.mark.parametrize("content", ["garbage{", "{}", ""])
def test_a_garbage_success_file_is_damaged_in_status_and_refused_by_run(chain, content):
    _cfg, m, config = chain
    success = m["fit_src"].dir / "_SUCCESS.json"
    success.write_text(content)
    row = states(config)["fit_src"]
    assert row["state"] == "damaged" and str(success) in row["problem"]
    r = cli.invoke(app, ["run", "--config", config, "--until", "compress"])
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert str(success) in r.output and "--force fit_src" in r.output
    r = cli.invoke(app, ["inspect", str(m["fit_src"].dir)])
    assert r.exit_code == 2 and str(success) in r.output


def test_a_garbage_success_file_of_a_row_store_is_repaired_by_run(chain):
    cfg, m, config = chain
    (m["encode"].dir / "_SUCCESS.json").write_text("garbage{")
    features = files_of(m["encode"].dir / "features.zarr" / "features")
    run_pipeline(cfg, until="compress")
    assert states(config)["encode"]["state"] == "done"
    assert files_of(m["encode"].dir / "features.zarr" / "features") == features  # every shard still committed


def test_a_copied_root_damaged_in_the_copy_repairs_the_copy_and_never_touches_the_original(chain, tmp_path):
    cfg, m, config = chain
    copy = tmp_path / "copy"
    shutil.copytree(cfg.storage.root, copy)
    copy_config = with_root(config, copy, tmp_path / "copy.yaml")
    original = files_of(Path(cfg.storage.root))

    (copy / "encode" / m["encode"].dir.name / "features.zarr" / "features" / "c" / "0" / "0" / "0").unlink()
    assert states(copy_config)["encode"]["state"] == "damaged"
    assert states(config)["encode"]["state"] == "done"
    manifest = json.loads((copy / "compress" / m["compress"].dir.name / "_SUCCESS.json").read_text())
    assert not Path(manifest["path"]).is_absolute()

    run_pipeline(load_config(copy_config), until="compress", force=["compress"])
    assert all(states(copy_config)[s]["state"] == "done" for s in ("shard", "encode", "fit_src", "compress"))
    assert files_of(Path(cfg.storage.root)) == original


def test_a_moved_root_stays_done_and_a_forced_rebuild_reads_it(chain, tmp_path):
    cfg, m, config = chain
    moved = tmp_path / "moved"
    shutil.move(cfg.storage.root, moved)
    config = with_root(config, moved, Path(config))
    assert all(states(config)[s]["state"] == "done" for s in ("shard", "encode", "fit_src", "compress"))
    before = arrays(moved / "compress" / m["compress"].dir.name / "codes.zarr")
    run_pipeline(load_config(config), until="compress", force=["compress"])
    after = arrays(moved / "compress" / m["compress"].dir.name / "codes.zarr")
    assert all(np.array_equal(before[k], v) for k, v in after.items())


KILL_FORCED = """
import os, signal, sys
import stages.compress as compress
real = compress.compress_shard
def compress_shard(job):
    if job.shard.index == 3:
        os.kill(os.getpid(), signal.SIGKILL)  # mid-rebuild: 3 shards of the new output written
    return real(job)
compress.compress_shard = compress_shard
from pipeline.config import load_config
from stages.runner import run_pipeline
run_pipeline(load_config(sys.argv[1]), until="compress", force=["compress"])
"""


def test_a_forced_rebuild_killed_midway_leaves_the_old_output_done(chain):
    cfg, m, config = chain
    before = files_of(m["compress"].dir)
    r = subprocess.run([sys.executable, "-c", KILL_FORCED, config], cwd=REPO, capture_output=True, text=True,
                       timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert states(config)["compress"]["state"] == "done"
    assert files_of(m["compress"].dir) == before
    assert cli.invoke(app, ["verify", "--config", config, "--stage", "compress", "--deep"]).exit_code == 0
    run_pipeline(cfg, until="compress", force=["compress"])  # the next forced rebuild completes and replaces it
    assert states(config)["compress"]["state"] == "done"
    assert not list(Path(cfg.storage.root, "compress").glob(".*"))  # no rebuild directory left


def test_a_damaged_upstream_of_a_non_row_store_is_refused_before_work(chain):
    cfg, m, config = chain
    weights = m["fit_src"].dir / "src.safetensors"
    weights.unlink()
    r = cli.invoke(app, ["run", "--config", config, "--until", "compress"])
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert str(weights) in r.output and "srcflow run --force fit_src" in r.output
    run_pipeline(cfg, until="compress", force=["fit_src"])
    assert weights.is_file() and states(config)["compress"]["state"] == "done"


def test_status_writes_nothing_into_the_store(chain, tmp_path):
    cfg, m, config = chain
    root = Path(cfg.storage.root)
    (m["shard"].dir / "shards" / "val-000000.tar").unlink()  # damaged: status must still only read
    before = files_of(root)
    dirs = sorted(str(p) for p in root.rglob("*") if p.is_dir())
    env_cache = tmp_path / "cache"
    os.environ["SRCFLOW_CACHE_DIR"] = str(env_cache)
    try:
        s = states(config)
    finally:
        del os.environ["SRCFLOW_CACHE_DIR"]
    assert s["shard"]["state"] == "damaged"
    assert files_of(root) == before and sorted(str(p) for p in root.rglob("*") if p.is_dir()) == dirs


def test_status_on_a_read_only_root(chain, tmp_path):
    """A read-only bind mount (root ignores file modes); skipped where this sandbox cannot mount."""
    cfg, _m, config = chain
    mount = tmp_path / "ro"
    mount.mkdir()
    if subprocess.run(["mount", "--bind", "-o", "ro", cfg.storage.root, str(mount)], capture_output=True).returncode:
        pytest.skip("cannot make a read-only bind mount here")
    try:
        if subprocess.run(["mount", "-o", "remount,bind,ro", str(mount)], capture_output=True).returncode:
            pytest.skip("cannot remount read-only here")
        with pytest.raises(OSError):
            (mount / "probe").write_text("x")
        ro_config = with_root(config, mount, tmp_path / "ro.yaml")
        s = states(ro_config)
        assert all(s[x]["state"] == "done" for x in ("shard", "encode", "fit_src", "compress"))
        r = cli.invoke(app, ["verify", "--config", ro_config, "--deep"])
        assert r.exit_code == 0, r.output
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)


@pytest.mark.e2e
def test_two_concurrent_runs_build_each_stage_once(stores, tmp_path, prefect_home):
    cfg = stores("concurrent", *FIT, "train.steps=1500", "train.log_every=1", "train.ckpt_every=1000",
                 "flow.width=16", "flow.heads=2", "flow.num_blocks=1", "flow.layers_per_block=1")
    config = write_config(cfg, tmp_path / "config.yaml")
    env = {**os.environ, "PYTHONPATH": str(REPO), "PREFECT_HOME": str(prefect_home),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", "SRCFLOW_CACHE_DIR": str(tmp_path / "c"),
           # two ephemeral servers start at once on a loaded 2-core machine: give them time
           "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180"}
    command = [sys.executable, "-m", "srcflow.cli", "run", "--config", config, "--until", "train_flow"]
    logs = [tmp_path / f"run{i}.log" for i in range(2)]
    procs = []
    try:
        for _i, log in enumerate(logs):
            procs.append(subprocess.Popen(command, cwd=REPO, env=env, stdout=open(log, "w"),  # noqa: SIM115 (the child's log)
                                          stderr=subprocess.STDOUT, start_new_session=True))
        codes = [p.wait(timeout=600) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    text = [log.read_text() for log in logs]
    assert codes == [0, 0], "\n".join(t[-3000:] for t in text)
    # both start together; whichever is second to a stage waits on the lock (training takes long enough)
    assert any("another run is writing" in t for t in text), "\n".join(t[-3000:] for t in text)
    for stage in ("fit_src", "compress", "train_flow"):  # shard and encode came with the copied root
        built = sum(t.count(f"{stage}: running ->") for t in text)
        assert built == 1, (stage, built)
    store = ArtifactStore(cfg.storage.root)
    (p,) = [p for p in plan(cfg) if p.name == "train_flow"]
    steps = [json.loads(line).get("step") for line in (store.stage_dir("train_flow", p.fingerprint) /
                                                         "metrics.jsonl").read_text().splitlines()]
    assert len(steps) == len(set(steps)) == 1500, steps


def test_a_full_disk_is_one_line_naming_the_output_and_keeps_nothing_half_written(make_config, tmp_path):
    """storage.root on a 32 KB tmpfs: the shard tars do not fit. Skipped where this sandbox cannot mount."""
    root = tmp_path / "small"
    root.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32k", "tmpfs", str(root)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        config = write_config(make_config(f"storage.root={root}"), tmp_path / "config.yaml")
        with pytest.raises(OSError) as e:
            run_pipeline(load_config(config, []), until="shard")
        assert e.value.errno == 28 and "shard: No space left on device (writing " in str(e.value)
        assert str(root / "shard") in str(e.value) and "\n" not in str(e.value)  # the file the writer was writing
        assert states(config)["shard"]["state"] == "partial"  # never done: the next run resumes it
    finally:
        subprocess.run(["umount", str(root)], capture_output=True)
