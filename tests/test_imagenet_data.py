"""Specification of the ImageNet source layer: layouts, labels, listing, and turning file
bytes into trusted JPEGs; plus the procedural tiny ImageNet used by the other tests."""

import hashlib
import io
import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from pipeline.data.imagenet import (
    RejectedImage,
    SourceImage,
    detect_layout,
    list_synsets,
    listing_digest,
    prepare_image_bytes,
    scan_split,
)
from pipeline.data.tiny_imagenet import SYNSETS, make_tiny_imagenet, render_image

SMALL = dict(classes=3, per_class=5, val_per_class=4, size=32, seed=0)


@pytest.fixture(scope="module")
def folder_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagefolder") / "imagenet"
    make_tiny_imagenet(root, **SMALL)
    return root


@pytest.fixture(scope="module")
def kaggle_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("kaggle") / "imagenet"
    make_tiny_imagenet(root, **SMALL, layout="kaggle")
    return root


def copy_of(root: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(root, dst)
    return dst


def tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def jpeg_bytes(pixels: np.ndarray, mode: str | None = None, **save) -> bytes:
    img = Image.fromarray(pixels)
    if mode:
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, "JPEG", **save)
    return buf.getvalue()


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def decoded(jpeg: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(jpeg))
    img.load()
    return img


@pytest.fixture
def pixels():
    return np.random.default_rng(0).integers(0, 256, (24, 40, 3), dtype=np.uint8)


# --- layout and labels -------------------------------------------------------------------


def test_detect_layout_recognises_imagefolder_and_kaggle_download_root(folder_root, kaggle_root):
    assert detect_layout(folder_root) == "imagefolder"
    assert (kaggle_root / "LOC_val_solution.csv").is_file()
    assert (kaggle_root / "ILSVRC/Data/CLS-LOC/val").is_dir()
    assert detect_layout(kaggle_root) == "kaggle"


def test_kaggle_csv_next_to_val_is_found_when_root_is_the_cls_loc_folder(kaggle_root, tmp_path):
    root = tmp_path / "cls-loc"
    shutil.copytree(kaggle_root / "ILSVRC/Data/CLS-LOC", root)
    shutil.copy(kaggle_root / "LOC_val_solution.csv", root)
    assert detect_layout(root) == "kaggle"
    images, _ = scan_split(root, "val", "kaggle")
    assert images[0].rel_path.startswith("val/ILSVRC2012_val_")


@pytest.mark.parametrize("setup, expected", [
    ("empty", "neither train/ and val/"),
    ("flat_val_without_csv", "LOC_val_solution.csv"),
    ("val_without_images", "no images"),
])
def test_unclear_layout_raises_one_line_error_naming_root(tmp_path, setup, expected):
    root = tmp_path / "data"
    (root / "train/n01440764").mkdir(parents=True)
    if setup != "empty":
        (root / "val").mkdir()
    if setup == "flat_val_without_csv":
        (root / "val/ILSVRC2012_val_00000001.JPEG").write_bytes(b"x")
    if setup == "empty":
        shutil.rmtree(root / "train")
    with pytest.raises(ValueError) as err:
        detect_layout(root)
    message = str(err.value)
    assert "\n" not in message and str(root) in message and expected in message


def test_labels_are_indices_of_sorted_train_synsets(folder_root):
    synsets = list_synsets(folder_root, "imagefolder")
    assert synsets == sorted(synsets) == list(SYNSETS[:3])
    for split in ("train", "val"):
        images, ignored = scan_split(folder_root, split, "imagefolder")
        assert ignored == {}
        assert {(im.synset, im.label) for im in images} == {(s, i) for i, s in enumerate(synsets)}
    assert scan_split(folder_root, "train", "imagefolder")[0][0] == SourceImage(
        "train", "train/n01440764/n01440764_0.JPEG", "n01440764", 0)


def test_both_layouts_give_identical_labels_for_the_same_images(folder_root, kaggle_root):
    assert list_synsets(folder_root, "imagefolder") == list_synsets(kaggle_root, "kaggle")
    for split in ("train", "val"):
        folder, _ = scan_split(folder_root, split, "imagefolder")
        kaggle, _ = scan_split(kaggle_root, split, "kaggle")
        assert by_name(folder) == by_name(kaggle)
        assert len(folder) == SMALL["classes"] * (SMALL["per_class"] if split == "train"
                                                  else SMALL["val_per_class"])
        for im in kaggle:  # rel_path is relative to the root the caller passed
            assert (kaggle_root / im.rel_path).is_file()


def test_scan_order_is_by_synset_then_file_name_and_kaggle_val_by_file_name(folder_root,
                                                                           kaggle_root):
    train, _ = scan_split(folder_root, "train", "imagefolder")
    assert [(im.synset, Path(im.rel_path).name) for im in train] == sorted(
        (im.synset, Path(im.rel_path).name) for im in train)
    val, _ = scan_split(kaggle_root, "val", "kaggle")
    names = [Path(im.rel_path).name for im in val]
    assert names == sorted(names)
    assert [im.label for im in val[:3]] == [0, 1, 2]  # val ids interleave the classes


def test_classes_as_count_or_list_select_subsets_and_keep_dataset_labels(folder_root,
                                                                         kaggle_root):
    for root, layout in ((folder_root, "imagefolder"), (kaggle_root, "kaggle")):
        for split in ("train", "val"):
            first_two, _ = scan_split(root, split, layout, classes=2)
            assert {im.label for im in first_two} == {0, 1}
            chosen, ignored = scan_split(root, split, layout, classes=["n01484850", "n01440764"])
            assert {(im.synset, im.label) for im in chosen} == {("n01440764", 0),
                                                                ("n01484850", 2)}
            assert ignored == {}  # other classes' files are skipped, not counted
    with pytest.raises(ValueError, match="n09999999"):
        scan_split(folder_root, "train", "imagefolder", classes=["n09999999"])
    with pytest.raises(ValueError, match="classes=4"):
        scan_split(folder_root, "train", "imagefolder", classes=4)


def test_max_per_class_keeps_the_first_files_in_sorted_order(folder_root, kaggle_root):
    train, _ = scan_split(folder_root, "train", "imagefolder", max_per_class=2)
    assert [Path(im.rel_path).name for im in train if im.label == 1] == [
        "n01443537_0.JPEG", "n01443537_1.JPEG"]
    assert len(train) == 3 * 2
    full, _ = scan_split(kaggle_root, "val", "kaggle")
    some, _ = scan_split(kaggle_root, "val", "kaggle", max_per_class=1, classes=2)
    assert some == [im for im in full if im.label < 2][:2]


def test_hidden_and_stray_files_are_ignored_and_counted(folder_root, kaggle_root, tmp_path):
    root = copy_of(folder_root, tmp_path / "folder")
    cls = root / "train/n01440764"
    (cls / ".DS_Store").write_bytes(b"\0")
    (cls / "._n01440764_0.JPEG").write_bytes(b"\0")  # macOS resource fork
    (cls / "notes.txt").write_text("stray")
    (cls / "n01440764_9.jpeg.bak").write_bytes(b"\0")
    (cls / "n01440764_99.jpg").write_bytes((cls / "n01440764_0.JPEG").read_bytes())
    (root / "train/.cache").mkdir()
    before, _ = scan_split(folder_root, "train", "imagefolder")
    after, ignored = scan_split(root, "train", "imagefolder")
    assert ignored == {"hidden": 3, "not_an_image_extension": 2}
    assert len(after) == len(before) + 1  # lower-case .jpg is an image too

    kroot = copy_of(kaggle_root, tmp_path / "kaggle")
    val = kroot / "ILSVRC/Data/CLS-LOC/val"
    (val / ".DS_Store").write_bytes(b"\0")
    (val / "LICENSE").write_text("stray")
    (val / "ILSVRC2012_val_99999999.JPEG").write_bytes(b"\0")
    images, ignored = scan_split(kroot, "val", "kaggle")
    assert ignored == {"hidden": 1, "not_an_image_extension": 1, "no_label_in_csv": 1}
    assert len(images) == 3 * SMALL["val_per_class"]


def test_listing_digest_changes_when_a_file_changes_size(folder_root, tmp_path):
    root = copy_of(folder_root, tmp_path)
    images, _ = scan_split(root, "train", "imagefolder")
    digest = listing_digest(images, root)
    assert digest == listing_digest(scan_split(root, "train", "imagefolder")[0], root)
    assert digest == listing_digest(images, folder_root)  # same content elsewhere
    with open(root / images[3].rel_path, "ab") as f:
        f.write(b"\0")
    assert listing_digest(images, root) != digest
    assert listing_digest(images[:-1], folder_root) != digest


# --- bytes -> trusted JPEG ---------------------------------------------------------------


def test_rgb_baseline_jpeg_is_returned_byte_for_byte(pixels):
    raw = jpeg_bytes(pixels, quality=90)
    out, info = prepare_image_bytes(raw)
    assert out == raw
    assert info == {"orig_format": "JPEG", "orig_mode": "RGB", "width": 40, "height": 24,
                    "converted": False}


def test_rgb_progressive_jpeg_is_also_kept_byte_for_byte(pixels):
    raw = jpeg_bytes(pixels, quality=90, progressive=True)
    assert decoded(raw).info.get("progressive")
    out, info = prepare_image_bytes(raw)
    assert out == raw and not info["converted"]


@pytest.mark.parametrize("case", ["cmyk_jpeg", "grayscale_jpeg", "png_named_jpeg", "rgba_png",
                                  "la_png", "palette_png", "palette_png_transparent",
                                  "gray16_png", "bmp"])
def test_non_rgb_or_non_jpeg_images_are_converted_once_to_rgb_baseline_jpeg(pixels, case):
    img = Image.fromarray(pixels)
    raw = {
        "cmyk_jpeg": lambda: jpeg_bytes(pixels, "CMYK"),
        "grayscale_jpeg": lambda: jpeg_bytes(pixels, "L"),
        "png_named_jpeg": lambda: png_bytes(img),
        "rgba_png": lambda: png_bytes(img.convert("RGBA")),
        "la_png": lambda: png_bytes(img.convert("LA")),
        "palette_png": lambda: png_bytes(img.convert("P")),
        "palette_png_transparent": lambda: png_bytes(_transparent_palette(img)),
        "gray16_png": lambda: png_bytes(Image.fromarray(pixels[..., 0].astype(np.uint16) * 257)),
        "bmp": lambda: _save(img, "BMP"),
    }[case]()
    out, info = prepare_image_bytes(raw)
    assert info["converted"] and (info["width"], info["height"]) == (40, 24)
    again, _ = prepare_image_bytes(raw)
    assert again == out  # fixed encoder settings: deterministic
    result = decoded(out)
    assert (result.format, result.mode, result.size) == ("JPEG", "RGB", (40, 24))
    assert not result.info.get("progressive")
    assert prepare_image_bytes(out)[0] == out  # converted output is final
    if case == "gray16_png":  # 16-bit scaled to 8-bit, not clipped
        assert abs(np.asarray(result, float).mean() - pixels[..., 0].mean()) < 3


def test_alpha_is_composited_on_white():
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[:8] = (255, 0, 0, 255)  # opaque red top, fully transparent black bottom
    out, info = prepare_image_bytes(png_bytes(Image.fromarray(rgba, "RGBA")))
    arr = np.asarray(decoded(out), int)
    assert info["orig_mode"] == "RGBA"
    assert (np.abs(arr[2, 8] - (255, 0, 0)) < 8).all()
    assert (np.abs(arr[13, 8] - (255, 255, 255)) < 8).all()


@pytest.mark.parametrize("raw, reason", [
    (b"", "empty file"),
    (b"this is a text file, not an image\n", "not an image"),
    (b"\xff\xd8\xff", "truncated"),
])
def test_undecodable_bytes_are_rejected_with_a_reason(raw, reason):
    with pytest.raises(RejectedImage) as err:
        prepare_image_bytes(raw)
    assert err.value.reason.startswith(reason)


@pytest.mark.parametrize("keep", [0.3, 0.6, 0.99])
def test_truncated_jpeg_and_png_are_rejected(pixels, keep):
    for raw in (jpeg_bytes(pixels), png_bytes(Image.fromarray(pixels))):
        with pytest.raises(RejectedImage) as err:
            prepare_image_bytes(raw[: int(len(raw) * keep)])
        assert err.value.reason.startswith("truncated")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_refuses_to_run_when_truncated_images_are_allowed_globally(pixels, monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(RuntimeError, match="LOAD_TRUNCATED_IMAGES"):
        prepare_image_bytes(jpeg_bytes(pixels))


def _transparent_palette(img: Image.Image) -> Image.Image:
    p = img.convert("P")
    p.info["transparency"] = 0
    return p


def _save(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


# --- tiny ImageNet -----------------------------------------------------------------------


def test_tiny_imagenet_is_byte_identical_for_the_same_arguments(tmp_path, folder_root):
    make_tiny_imagenet(tmp_path / "again", **SMALL)
    assert tree_digest(tmp_path / "again") == tree_digest(folder_root)
    make_tiny_imagenet(tmp_path / "other_seed", **{**SMALL, "seed": 1})
    assert tree_digest(tmp_path / "other_seed") != tree_digest(folder_root)


def test_tiny_imagenet_second_call_is_a_noop(tmp_path):
    root = tmp_path / "tiny"
    first = make_tiny_imagenet(root, **SMALL)
    stamps = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    second = make_tiny_imagenet(root, **SMALL)
    assert first["created"] and not second["created"]
    assert {k: v for k, v in first.items() if k != "created"} == {
        k: v for k, v in second.items() if k != "created"}
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == stamps
    assert json.loads((root / "tiny_imagenet.json").read_text())["args"]["seed"] == 0
    with pytest.raises(ValueError, match="already holds"):
        make_tiny_imagenet(root, **{**SMALL, "seed": 1})
    assert [p.name for p in tmp_path.iterdir()] == ["tiny"]  # no partial folder left


def test_tiny_imagenet_refuses_more_classes_than_it_knows(tmp_path):
    with pytest.raises(ValueError, match="classes=17"):
        make_tiny_imagenet(tmp_path / "t", classes=17)


def test_tiny_imagenet_images_are_rgb_baseline_jpegs_kept_as_is(folder_root):
    path = next((folder_root / "train/n01440764").iterdir())
    img = decoded(path.read_bytes())
    assert (img.format, img.mode, img.size) == ("JPEG", "RGB", (32, 32))
    assert not img.info.get("progressive")
    assert prepare_image_bytes(path.read_bytes())[0] == path.read_bytes()


def test_tiny_imagenet_class_mean_colours_are_pairwise_far_apart(tmp_path):
    root = tmp_path / "all"
    make_tiny_imagenet(root, classes=len(SYNSETS), per_class=6, val_per_class=1, size=32)
    images, _ = scan_split(root, "train", "imagefolder")
    means = {}
    for im in images:
        rgb = np.asarray(Image.open(root / im.rel_path), float).reshape(-1, 3).mean(0)
        means.setdefault(im.label, []).append(rgb)
    means = {k: np.mean(v, 0) for k, v in means.items()}
    assert len(means) == 16
    closest = min(np.linalg.norm(means[a] - means[b])
                  for a, b in itertools.combinations(means, 2))
    assert closest > 35  # on a 0..255 scale; the default 4 classes are ~100 apart


def test_tiny_imagenet_default_kind_keeps_the_marker_and_pixels_of_before_kinds(folder_root):
    # the default kind must not change existing datasets, hence their listing digests and fingerprints
    assert "kind" not in json.loads((folder_root / "tiny_imagenet.json").read_text())["args"]
    assert np.array_equal(render_image(1, "train", 3, size=32, seed=0),
                          render_image(1, "train", 3, size=32, seed=0, kind="colours"))


def test_tiny_shapes_are_deterministic_and_recorded_as_their_kind(tmp_path):
    args = {"classes": 4, "per_class": 3, "val_per_class": 2, "size": 32, "seed": 0, "kind": "shapes"}
    make_tiny_imagenet(tmp_path / "a", **args)
    make_tiny_imagenet(tmp_path / "b", **args)
    assert tree_digest(tmp_path / "a") == tree_digest(tmp_path / "b")
    assert json.loads((tmp_path / "a/tiny_imagenet.json").read_text())["args"]["kind"] == "shapes"
    with pytest.raises(ValueError, match="already holds"):
        make_tiny_imagenet(tmp_path / "a", **{**args, "kind": "colours"})
    with pytest.raises(ValueError, match=r"kind 'shapes' has 1..4 classes"):
        make_tiny_imagenet(tmp_path / "c", **{**args, "classes": 5})
    with pytest.raises(ValueError, match="kind='stripes'"):
        make_tiny_imagenet(tmp_path / "d", **{**args, "kind": "stripes"})


def test_tiny_shapes_classes_share_colour_size_and_position_statistics():
    # per image: mean colour, ink (the shape's pixels: fg value >= 0.75, bg <= 0.35) and its centroid
    stats = {k: [] for k in range(4)}
    for k, rows in stats.items():
        for i in range(200):
            img = render_image(k, "train", i, size=32, seed=0, kind="shapes").astype(float)
            ink = img.max(2) > 140
            ys, xs = np.nonzero(ink)
            rows.append([*img.reshape(-1, 3).mean(0), ink.mean(), xs.mean(), ys.mean()])
    stats = {k: np.array(v) for k, v in stats.items()}
    spread = np.concatenate(list(stats.values())).std(0)  # across all images
    means = np.array([v.mean(0) for v in stats.values()])
    # class means agree to a fraction of the per-image spread (chance alone: ~0.07 std at n = 200)
    assert (np.abs(means - means.mean(0)) / spread).max() < 0.3
    # ... yet the images of different classes are different shapes: the ink masks of class 0 (disc)
    # and class 3 (cross), centred, overlap far less than two discs do
    def centred(k, i):
        ink = render_image(k, "train", i, size=32, seed=0, kind="shapes").max(2) > 140
        ys, xs = np.nonzero(ink)
        return np.roll(ink, (16 - round(ys.mean()), 16 - round(xs.mean())), (0, 1))
    def iou(a, b):
        return (a & b).sum() / (a | b).sum()
    assert iou(centred(0, 0), centred(3, 0)) < iou(centred(0, 0), centred(0, 1)) - 0.1


def by_name(images) -> dict:
    return {Path(im.rel_path).name: (im.synset, im.label) for im in images}
