"""Every `data.layout` form of the same images gives the same shard manifest: keys, labels, synsets, stored bytes and
rejects. Each form is written by `write_imagenet_form` as the real download is laid out (HF parquet with its
<name>_<synset>.JPEG paths and shuffled rows, WebDataset shards shuffled across files, the ILSVRC2012 tars with a
devkit whose IDs are not the sorted order), with a CMYK, a grayscale, a PNG-named-.JPEG and a truncated file."""

from __future__ import annotations

import hashlib
import io
import os
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.data.imagenet import ILSVRC_LABELS, ILSVRC_SYNSETS, detect_layout
from pipeline.data.tiny_imagenet import LAYOUTS, make_tiny_imagenet
from stages.runner import run_pipeline
from tests.conftest import REPO
from tests.test_shard import KILL_SCRIPT  # SIGKILL at the Nth image shard prepares

ARCHIVES = ("hf-parquet", "wds", "ilsvrc-tar")
MINI = dict(classes=3, per_class=5, val_per_class=3, size=32, seed=3, quirks=True)


@pytest.fixture(scope="module")
def forms(tmp_path_factory) -> dict[str, Path]:
    """The same miniature ImageNet (3 classes, quirks included) in each of the five forms."""
    base = tmp_path_factory.mktemp("forms")
    for layout in LAYOUTS:
        make_tiny_imagenet(base / layout, layout=layout, **MINI)
    return {layout: base / layout for layout in LAYOUTS}


@pytest.fixture(scope="module")
def sharded(forms, tmp_path_factory) -> dict[str, Path]:
    """`shard` run on every form (two images per shard, so each form spans several shards)."""
    from pipeline.config import load_config
    from tests.conftest import SMOKE, smoke_overrides

    out = {}
    for layout, root in forms.items():
        storage = tmp_path_factory.mktemp(f"store-{layout}")
        cfg = load_config(SMOKE, [*smoke_overrides(storage, root), "shard.samples_per_shard=2"])
        out[layout] = run_pipeline(cfg, until="shard")["shard"].dir
    return out


def test_each_form_is_detected(forms):
    assert {layout: detect_layout(root) for layout, root in forms.items()} == {layout: layout for layout in LAYOUTS}


def test_every_form_gives_the_same_manifest_bytes_and_rejects(sharded):
    manifests, rejects, stored = {}, {}, {}
    for layout, out in sharded.items():
        rows = pq.read_table(out / "manifest.parquet").to_pylist()
        manifests[layout] = sorted(({k: v for k, v in r.items() if k not in ("source_path", "shard")} for r in rows),
                                   key=lambda r: (r["split"], r["key"]))
        rejects[layout] = sorted((r["split"], Path(r["source_path"]).name, r["reason"])
                                 for r in pq.read_table(out / "rejected.parquet").to_pylist())
        stored[layout] = _stored_images(out)
        assert {r["key"]: r["sha256"] for r in rows} == {k: hashlib.sha256(v).hexdigest() for k, v in
                                                        stored[layout].items()}
    reference = manifests["imagefolder"]
    assert len(reference) == 3 * 5 + 3 + 3 * 3  # + the CMYK, grayscale and PNG train files
    for layout in LAYOUTS:
        assert manifests[layout] == reference, layout
        assert rejects[layout] == rejects["imagefolder"], layout
        assert stored[layout] == stored["imagefolder"], layout
    (truncated,) = rejects["imagefolder"]
    assert truncated[:2] == ("val", "ILSVRC2012_val_00000010.JPEG") and "truncated" in truncated[2]
    by_key = {r["key"]: r for r in reference}
    assert all(r["label"] == ILSVRC_LABELS[r["synset"]] for r in reference)
    assert {r["label"] for r in reference} == {0, 1, 2}
    assert [(by_key[k]["orig_format"], by_key[k]["orig_mode"], by_key[k]["converted"]) for k in
            ("n01440764_900001", "n01443537_900002", "n01440764_900003")] == [
        ("JPEG", "CMYK", True), ("JPEG", "L", True), ("PNG", "RGB", True)]
    assert Image.open(io.BytesIO(stored["wds"]["n01440764_900001"])).mode == "RGB"


def test_ilsvrc_val_labels_come_through_meta_mat_not_the_id_order(forms):
    import scipy.io

    from pipeline.data.imagenet_archives import _devkit_files, devkit_val_synsets

    root = forms["ilsvrc-tar"]
    folder_val = {p.name: p.parent.name for p in (forms["imagefolder"] / "val").rglob("*.JPEG")}
    truth = devkit_val_synsets(root)
    assert {f"ILSVRC2012_val_{i + 1:08d}.JPEG": s for i, s in enumerate(truth)} == folder_val
    # the devkit's IDs are a permutation, so reading an ID as "sorted index + 1" would mislabel these images
    meta, ids = _devkit_files(root)
    raw = [ILSVRC_SYNSETS[int(i) - 1] for i in ids.decode().split()]
    assert raw != truth
    leaves = [s for s in scipy.io.loadmat(io.BytesIO(meta), squeeze_me=True)["synsets"] if s["num_children"] == 0]
    assert len(leaves) == 1000


def test_archive_forms_are_read_in_place(forms, sharded):
    """Nothing is unpacked next to the archives; the shard stage only read them."""
    for layout in ARCHIVES:
        root = forms[layout]
        files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
        expected = {"hf-parquet": ["data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet",
                                   "data/validation-00000-of-00002.parquet", "data/validation-00001-of-00002.parquet"],
                    "wds": [f"imagenet1k-{s}-{i:04d}.tar" for s in ("train", "validation") for i in range(3)],
                    "ilsvrc-tar": ["ILSVRC2012_devkit_t12.tar.gz", "ILSVRC2012_img_train.tar",
                                   "ILSVRC2012_img_val.tar"]}[layout]
        assert files == sorted([*expected, "README.txt", "tiny_imagenet.json"])


@pytest.mark.parametrize("layout", ARCHIVES)
def test_max_per_class_and_classes_select_the_same_images_in_every_form(forms, layout, make_config):
    from stages.inputs import source_listing

    def chosen(root):
        listing = source_listing(make_config("data.max_per_class=2", "data.classes=2", root=root))
        return sorted((im.split, Path(im.rel_path).name, im.label) for s in listing.images.values() for im in s)

    assert chosen(forms[layout]) == chosen(forms["imagefolder"])
    assert len(chosen(forms[layout])) == 2 * 2 * 2


@pytest.mark.parametrize("layout", ["hf-parquet", "ilsvrc-tar"])
def test_an_archive_form_resumes_after_a_kill_to_the_same_output(forms, sharded, layout, tmp_path):
    root, storage = forms[layout], tmp_path / "killed"
    overrides = [f"storage.root={storage}", f"data.root={root}", "data.generate_tiny=null", "shard.workers=1",
                 "shard.samples_per_shard=2", "runtime.progress=false"]
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, "x", "12", *overrides], cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == -signal.SIGKILL
    from pipeline.config import load_config

    resumed = run_pipeline(load_config(None, overrides), until="shard")["shard"].dir
    for name in ("manifest.parquet", "rejected.parquet"):
        assert pq.read_table(resumed / name).equals(pq.read_table(sharded[layout] / name))
    assert {p.name: p.read_bytes() for p in (resumed / "shards").glob("*.tar")} == {
        p.name: p.read_bytes() for p in (sharded[layout] / "shards").glob("*.tar")}


def test_the_shipped_synset_list_is_the_sorted_ilsvrc_list_timm_ships_too():
    import timm

    timm_list = (Path(timm.__file__).parent / "data" / "_info" / "imagenet_synsets.txt").read_text().split()
    assert list(ILSVRC_SYNSETS) == timm_list == sorted(set(timm_list)) and len(ILSVRC_SYNSETS) == 1000


def test_a_root_in_no_known_form_is_refused_in_one_line(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "notes.parquet").write_bytes(b"x")
    with pytest.raises(ValueError) as err:
        detect_layout(tmp_path)
    message = str(err.value)
    assert "\n" not in message and str(tmp_path) in message
    assert all(form in message for form in ARCHIVES)


def test_make_tiny_imagenet_cli_writes_a_form(tmp_path):
    from typer.testing import CliRunner

    from srcflow.cli import app

    result = CliRunner().invoke(app, ["make-tiny-imagenet", str(tmp_path / "wds"), "--layout", "wds", "--classes", "2",
                                      "--per-class", "3", "--val-per-class", "1", "--size", "16", "--quirks"])
    assert result.exit_code == 0, result.output
    assert detect_layout(tmp_path / "wds") == "wds"
    with tarfile.open(tmp_path / "wds" / "imagenet1k-train-0000.tar") as tar:
        assert {Path(n).suffix for n in tar.getnames()} == {".cls", ".jpg", ".json"}


def _stored_images(out: Path) -> dict[str, bytes]:
    images = {}
    for tar_path in sorted((out / "shards").glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                if ext == "jpg":
                    images[key] = tar.extractfile(m).read()
    return images
