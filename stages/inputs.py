"""What each stage reads from outside the store, checked and digested when a run is planned.

The planner (`status`, `run`, `verify`, `plan`) imports this module and never a stage's own, so planning
needs no torch: a weights file is fitted to the configured architecture once (a meta-device model
against the file's tensor shapes, no weights read) and the pass is remembered by its sha256
(`artifacts.check_once`); the dataset listing's digest is remembered by directory mtimes
(`dataset_inputs`). A bad input fails here, in one line naming its key, before any stage works.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from pipeline.artifacts import check_once, file_sha256, input_digest, local_cache_dir, writes_allowed
from pipeline.config import Config
from pipeline.data.imagenet import SourceImage, detect_layout, listing_digest, scan_split
from pipeline.models.configured import decoder_arch, encoder_arch
from pipeline.models.rae_family import read_weights_folder
from storage_schemas.evaluation import check_adm_reference, check_inception_file
from storage_schemas.success import write_atomic

log = logging.getLogger("srcflow")

ENCODER_WEIGHTS = ("a local encoder checkpoint (.safetensors or .pth, timm or HF names), a transformers folder or a "
                   "diffusers AutoencoderRAE folder")
DECODER_WEIGHTS = ("a released RAE decoder checkpoint (a state_dict .pt or a dict with 'ema'/'model') or a diffusers "
                   "AutoencoderRAE folder")
ADM_REFERENCE_URL = "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet/256/" \
                    "VIRTUAL_imagenet256_labeled.npz"
STANDIN_SEED = 0
LISTING_CACHE_VERSION = 1
# The digest of an input that `srcflow run` creates before it reads it (the tiny dataset, the stand-in Inception), as
# planned by `status`, `plan` and `verify`, which create nothing: the stages that read it plan as missing.
PENDING = "pending: "


# --- the dataset -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Listing:
    layout: str
    synsets: list[str]
    images: dict[str, list[SourceImage]]
    ignored: dict[str, int]
    digest: str


def source_listing(cfg: Config) -> Listing:
    """The sorted listing of the configured splits and classes of `data.root` (the shard stage's input)."""
    prepare_source(cfg)
    d = cfg.data
    classes = tuple(d.classes) if isinstance(d.classes, list) else d.classes
    listing = _scan(str(Path(d.root).absolute()), d.layout, classes, d.max_per_class, tuple(cfg.shard.splits))
    for split in cfg.shard.splits:
        if not listing.images[split]:
            raise ValueError(f"data.root: {d.root} holds no {split} images of the selected classes in {listing.layout} "
                             f"form (`srcflow make-tiny-imagenet OUT --layout {listing.layout}` writes an example)")
    return listing


def prepare_source(cfg: Config) -> str | None:
    """The smoke config's dataset is generated on first use, and only at `data.generate_tiny.root` (a mistyped
    data.root is an error, never a new dataset); any other data.root must be a directory. Returns a PENDING digest
    where the set is still to be generated and nothing may be written (`artifacts.read_only`)."""
    from pipeline.data.tiny_imagenet import make_tiny_imagenet

    root = Path(cfg.data.root)
    tiny = cfg.data.generate_tiny
    expected = "a directory holding ImageNet in one of the data.layout forms"
    if tiny is not None and tiny.root is not None and os.path.abspath(tiny.root) == os.path.abspath(root):
        if not writes_allowed():
            return None if root.is_dir() else f"{PENDING}{root} (`srcflow run` generates it)"
        make_tiny_imagenet(root, classes=tiny.classes, per_class=tiny.per_class, val_per_class=tiny.val_per_class,
                           size=tiny.size, seed=tiny.seed, kind=tiny.kind)
    elif root.is_file():
        raise ValueError(f"data.root: {root} is a file (expected {expected})")
    elif not root.is_dir():
        generated = "" if tiny is None else (
            f"; data.generate_tiny generates the tiny set only at {tiny.root}" if tiny.root is not None else
            "; data.generate_tiny generates the tiny set only where data.generate_tiny.root names")
        raise FileNotFoundError(f"data.root: {root} does not exist (expected {expected}){generated}")
    elif not any(root.iterdir()):
        raise ValueError(f"data.root: {root} is empty (expected {expected})")
    return None


@lru_cache(maxsize=4)
def _scan(root: str, layout: str, classes, max_per_class, splits) -> Listing:
    try:
        layout = detect_layout(root) if layout == "auto" else layout
        images, ignored = {}, {}
        for split in splits:
            images[split], ign = scan_split(root, split, layout, max_per_class=max_per_class,
                                            classes=list(classes) if isinstance(classes, tuple) else classes)
            for reason, n in ign.items():
                ignored[reason] = ignored.get(reason, 0) + n
    except FileNotFoundError as e:  # e.g. no val/: name what the layout needs
        raise ValueError(f"data.root: {root} lacks {e.filename} (expected train and val in {layout} form)") from None
    except ValueError as e:  # the layout, or an empty class folder: name the key
        raise ValueError(f"data.root: {e}") from None
    synsets = sorted({im.synset for split in images.values() for im in split})
    digest = listing_digest([im for split in splits for im in images[split]], root)
    return Listing(layout, synsets, images, ignored, digest)


def dataset_inputs(cfg: Config) -> dict[str, str]:
    """The listing's digest (names, labels, sizes of every selected image). Listing ImageNet takes seconds, so
    the digest is remembered by the mtimes of the directories it scans (and the val csv): adding, removing or
    renaming a file changes one. A file rewritten in place, keeping its name, is seen by `--force shard`."""
    pending = prepare_source(cfg)
    if pending is not None:
        return {"dataset_listing": pending}
    key = _listing_key(cfg)
    cached = local_cache_dir() / "listings" / key[:32] if key else None
    if cached is not None:
        try:
            return {"dataset_listing": json.loads(cached.read_text())["digest"]}
        except (OSError, ValueError, KeyError):
            pass
    digest = source_listing(cfg).digest
    if cached is not None and writes_allowed():
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(cached, json.dumps({"digest": digest, "root": str(Path(cfg.data.root).absolute())}))
        except OSError:
            pass  # best effort: a read-only working directory lists again next time
    return {"dataset_listing": digest}


def is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:  # a symlink loop: a file the listing holds, and `shard` rejects
        return False


def _listing_key(cfg: Config) -> str | None:
    """sha256 over the selection and the (path, mtime) of every directory under data.root down to the class
    folders; None when data.root is not a directory (an error source_listing reports)."""
    import hashlib

    d = cfg.data
    root = Path(d.root).absolute()
    if not root.is_dir():
        return None
    h = hashlib.sha256(json.dumps([LISTING_CACHE_VERSION, str(root), d.layout, d.classes, d.max_per_class,
                                   list(cfg.shard.splits)]).encode())

    def visit(path: Path, depth: int) -> None:
        with os.scandir(path) as entries:
            for entry in sorted(entries, key=lambda e: e.name):
                if is_dir(entry):
                    h.update(f"{entry.path}\t{entry.stat().st_mtime_ns}\n".encode())
                    if depth:
                        visit(Path(entry.path), depth - 1)
                elif entry.name.endswith((".csv", ".tar", ".parquet", ".tar.gz", ".mat", ".txt")):
                    # Kaggle's val csv; the archive forms' files (a rewritten archive keeps its folder's mtime)
                    st = entry.stat()
                    h.update(f"{entry.path}\t{st.st_mtime_ns}\t{st.st_size}\n".encode())

    h.update(f"{root}\t{root.stat().st_mtime_ns}\n".encode())
    visit(root, 3)  # root / [ILSVRC/Data/CLS-LOC/] / split / synset: at most 3 levels above the images
    return h.hexdigest()


# --- the encoder -------------------------------------------------------------------------------


def encoder_weights_digest(cfg: Config) -> str:
    """sha256 of encoder.weights after it is checked to fit the configured encoder ("random": none)."""
    if cfg.encoder.weights == "random":
        return "random"

    def fits() -> None:
        from pipeline.models.rae import build_rae_encoder

        build_rae_encoder(cfg.encoder.weights, device="meta", **encoder_arch(cfg))

    return weights_digest("encoder.weights", cfg.encoder.weights, ENCODER_WEIGHTS,
                          json.dumps(encoder_arch(cfg), sort_keys=True), fits)


def weights_digest(key: str, path: str, expected: str, spec: str, fits) -> str:
    """sha256 of a weights file, or of a weights folder's safetensors (its config.json, checked against the
    configured architecture by `fits`, enters the check's key), after `fits` passed; one line naming `key` when
    the file or folder is missing or does not fit."""
    if Path(path).is_dir():
        folder = read_weights_folder(path, key)
        return check_once(folder.weights, f"{spec}|{file_sha256(folder.config_path)}", fits)
    input_digest(key, path, expected)  # missing: one line
    return check_once(path, spec, fits)


def encoder_inputs(cfg: Config) -> dict[str, str]:
    return {"encoder_weights": encoder_weights_digest(cfg)}


def stats_inputs(cfg: Config) -> dict[str, str]:
    """For the stages that normalize features: the released statistics file, when `encode.stats: file`."""
    if cfg.encode.stats == "computed":
        return {}
    path = cfg.encode.stats_file
    if path and Path(path).is_dir():  # a diffusers AutoencoderRAE folder: the statistics are in its safetensors
        return {"feature_stats": file_sha256(read_weights_folder(path, "encode.stats_file").weights)}
    return {"feature_stats": input_digest("encode.stats_file", path,
                                          "RAE's released statistics for encode.stats: file, or a diffusers "
                                          "AutoencoderRAE folder")}


# --- the decoder -------------------------------------------------------------------------------


def decoder_enabled(cfg: Config) -> bool:
    """fit_decoder runs only when no released decoder is given."""
    return cfg.decoder.weights is None


def decoder_inputs(cfg: Config) -> dict[str, str]:
    """For the stages that decode: the released decoder's digest, after it is checked to fit decoder.* (a
    trained one enters as upstream)."""
    if cfg.decoder.weights is None:
        return {}

    def fits() -> None:
        from pipeline.models.rae import build_rae_decoder

        build_rae_decoder(cfg.decoder.weights, device="meta", **decoder_arch(cfg))

    return {"decoder_weights": weights_digest("decoder.weights", cfg.decoder.weights, DECODER_WEIGHTS,
                                              json.dumps(decoder_arch(cfg), sort_keys=True), fits)}


def lpips_inputs(cfg: Config) -> dict[str, str]:
    """For fit_decoder itself: the LPIPS weights' digest, when a file is given."""
    if cfg.fit_decoder.lpips_weights is None:
        return {}
    return {"lpips_weights": input_digest("fit_decoder.lpips_weights", cfg.fit_decoder.lpips_weights,
                                          "a local LPIPS-VGG state dict, VGG16 backbone and linear layers")}


# --- evaluation --------------------------------------------------------------------------------


def inception_weights_digest(cfg: Config) -> str:
    """sha256 of `evaluate.inception_weights` after its tensors are checked against torch-fidelity's Inception;
    writes the seeded stand-in first when `evaluate.make_standin` asks for it."""
    path = cfg.evaluate.inception_weights
    if cfg.evaluate.make_standin and path and not Path(path).exists():
        if not writes_allowed():
            return f"{PENDING}{path} (`srcflow run` writes this stand-in)"
        from pipeline.metrics.fidelity import make_standin_inception_weights

        make_standin_inception_weights(path, seed=STANDIN_SEED)
        log.warning("evaluate.make_standin: wrote stand-in Inception weights to %s; metrics computed with them "
                    "are marked inception_weights: stand-in", path)
    check_inception_file(path)  # unset, missing or empty: one line

    def fits() -> None:
        from pipeline.metrics.fidelity import check_inception_state

        check_inception_state(path)

    return check_once(path, "torch-fidelity inception-v3-compat", fits)


def adm_reference_digest(cfg: Config) -> str:
    """sha256 of `reference.path`; a one-line error when it is missing, is not an ADM reference batch, or holds
    images of another resolution than data.resolution (read from its headers: before any sampling)."""
    need = f"ADM's reference batch, e.g. {ADM_REFERENCE_URL}"
    if not cfg.reference.path:
        raise ValueError(f"reference.path is not set (reference.kind adm_npz needs {need})")
    input_digest("reference.path", cfg.reference.path, f"reference.kind adm_npz needs {need}")
    check_adm_reference(cfg.reference.path, cfg.data.resolution)
    return file_sha256(cfg.reference.path)


def reference_inputs(cfg: Config) -> dict[str, str]:
    digests = {"inception_weights": inception_weights_digest(cfg), **dinov2_inputs(cfg)}
    if cfg.reference.kind == "adm_npz":
        digests["adm_reference"] = adm_reference_digest(cfg)
    return digests


def evaluate_inputs(cfg: Config) -> dict[str, str]:
    """The Inception weights' sha256: a missing or wrong file fails `srcflow run` at plan time, before sampling."""
    return {"inception_weights": inception_weights_digest(cfg), **dinov2_inputs(cfg)}


def dinov2_inputs(cfg: Config) -> dict[str, str]:
    """FD_DINOv2's weights, when `evaluate.dinov2_weights` is set: their sha256 after they are checked to be a DINOv2
    ViT (shapes only)."""
    path = cfg.evaluate.dinov2_weights
    if path is None:
        return {}

    def fits() -> None:
        from pipeline.metrics.fd_dinov2 import load_dinov2

        load_dinov2(path, meta=True)

    file = Path(path) / "model.safetensors" if Path(path).is_dir() else path  # fd_dinov2.weights_file, torch-free
    input_digest("evaluate.dinov2_weights", file, "a local DINOv2-L/14 file (dinov2_vitl14_pretrain.pth)")
    return {"dinov2_weights": check_once(file, "fd_dinov2 DINOv2 ViT", fits)}
