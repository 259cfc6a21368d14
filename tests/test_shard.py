"""Stage `shard`: odd files, both layouts, label order, determinism, kill + resume."""

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from stages.runner import run_pipeline
from storage_schemas.shards import validate_shard_set
from tests.conftest import REPO


def _jpeg(mode="RGB", size=(40, 30), fmt="JPEG", color=None) -> bytes:
    color = color if color is not None else {"RGB": (200, 30, 30), "CMYK": (0, 200, 200, 0), "L": 128,
                                             "RGBA": (10, 200, 10, 128), "P": 3}[mode]
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture
def odd_root(tmp_path) -> Path:
    """An ImageFolder ImageNet with every kind of file a real one (or a user's copy) holds."""
    root = tmp_path / "odd"
    for split in ("train", "val"):
        for syn in ("n01440764", "n01443537"):
            (root / split / syn).mkdir(parents=True)
            (root / split / syn / f"{syn}_ok_{split}.JPEG").write_bytes(_jpeg())
    t = root / "train" / "n01440764"
    (t / "n01440764_cmyk.JPEG").write_bytes(_jpeg("CMYK"))
    (t / "n01440764_gray.JPEG").write_bytes(_jpeg("L"))
    (t / "n01440764_png.JPEG").write_bytes(_jpeg("RGB", fmt="PNG"))  # like n02105855_2933
    (t / "n01440764_rgba.JPEG").write_bytes(_jpeg("RGBA", fmt="PNG"))
    (t / "n01440764_trunc.JPEG").write_bytes(_jpeg(size=(200, 200))[:300])
    (t / "n01440764_empty.JPEG").write_bytes(b"")
    (t / "n01440764_text.JPEG").write_bytes(b"this is not an image\n")
    (t / ".DS_Store").write_bytes(b"junk")
    (t / "notes.txt").write_text("stray")
    return root


def test_odd_files_are_converted_or_rejected_never_dropped(make_config, odd_root):
    cfg = make_config(root=odd_root)
    out = run_pipeline(cfg, until="shard")["shard"]
    man = pq.read_table(out.dir / "manifest.parquet").to_pylist()
    rejected = pq.read_table(out.dir / "rejected.parquet").to_pylist()
    rej = {r["source_path"].split("/")[-1]: r["reason"] for r in rejected}
    by_key = {r["key"]: r for r in man}
    assert set(rej) == {"n01440764_trunc.JPEG", "n01440764_empty.JPEG", "n01440764_text.JPEG"}
    assert "empty" in rej["n01440764_empty.JPEG"] and "trunc" in rej["n01440764_trunc.JPEG"]
    for key in ("n01440764_cmyk", "n01440764_gray", "n01440764_png", "n01440764_rgba"):
        assert by_key[key]["converted"], key
    assert by_key["n01440764_cmyk"]["orig_mode"] == "CMYK" and by_key["n01440764_png"]["orig_format"] == "PNG"
    assert not by_key["n01440764_ok_train"]["converted"]
    assert out.metrics["ignored"] == {"hidden": 1, "not_an_image_extension": 1}
    # 9 listed train files + 2 val = 11 images; 8 stored, 3 rejected: nothing silently lost
    assert len(man) + len(rej) == 11
    validate_shard_set(out.dir)
    # the original baseline RGB JPEG is stored byte for byte; conversions decode to RGB
    samples = _read_tars(out.dir)
    src = (odd_root / "train/n01440764/n01440764_ok_train.JPEG").read_bytes()
    assert samples["n01440764_ok_train"]["jpg"] == src
    for key in ("n01440764_cmyk", "n01440764_rgba"):
        assert Image.open(io.BytesIO(samples[key]["jpg"])).mode == "RGB"
    meta = json.loads(samples["n01440764_cmyk"]["json"])
    assert meta["source_path"] == "train/n01440764/n01440764_cmyk.JPEG" and meta["converted"] is True


def test_a_symlink_loop_or_a_dangling_symlink_is_rejected_never_stops_the_run(make_config, odd_root):
    """Main stopped at plan time with `[Errno 40] ... loop.JPEG`; a bad file never stops the run: it goes to
    rejected.parquet with its reason, like any file that cannot be read."""
    t = odd_root / "train" / "n01440764"
    (t / "n01440764_loop.JPEG").symlink_to("n01440764_loop.JPEG")
    (t / "n01440764_dangling.JPEG").symlink_to("nowhere.JPEG")
    out = run_pipeline(make_config(root=odd_root), until="shard")["shard"]
    rej = {r["source_path"].split("/")[-1]: r["reason"]
           for r in pq.read_table(out.dir / "rejected.parquet").to_pylist()}
    assert "symbolic links" in rej["n01440764_loop.JPEG"] and "No such file" in rej["n01440764_dangling.JPEG"]
    assert len(pq.read_table(out.dir / "manifest.parquet")) == 8  # what was stored before is stored


def test_an_empty_class_folder_is_refused_not_made_a_phantom_class(make_config, odd_root):
    """An empty train/n00000001/ sorts first: main shifted every label by one and trained a class without data.
    As torchvision's ImageFolder, it is refused in one line naming the folder, before any work."""
    (odd_root / "train" / "n00000001").mkdir()
    cfg = make_config(root=odd_root)
    with pytest.raises(ValueError, match="holds no train images") as e:
        run_pipeline(cfg, until="shard")
    assert str(odd_root / "train" / "n00000001") in str(e.value) and "\n" not in str(e.value)
    assert not Path(cfg.storage.root).exists() or not any(Path(cfg.storage.root).iterdir())


def _read_tars(out_dir: Path) -> dict:
    samples: dict = {}
    for tar_path in sorted((out_dir / "shards").glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return samples


def test_labels_follow_sorted_train_synsets_in_both_splits_and_layouts(make_config, tmp_path):
    from pipeline.data.tiny_imagenet import make_tiny_imagenet

    tables = {}
    for layout in ("imagefolder", "kaggle"):
        root = tmp_path / layout
        make_tiny_imagenet(root, classes=3, per_class=4, val_per_class=2, size=32, layout=layout)
        cfg = make_config(f"storage.root={tmp_path / ('art-' + layout)}", root=root)
        out = run_pipeline(cfg, until="shard")["shard"]
        tables[layout] = pq.read_table(out.dir / "manifest.parquet").to_pylist()
    for rows in tables.values():
        synsets = sorted({r["synset"] for r in rows})
        assert synsets[0] == "n01440764"
        assert all(r["label"] == synsets.index(r["synset"]) for r in rows)
        assert {r["split"] for r in rows} == {"train", "val"}
    strip = lambda rows: sorted((r["key"], r["label"], r["sha256"]) for r in rows)  # noqa: E731
    assert strip(tables["imagefolder"]) == strip(tables["kaggle"])


def test_class_subset_and_max_per_class(make_config):
    cfg = make_config("data.classes=2", "data.max_per_class=3")
    rows = pq.read_table(run_pipeline(cfg, until="shard")["shard"].dir / "manifest.parquet").to_pylist()
    train = [r for r in rows if r["split"] == "train"]
    assert sorted({r["label"] for r in rows}) == [0, 1] and len(train) == 6


def _shard_outputs(out_dir: Path) -> dict:
    files = {p.relative_to(out_dir).as_posix(): p.read_bytes() for p in sorted((out_dir / "shards").glob("*.tar"))}
    files["manifest"] = pq.read_table(out_dir / "manifest.parquet").to_pylist()
    files["rejected"] = pq.read_table(out_dir / "rejected.parquet").to_pylist()
    files["index"] = json.loads((out_dir / "shards.json").read_text())
    return files


KILL_SCRIPT = """
import os, signal, sys
from pipeline.config import load_config
import pipeline.data.imagenet as im, stages.shard as sh
calls = [0]
real = sh.prepare_image_bytes
def dying(raw):
    calls[0] += 1
    if calls[0] == int(sys.argv[2]):
        os.kill(os.getpid(), signal.SIGKILL)  # a crash in the middle of a shard
    return real(raw)
sh.prepare_image_bytes = dying
from stages.runner import run_pipeline
run_pipeline(load_config(None, sys.argv[3:]), until="shard")
"""


def test_kill_during_shard_then_rerun_equals_uninterrupted(make_config, tmp_path):
    killed = make_config(f"storage.root={tmp_path / 'killed'}", "shard.samples_per_shard=5")
    clean = make_config(f"storage.root={tmp_path / 'clean'}", "shard.samples_per_shard=5")
    overrides = [f"{k}={v}" for k, v in (("storage.root", killed.storage.root), ("data.root", killed.data.root),
                 ("data.generate_tiny", "null"), ("shard.samples_per_shard", 5), ("shard.workers", 1),
                 ("runtime.progress", "false"))]
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, "x", "23", *overrides], cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == -signal.SIGKILL
    from stages.runner import plan

    (p,) = [p for p in plan(killed) if p.name == "shard"]
    assert p.state == "partial"
    assert len(list((p.path / "shards").glob("*.tar"))) == 4  # 4 whole shards of 5 before the 23rd image
    resumed = run_pipeline(killed, until="shard")["shard"]
    reference = run_pipeline(clean, until="shard")["shard"]
    assert not list(resumed.dir.rglob(".*tmp*"))
    assert _shard_outputs(resumed.dir) == _shard_outputs(reference.dir)


def test_worker_count_does_not_change_the_output(make_config, tmp_path):
    one = run_pipeline(make_config(f"storage.root={tmp_path / 'one'}", "shard.workers=1"), until="shard")["shard"]
    two = run_pipeline(make_config(f"storage.root={tmp_path / 'two'}", "shard.workers=2"), until="shard")["shard"]
    assert one.fingerprint == two.fingerprint  # workers is operational
    assert _shard_outputs(one.dir) == _shard_outputs(two.dir)


def test_a_val_file_named_like_a_train_file_is_rejected_and_encode_reads_the_rest(make_config, tmp_path):
    """Keys were unique per split only: a val `x_1.JPEG` beside a train `x_1.JPEG` (different pixels) made two
    manifest rows of one key, and encode refused the train tar as damaged. One key namespace: the later file is
    rejected with the one it collides with, and the rest encodes."""
    root = tmp_path / "collide"
    for split, color in (("train", (200, 30, 30)), ("val", (30, 30, 200))):
        for syn in ("n01440764", "n01443537"):
            (root / split / syn).mkdir(parents=True)
            (root / split / syn / f"{syn}_1.JPEG").write_bytes(_jpeg(color=color))
            (root / split / syn / f"{syn}_{split}.JPEG").write_bytes(_jpeg(color=color))
    outs = run_pipeline(make_config(root=root), until="encode")
    rejected = pq.read_table(outs["shard"].dir / "rejected.parquet").to_pylist()
    assert sorted(r["source_path"] for r in rejected) == ["val/n01440764/n01440764_1.JPEG",
                                                          "val/n01443537/n01443537_1.JPEG"]
    assert all("duplicate key" in r["reason"] and "train/" in r["reason"] for r in rejected)
    keys = [r["key"] for r in pq.read_table(outs["shard"].dir / "manifest.parquet").to_pylist()]
    assert len(keys) == len(set(keys)) == 6
    assert outs["encode"].metrics
