"""What a rehearsal stands in for when the config's own inputs are not on this machine: an ImageNet with all of the
config's classes, and random weights written in the forms the real files are released in, so the real loaders,
key mappings and preflight checks read them.

- `make_standin_imagenet`: ImageFolder train/ and val/ with one folder per synset (1,000 for the paper configs;
  the first 16 ImageNet ids, then made-up ones that sort after them), photo-like 500x375 JPEGs of ImageNet's size
  (~100 KB) in the classes the rehearsal reads and hard links to a small pool in the others; and the quirks the
  shard stage handles: a CMYK JPEG, a grayscale one, a PNG named .JPEG, an empty (undecodable) file, a hidden file
  and a stray text file.
- `write_random_weights`: timm's DINOv2 safetensors (its released 518-px position embedding, which the loader
  resamples), RAE's decoder `model.pt` (a plain state dict with RAE's key names), torch-fidelity's Inception `.pth`
  (the stand-in of pipeline.metrics.fidelity), an ADM reference batch `.npz` at the config's resolution, RAE's
  statistics file `{"mean": None, "var": ...}`.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.config import Config
from pipeline.data.tiny_imagenet import SYNSETS, photo_like_jpeg

POOL = 8  # distinct images the classes a rehearsal does not read link to


def standin_synsets(classes: int) -> list[str]:
    """`classes` sorted synset ids: ImageNet's first 16, then made-up ids after them (n9xxxxxxx)."""
    made_up = [f"n9{k:07d}" for k in range(len(SYNSETS), classes)]
    return sorted(SYNSETS[:classes]) + made_up


def spread(items: list, k: int) -> list:
    """k items evenly over the list, its first and last included (labels 0 and the last: the flow keeps every
    class embedding); all of them when k covers the list."""
    if k >= len(items):
        return list(items)
    if k == 1:
        return [items[0]]
    return [items[round(i * (len(items) - 1) / (k - 1))] for i in range(k)]


def make_standin_imagenet(root: Path, synsets: list[str], read: list[str], train_per_class: int, val_per_class: int,
                          seed: int = 0) -> dict:
    """Write the stand-in (module docstring) at `root`; `read`: the synsets whose images are rendered one by one.
    Returns what it wrote, for the report."""
    root = Path(root)
    read_set = set(read)
    pool = root / ".pool"
    pool.mkdir(parents=True, exist_ok=True)
    for i in range(POOL):
        (pool / f"{i}.JPEG").write_bytes(photo_like_jpeg(seed * 1000 + i))
    rendered = 0
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        for k, synset in enumerate(synsets):
            folder = root / split / synset
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                path = folder / (f"{synset}_{i}.JPEG" if split == "train"
                                 else f"ILSVRC2012_val_{i * len(synsets) + k + 1:08d}.JPEG")
                if synset in read_set:
                    path.write_bytes(photo_like_jpeg(((seed * 2 + (split == "val")) * 100_000 + k) * 1000 + i))
                    rendered += 1
                else:
                    os.link(pool / f"{(k + i) % POOL}.JPEG", path)
    quirks = _quirks(root / "train", [s for s in synsets if s in read_set])
    return {"root": str(root), "classes": len(synsets), "classes_read": len(read), "train_per_class": train_per_class,
            "val_per_class": val_per_class, "rendered_jpegs": rendered, "quirks": quirks,
            "images": "photo-like 500x375 JPEGs, quality 90 (pipeline.data.tiny_imagenet.photo_like_jpeg)"}


def _quirks(train: Path, read: list[str]) -> dict[str, str]:
    """Turn the first images of the read classes into what the shard stage converts, and add what it skips or
    rejects (README "What each stage does", shard)."""
    if not read:
        return {}
    first = lambda synset: train / synset / f"{synset}_0.JPEG"  # noqa: E731
    done = {}

    def convert(synset: str, mode: str, fmt: str, what: str) -> None:
        path = first(synset)
        image = Image.open(path).convert(mode)
        buffer = io.BytesIO()
        image.save(buffer, format=fmt)
        path.write_bytes(buffer.getvalue())  # the name stays .JPEG, as ImageNet's PNG n02105855_2933 does
        done[what] = str(path.relative_to(train.parent))

    convert(read[0], "CMYK", "JPEG", "cmyk_jpeg")
    convert(read[1 % len(read)], "L", "JPEG", "grayscale_jpeg")
    convert(read[2 % len(read)], "RGBA", "PNG", "png_named_jpeg")
    folder = train / read[-1]
    (folder / f"{read[-1]}_empty.JPEG").write_bytes(b"")  # rejected: not an image
    (folder / ".hidden.JPEG").write_bytes(b"x")  # skipped: hidden
    (folder / "notes.txt").write_text("not an image\n")  # skipped: not an image extension
    done |= {"empty_file": f"train/{read[-1]}/{read[-1]}_empty.JPEG", "hidden_file": f"train/{read[-1]}/.hidden.JPEG",
             "text_file": f"train/{read[-1]}/notes.txt"}
    return done


# --- weights in their released forms ----------------------------------------------------------------------------


def write_random_weights(cfg: Config, kinds: list[str], folder: Path, seed: int = 0) -> dict[str, dict]:
    """Random weights for each of `kinds` (encoder, decoder, inception, reference, stats) in its released form under
    `folder`; returns {config key: {"path", "form"}}."""
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for kind in kinds:
        torch.manual_seed(seed)
        key, path, form = WRITERS[kind](cfg, folder)
        written[key] = {"path": str(path), "form": form}
    return written


def _encoder(cfg: Config, folder: Path) -> tuple[str, Path, str]:
    """timm's released layout (vit_base_patch14_reg4_dinov2.lvd142m model.safetensors): the model at timm's default
    518-px input, so pos_embed is 37x37 and the loader resamples it to encoder.input_size, as for the real file."""
    import safetensors.torch
    import timm

    arch = {k: v for k, v in cfg.encoder.arch.model_dump().items() if v is not None}
    vit = timm.create_model(cfg.encoder.name, pretrained=False, num_classes=0, **arch)
    path = folder / f"{cfg.encoder.name}.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, path)
    return "encoder.weights", path, "timm safetensors (518-px pos_embed, resampled on load)"


def _decoder(cfg: Config, folder: Path) -> tuple[str, Path, str]:
    """RAE's released decoder (models/decoders/.../model.pt): torch.save of the decoder's plain state dict."""
    import torch

    from pipeline.models.configured import build

    decoder = build("decoder", cfg, device="cpu")
    path = folder / "model.pt"
    torch.save(decoder.state_dict(), path)
    return "decoder.weights", path, "RAE decoder model.pt (plain state dict, RAE key names)"


def _inception(cfg: Config, folder: Path) -> tuple[str, Path, str]:
    from pipeline.metrics.fidelity import make_standin_inception_weights

    path = folder / "weights-inception-standin.pth"
    make_standin_inception_weights(path)
    return "evaluate.inception_weights", path, "torch-fidelity Inception .pth (seeded stand-in)"


def _reference(cfg: Config, folder: Path, images: int = 16) -> tuple[str, Path, str]:
    """ADM's reference batch layout (guided-diffusion evaluations: mu, sigma, mu_s, sigma_s, arr_0) at
    data.resolution: statistics of random features (positive definite covariances), random uint8 images."""
    from pipeline.metrics.fidelity import SPATIAL_DIM

    rng = np.random.default_rng(0)

    def gaussian(dim: int) -> tuple[np.ndarray, np.ndarray]:
        x = rng.standard_normal((dim + 64, dim))
        return x.mean(0), np.cov(x, rowvar=False)

    mu, sigma = gaussian(2048)
    mu_s, sigma_s = gaussian(SPATIAL_DIM)
    r = cfg.data.resolution
    arr_0 = rng.integers(0, 256, (images, r, r, 3), dtype=np.uint8)
    path = folder / f"VIRTUAL_imagenet{r}_standin.npz"
    np.savez(path, mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s, arr_0=arr_0)
    return "reference.path", path, f"ADM reference batch .npz ({images} random {r}x{r} images, random statistics)"


def _stats(cfg: Config, folder: Path) -> tuple[str, Path, str]:
    """RAE's released statistics (stat.pt): {"mean": None, "var": (channels, grid, grid)}."""
    import torch

    from pipeline.models.configured import encoder_geometry

    grid, channels = encoder_geometry(cfg)
    path = folder / "stat.pt"
    torch.save({"mean": None, "var": torch.rand(channels, grid, grid) + 0.5}, path)
    return "encode.stats_file", path, "RAE statistics stat.pt ({'mean': None, 'var': tensor})"


WRITERS = {"encoder": _encoder, "decoder": _decoder, "inception": _inception, "reference": _reference,
           "stats": _stats}
