"""Stage `train_flow`: the codes reader, exact resume after SIGTERM and SIGKILL, 2-process DDP, likelihood.

Most tests run the stage function on a synthetic `codes.zarr` (3 classes whose codes differ by their
mean, 2 views, 24 train + 6 val images of 8 tokens x 4 channels), so that a run takes a second.
"""

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import safetensors.torch
import torch
import zarr
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from pipeline.artifacts import StageOutput
from pipeline.config import load_config
from pipeline.curves import read_scalars
from pipeline.data import zarr_store
from pipeline.data.batches import WindowShuffle
from pipeline.data.codes import TrainCodes, code_batches, view_choice
from pipeline.data.zarr_store import create_row_store, write_rows, write_small_array
from pipeline.training import TrainingStopped
from stages import train_flow
from stages.train_flow import load_flow
from storage_schemas import SchemaError
from storage_schemas.zarr_layouts import CODES
from tests.conftest import REPO, SMOKE

CLASSES, TRAIN, VAL, VIEWS, TOKENS, DIM = 3, 24, 6, 2, 8, 4
FLOW = ("runtime.device=cpu", "runtime.progress=false", "flow.width=32", "flow.heads=2", "flow.num_blocks=2",
        "flow.layers_per_block=1", "flow.deep_layers=null", "train.steps=12", "train.batch_size=8",
        "train.warmup_steps=2", "train.lr=1e-3", "train.ema_decay=0.9", "train.log_every=1", "train.ckpt_every=5",
        "train.shuffle_window=8", "train.eval_batch_size=5")



def make_codes(path: Path, rows_per_shard: int = 16, rows_per_chunk: int = 4) -> Path:
    """A codes.zarr in the CODES layout: class k's codes are N(mean_k, 0.5^2) per channel, the flip view a
    perturbed copy; train images first, then val."""
    rng = np.random.default_rng(0)
    means = rng.normal(0, 1.2, (CLASSES, 1, DIM))
    images = TRAIN + VAL
    labels = np.arange(images) % CLASSES
    plain = means[labels] + 0.5 * rng.normal(size=(images, TOKENS, DIM))
    flip = plain[:, ::-1] + 0.05 * rng.normal(size=plain.shape)
    codes = np.stack([plain, flip], 1).reshape(images * VIEWS, TOKENS, DIM).astype(np.float32)
    n = len(codes)
    create_row_store(path, CODES, n, rows_per_shard=rows_per_shard, rows_per_chunk=rows_per_chunk,
                     row_shapes={"codes": ((TOKENS, DIM), "float32")},
                     attrs={"features_fingerprint": "synthetic", "src_fingerprint": "synthetic",
                            "views": ["plain", "flip"],
                            "splits": {"train": [0, TRAIN * VIEWS], "val": [TRAIN * VIEWS, n]},
                            "grid_size": 2})
    write_rows(path, 0, {"codes": codes, "labels": np.repeat(labels, VIEWS).astype(np.int32),
                         "key": np.repeat([f"img{i}" for i in range(images)], VIEWS),
                         "view": np.tile(np.arange(VIEWS, dtype=np.uint8), images),
                         "split": np.repeat((np.arange(images) >= TRAIN).astype(np.uint8), VIEWS)})
    train = codes[:TRAIN * VIEWS].astype(np.float64)
    write_small_array(path, "code_mean", train.mean((0, 1)), ("code_channel",))
    write_small_array(path, "code_std", train.std((0, 1)), ("code_channel",))
    return path


@pytest.fixture(scope="module")
def compress(tmp_path_factory):
    """A stand-in for the compress Manifest: `.dir` holding codes.zarr."""
    d = tmp_path_factory.mktemp("compress")
    make_codes(d / "codes.zarr")
    return SimpleNamespace(dir=d, fingerprint="synthetic")


def config(*overrides):
    return load_config(SMOKE, [*FLOW, *overrides])


def train(compress, out_dir: Path, *overrides) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    return train_flow.run(config(*overrides), {"compress": compress}, StageOutput("train_flow", "test", out_dir))


def trajectory(out_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["nll"]) for r in train_flow.MetricsFile(out_dir / "metrics.jsonl").records()]


def weights(out_dir: Path) -> dict:
    return safetensors.torch.load_file(str(out_dir / "flow.safetensors"))


@pytest.fixture(scope="module")
def straight(compress, tmp_path_factory):
    """The uninterrupted reference run: (metrics, output dir)."""
    out = tmp_path_factory.mktemp("straight")
    return train(compress, out), out


# --- the reader ---------------------------------------------------------------------------------------


def test_window_shuffle_is_a_permutation_of_whole_chunk_blocks_and_uniform_when_one_window():
    s = WindowShuffle(23, 4, seed=3, block=2, window=8)
    for epoch in range(3):
        perm = s.permutation(epoch)
        assert sorted(perm) == list(range(23))
        for w in range(0, 23, 8):  # every window is a union of whole blocks {2b, 2b + 1}
            members = set(perm[w:w + 8].tolist())
            assert all((i ^ 1) in members or i == 22 for i in members)
    assert not np.array_equal(s.permutation(0), s.permutation(1))
    one = WindowShuffle(23, 4, seed=3, block=2, window=64)
    assert sorted(one.permutation(0)) == list(range(23)) and one.window >= 23
    # every image once per epoch, and W ranks together see the one-process batch
    ranks = [WindowShuffle(23, 4, seed=3, rank=r, world_size=2, block=2, window=8) for r in range(2)]
    for step in range(12):
        assert np.array_equal(np.concatenate([r.indices(step) for r in ranks]), s.indices(step))


def test_streamed_windows_give_the_same_batches_as_codes_held_in_memory(compress):
    store = compress.dir / "codes.zarr"
    memory, streamed = TrainCodes(store, in_memory_limit_gb=1.0), TrainCodes(store, in_memory_limit_gb=0.0)
    assert memory.in_memory and not streamed.in_memory and memory.n == TRAIN and memory.num_classes == CLASSES
    assert memory.block == 2  # 4 rows per inner chunk = 2 images of 2 views
    def schedule():
        return WindowShuffle(TRAIN, 8, seed=1, block=memory.block, window=6)

    views_seen = set()
    a, b = code_batches(memory, schedule(), 1, range(9)), code_batches(streamed, schedule(), 1, range(9), prefetch=2)
    for step, (codes_a, labels_a), (codes_b, labels_b) in zip(range(9), a, b, strict=True):
        assert torch.equal(codes_a, codes_b) and torch.equal(labels_a, labels_b)
        images = schedule().indices(step)
        rows = [int(np.flatnonzero((memory.memory == c.numpy()).all((1, 2)))[0]) for c in codes_a]
        assert [r // VIEWS for r in rows] == images.tolist()  # the scheduled images, one view each
        views_seen |= {r % VIEWS for r in rows}
    assert views_seen == {0, 1}


def spy_rows_read(monkeypatch, name: str) -> list[int]:
    """The rows of Zarr array `name` read from now on, through Zarr (slices and index arrays of the first axis) or
    zarr_store.read_rows, in any thread, each read counted once however the calls nest; a list, to compare as a
    multiset."""
    rows, inside = [], threading.local()

    def spying(method):
        def read(arr, selection, *args, **kwargs):
            outer = not getattr(inside, "active", False)
            if outer and arr.basename == name:
                first = selection[0] if isinstance(selection, tuple) else selection
                if isinstance(first, slice):
                    rows.extend(range(*first.indices(arr.shape[0])))
                else:
                    rows.extend(np.atleast_1d(first).tolist())
            inside.active = True
            try:
                return method(arr, selection, *args, **kwargs)
            finally:
                inside.active = not outer

        return read

    for method in ("__getitem__", "get_orthogonal_selection", "get_coordinate_selection", "get_basic_selection"):
        monkeypatch.setattr(zarr.Array, method, spying(getattr(zarr.Array, method)))
    monkeypatch.setattr(zarr_store, "read_rows", spying(zarr_store.read_rows))
    return rows


@pytest.mark.parametrize("direct, rows_per_chunk", [(True, 4), (False, 4), (True, 16)])
def test_scattered_rows_are_read_as_their_bytes_alone_and_equal_zarrs_read(tmp_path, monkeypatch, direct,
                                                                            rows_per_chunk):
    """zarr_store.read_rows on shards written directly or by Zarr, and without sharding (one chunk per file): the
    values Zarr reads, zeros for a shard never written, and exactly the rows' bytes read (plus each shard's index),
    where Zarr reads every inner chunk that holds one."""
    path = tmp_path / "codes.zarr"
    create_row_store(path, CODES, 60, rows_per_shard=16, rows_per_chunk=rows_per_chunk,
                     row_shapes={"codes": ((TOKENS, DIM), "float32")}, attrs={})
    values = np.random.default_rng(1).normal(size=(48, TOKENS, DIM)).astype(np.float32)
    write_rows(path, 0, {"codes": values}, direct=direct)  # rows [48, 60) never written
    arr = zarr.open_group(str(path), mode="r")["codes"]
    rows = np.array([0, 1, 2, 3, 5, 9, 10, 17, 31, 32, 40, 47, 50, 59])
    read, real_open = [], open

    class Counted:
        def __init__(self, *args):
            self.file = real_open(*args)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

        def __getattr__(self, attr):
            return getattr(self.file, attr)

        def read(self, n):
            read.append(n)
            return self.file.read(n)

        def readinto(self, buffer):
            read.append(len(buffer))
            return self.file.readinto(buffer)

    monkeypatch.setattr(zarr_store, "open", Counted, raising=False)
    got = zarr_store.read_rows(arr, rows)
    assert np.array_equal(got, arr.get_orthogonal_selection((rows,))) and not got[rows >= 48].any()
    index = 16 * 16 // rows_per_chunk if rows_per_chunk < 16 else 0  # per shard file: 16 bytes per inner chunk
    assert sum(read) == (rows < 48).sum() * TOKENS * DIM * 4 + 3 * index
    # checked against the row CRC-32Cs (read through Zarr): the same bytes read from the shard files
    read.clear()
    crcs = zarr.open_group(str(path), mode="r")["codes_crc32c"].get_orthogonal_selection((rows,))
    assert np.array_equal(zarr_store.read_rows(arr, rows, crcs), got)
    assert sum(read) == (rows < 48).sum() * TOKENS * DIM * 4 + 3 * index


@pytest.mark.parametrize("direct", [True, False])
def test_each_scattered_row_is_checked_against_its_crc32c_and_a_flipped_byte_names_the_file(tmp_path, direct):
    """CheckedArray.read_rows checks every row it returns against the store's codes_crc32c (the CRC-32C of its bytes
    as stored, written with the rows whichever way the shard was written): a byte flipped inside a row, whose inner
    chunk's CRC-32C a scattered read never reads, is a one-line DamagedError naming the shard file and the row; the
    other rows of that inner chunk, each checked, read as before."""
    import crc32c

    from pipeline.artifacts import DamagedError
    from pipeline.integrity import open_checked
    from tests.conftest import byte_in_row, flip_byte

    path = tmp_path / "codes.zarr"
    create_row_store(path, CODES, 32, rows_per_shard=16, rows_per_chunk=4, row_shapes={"codes": ((TOKENS, DIM),
                                                                                                 "float32")}, attrs={})
    values = np.random.default_rng(2).normal(size=(32, TOKENS, DIM)).astype(np.float32)
    files = write_rows(path, 0, {"codes": values}, direct=direct)
    assert {f.relative_to(path).parts[0] for f in files} == {"codes", "codes_crc32c"}  # both in the commit records
    group = open_checked(path)
    assert np.array_equal(group["codes_crc32c"][...], [crc32c.crc32c(v.astype("<f4").tobytes()) for v in values])

    shard, offset = byte_in_row(path, "codes", 21)
    flip_byte(shard, offset)
    with pytest.raises(DamagedError) as e:
        group["codes"].read_rows(np.array([1, 2, 21, 30]))
    assert str(e.value) == f"{shard}: row 21 fails its CRC-32C"
    same_chunk = np.array([1, 2, 20, 22, 23, 30])
    assert np.array_equal(group["codes"].read_rows(same_chunk), values[same_chunk])


@pytest.mark.parametrize("world", [1, 2, 4])
def test_each_rank_reads_only_its_share_of_each_steps_rows(compress, monkeypatch, world):
    """Streamed, a rank reads exactly the rows its batches hold (one view per image, its slice of each global
    batch) and nothing of the other ranks' share; together the ranks' batches are the one-process batches."""
    store, steps, batch = compress.dir / "codes.zarr", range(3, 20), 8  # resumed at 3; epochs of 3 steps
    read = spy_rows_read(monkeypatch, "codes")
    one = [codes for codes, _ in code_batches(TrainCodes(store, 0.0), WindowShuffle(TRAIN, batch, 1, block=2, window=6),
                                              1, steps)]
    parts = []
    for rank in range(world):
        data = TrainCodes(store, in_memory_limit_gb=0.0)
        schedule = WindowShuffle(TRAIN, batch, 1, rank, world, block=data.block, window=6)
        read.clear()
        parts.append([codes for codes, _ in code_batches(data, schedule, 1, steps, prefetch=2)])
        local = slice(rank * batch // world, (rank + 1) * batch // world)
        wanted = [row for step in steps for row in (schedule.indices(step) * VIEWS
                                                    + view_choice(1, step, batch, VIEWS)[local]).tolist()]
        assert sorted(read) == sorted(wanted) and data.rows_read == len(steps) * batch // world
    for step, together in enumerate(zip(*parts, strict=True)):
        assert torch.equal(torch.cat(together), one[step])


def test_a_store_that_is_not_codes_is_refused_in_one_line(tmp_path):
    (tmp_path / "codes.zarr").mkdir()
    with pytest.raises(SchemaError, match=r"codes.zarr: not a Zarr group"):
        train(SimpleNamespace(dir=tmp_path, fingerprint="x"), tmp_path / "out")


# --- training, resume, DDP ----------------------------------------------------------------------------


def test_training_writes_the_ema_flow_its_metrics_and_a_loadable_model(straight):
    metrics, out = straight
    assert (out / "flow.safetensors").is_file() and not (out / "checkpoints").exists()
    info = json.loads((out / "flow.json").read_text())
    assert info["arch"]["num_classes"] == CLASSES and info["arch"]["in_channels"] == DIM
    assert info["noise_sigma"] == 0.2 and len(info["code_stats"]["std"]) == DIM
    assert [s for s, _ in trajectory(out)] == list(range(1, 13))
    flow = load_flow(out)
    assert not flow.training and all(not p.requires_grad for p in flow.parameters())
    for key in ("train_nll", "train_bits_per_dim", "val_bits_per_dim", "val_bits_per_dim_uncond",
                "val_gaussian_bits_per_dim", "train_ema_bits_per_dim", "data_wait_fraction", "steps_per_s"):
        assert np.isfinite(metrics[key]), key
    assert metrics["val_rows"] == VAL * VIEWS and metrics["train_bits_per_dim"] == pytest.approx(
        metrics["train_nll"] / np.log(2))


def test_training_curves_are_tensorboard_scalars_and_a_loss_png(straight):
    _, out = straight
    events = EventAccumulator(str(out / "tensorboard")).Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/bits_per_dim", "train/lr", "train/grad_norm", "train/images_per_s"} <= tags
    assert [p.step for p in events.Scalars("train/loss")] == list(range(1, 13))  # train.log_every=1
    nll = [v for _, v in trajectory(out)]
    np.testing.assert_allclose([p.value for p in events.Scalars("train/loss")], nll, rtol=1e-6)
    assert all(p.value > 0 for p in events.Scalars("train/grad_norm") + events.Scalars("train/images_per_s"))
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_held_out_bits_per_dim_beat_the_gaussian_baseline_after_training(compress, tmp_path):
    metrics = train(compress, tmp_path, "train.steps=60", "train.log_every=20", "train.ckpt_every=100",
                    "train.warmup_steps=5", "train.ema_decay=0.8")
    assert metrics["val_bits_per_dim"] < metrics["val_gaussian_bits_per_dim"] - 0.1
    # the classes differ by their mean: the label helps
    assert metrics["val_bits_per_dim"] < metrics["val_bits_per_dim_uncond"]


def test_sigterm_checkpoints_and_the_resumed_run_continues_the_same_trajectory(compress, straight, tmp_path,
                                                                               monkeypatch):
    real = train_flow.step_noise

    def noise(seed, step, *args):
        if step == 6:
            os.kill(os.getpid(), signal.SIGTERM)  # handled by StopSignal: finish the step, checkpoint, stop
        return real(seed, step, *args)

    monkeypatch.setattr(train_flow, "step_noise", noise)
    with pytest.raises(TrainingStopped, match="train_flow: stopped by a signal at step 7/12"):
        train(compress, tmp_path)
    assert (tmp_path / "checkpoints" / "ckpt-00000007.pt").is_file()
    assert not (tmp_path / "loss.png").exists()  # written once training is done
    monkeypatch.setattr(train_flow, "step_noise", real)
    train(compress, tmp_path)
    _, reference = straight
    assert trajectory(tmp_path) == trajectory(reference)
    a, b = weights(tmp_path), weights(reference)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the resumed run appends a second event file; TensorBoard shows every step once, as the straight run
    assert len(list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))) == 2
    steps, losses = read_scalars(tmp_path / "tensorboard", "train/loss")
    assert steps == list(range(1, 13)) and losses == read_scalars(reference / "tensorboard", "train/loss")[1]


def test_compiled_and_checkpointed_training_follow_the_eager_trajectory(compress, straight, tmp_path, monkeypatch):
    """train.compile (the loss through torch.compile; aot_eager here, inductor's C++ compile is minutes on this
    CPU) and train.activation_checkpointing change how a step runs, not what it computes; a compiled run
    stopped by SIGTERM resumes onto the same trajectory."""
    import torch._dynamo

    compiled, real_compile = [], torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compiled.append(fn) or real_compile(fn, backend="aot_eager",
                                                                                                **kw))
    _, reference = straight
    real = train_flow.step_noise

    def noise(seed, step, *args):
        if step == 6:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(seed, step, *args)

    monkeypatch.setattr(train_flow, "step_noise", noise)
    with pytest.raises(TrainingStopped, match="train_flow: stopped by a signal at step 7/12"):
        train(compress, tmp_path / "compiled", "train.compile=true")
    monkeypatch.setattr(train_flow, "step_noise", real)
    train(compress, tmp_path / "compiled", "train.compile=true")
    assert len(compiled) == 2  # the stopped run and the resumed one
    train(compress, tmp_path / "checkpointed", "train.activation_checkpointing=true")
    torch._dynamo.reset()
    one = trajectory(reference)
    for run in ("compiled", "checkpointed"):
        other = trajectory(tmp_path / run)
        assert [s for s, _ in other] == [s for s, _ in one]
        np.testing.assert_allclose([v for _, v in other], [v for _, v in one], rtol=1e-5, atol=1e-6)
        a, b = weights(tmp_path / run), weights(reference)
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


KILL_SCRIPT = """
import os, signal, sys
from pathlib import Path
from types import SimpleNamespace
import torch
torch.set_num_threads(1)
from pipeline.artifacts import StageOutput
from pipeline.config import load_config
from pipeline.curves import read_scalars
from stages import train_flow
real = train_flow.step_noise
def noise(seed, step, *args):
    if step == 8:
        os.kill(os.getpid(), signal.SIGKILL)   # after the checkpoint of step 5, mid step 9
    return real(seed, step, *args)
train_flow.step_noise = noise
codes, out = Path(sys.argv[1]), Path(sys.argv[2])
cfg = load_config(sys.argv[3], sys.argv[4:])
compress = SimpleNamespace(dir=codes, fingerprint="synthetic")
train_flow.run(cfg, {"compress": compress}, StageOutput("train_flow", "t", out))
"""


def test_killed_run_resumes_from_its_checkpoint_bit_identically(compress, straight, tmp_path):
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(compress.dir), str(tmp_path), str(SMOKE), *FLOW],
                          check=False, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == -signal.SIGKILL
    assert [p.name for p in (tmp_path / "checkpoints").glob("ckpt-*.pt")] == ["ckpt-00000005.pt"]
    assert [s for s, _ in trajectory(tmp_path)] == list(range(1, 9))  # logged past the checkpoint, then killed
    train(compress, tmp_path)
    _, reference = straight
    assert trajectory(tmp_path) == trajectory(reference)
    a, b = weights(tmp_path), weights(reference)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_two_process_gloo_ddp_matches_one_process_with_the_same_global_batch(compress, straight, tmp_path):
    metrics = train(compress, tmp_path, "runtime.nproc=2")
    _, reference = straight
    two, one = trajectory(tmp_path), trajectory(reference)
    assert [s for s, _ in two] == [s for s, _ in one]
    np.testing.assert_allclose([v for _, v in two], [v for _, v in one], rtol=1e-5, atol=1e-6)
    a, b = weights(tmp_path), weights(reference)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    assert metrics["world_size"] == 2 and not (tmp_path / "launch").exists()  # the job file goes once done


def test_a_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(compress, tmp_path, monkeypatch):
    """A loss that turns NaN at step 7 (its noise poisoned): training stops in one line at the next log point,
    the step-5 checkpoint is the last one kept, and no weights are written (main trained on and committed a NaN
    flow)."""
    real = train_flow.step_noise

    def poisoned(seed, step, shape, device):
        eps = real(seed, step, shape, device)
        return eps * float("nan") if step >= 7 else eps

    monkeypatch.setattr(train_flow, "step_noise", poisoned)
    with pytest.raises(ValueError, match="the loss is nan at step 8") as e:
        train(compress, tmp_path)
    assert type(e.value).__name__ == "NonFiniteError"
    assert "ckpt-00000005.pt" in str(e.value) and "\n" not in str(e.value)
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("*.pt")) == ["ckpt-00000005.pt"]
    assert not (tmp_path / "flow.safetensors").exists()
