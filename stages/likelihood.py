"""Exact likelihood and invertibility as tools: `srcflow score`, `srcflow invert`, `srcflow interpolate`, and the
flow as a classifier (stage `evaluate`). Not a stage: it reads the done artifacts of a config and runs none.

    image    the pipeline's own path, function for function: shard's bytes -> JPEG (prepare_image_bytes), the
             ADM center crop (decode_crop, by encode.decode), the frozen encoder at encode.precision, rounded to
             encode.dtype (encode.encode_pixels, the plain view), per-position normalization and SRC.encode
             (compress.encode_codes): the code c, as compress would store it
    score    log p(c | y) = log N(f(c | y); 0, I) + log |det df/dc| for every class y of the shard set (batched
             over classes, TARFlow.log_prob_classes) and for the null label; the Bayes-rule class under a
             uniform prior, its posterior, the marginal log p(c) = logsumexp_y log p(c | y) - log K, and bits/dim
             -log p / (T d ln 2) of each (flow.class_posterior). At the clean c by default; with noise samples S,
             log p is averaged over c + sigma * eps_s (eps_s seeded by (train.seed, s), the same for every image)
    invert   z = f(c | y), c' = f^-1(z | y), and decode(c') against decode(c) (stages/sample.py decode)
    interpolate   slerp between f(c_a | y) and f(c_b | y), decoded

The flow was trained on c + sigma * eps, so its density is that of the noise-smoothed codes (README,
"Likelihood and inversion").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.config import Config
from pipeline.data.imagenet import IMAGE_EXTENSIONS, RejectedImage, prepare_image_bytes
from pipeline.data.shards import decode_crop
from pipeline.device import autocast, resolve_device
from pipeline.images import save_grid
from pipeline.metrics.reconstruction import psnr
from pipeline.models.flow import class_posterior, slerp
from pipeline.progress import progress
from pipeline.training import step_seed
from stages import STAGE_NAMES
from stages.train_flow import flow_info, load_flow
from storage_schemas.success import Manifest

NOISE_STREAM = 5  # step_seed(train.seed, s, NOISE_STREAM): score's noise draw s
NEEDED = ("shard", "encode", "fit_decoder", "fit_src", "train_flow")  # fit_decoder only when enabled
BAYES_NOTE = ("the flow as a Bayes-rule classifier (uniform prior over the classes) on clean val codes: a property "
              "of the model, not a published metric of the paper")
FIELDS = ("path", "true_class", "true_synset", "predicted_class", "predicted_synset", "posterior", "bits_per_dim",
          "bits_per_dim_marginal", "bits_per_dim_uncond", "error")


# --- the artifacts of a config ------------------------------------------------------------------


def done_manifests(cfg: Config, config_path: str, names: tuple[str, ...] = NEEDED) -> dict[str, Manifest]:
    """The manifests of `names` (the enabled ones) for this config; a one-line error naming the first that is not
    done and the command that builds it. Plans as `srcflow status` does; runs nothing."""
    from pipeline.artifacts import ArtifactStore, DamagedError
    from stages.runner import plan

    last = max(names, key=STAGE_NAMES.index)
    planned = {p.name: p for p in plan(cfg, last)}
    store_manifests = {}
    for name in sorted(names, key=STAGE_NAMES.index):
        p = planned.get(name)
        if p is None:  # disabled by the config (fit_decoder with released decoder weights)
            continue
        if p.state == "damaged":
            raise DamagedError(f"{name} is damaged for this config ({p.problem}): rebuild it with "
                                    f"`srcflow run --config {config_path} --force {name}`")
        if p.state != "done":
            raise FileNotFoundError(f"{name} is not done for this config ({p.state}): run "
                                    f"`srcflow run --config {config_path} --until {last}` first")
        store_manifests[name] = ArtifactStore(cfg.storage.root).manifest(name, p.fingerprint)
    return store_manifests


@dataclass
class Chain:
    """The frozen models of a config's done artifacts, on one device, and the shard set's classes."""

    cfg: Config
    manifests: dict[str, Manifest]
    device: torch.device
    flow: object
    src: object
    normalizer: object
    encoder: object
    decoder: object | None
    classes: np.ndarray  # the labels the flow was trained on, sorted: the classes a Bayes rule chooses among
    synsets: dict[int, str]  # label -> synset (the shard manifest's)
    noise_sigma: float

    @property
    def crop_args(self) -> tuple[int, str, str]:
        """How `encode` made this store's crops: (data.resolution, encode.decode, device)."""
        return self.cfg.data.resolution, self.cfg.encode.decode, str(self.device)

    @property
    def dims(self) -> int:
        return self.flow.blocks[0].pos_embed.shape[0] * self.flow.blocks[0].proj_in.in_features

    def class_of(self, value: str | int | None) -> int | None:
        """`--class`: a label or a synset of the shard set."""
        if value is None:
            return None
        by_synset = {s: k for k, s in self.synsets.items()}
        if str(value) in by_synset and by_synset[str(value)] in self.classes:
            return by_synset[str(value)]
        try:
            label = int(value)
        except ValueError:
            label = None
        if label is None or label not in self.classes:
            shown = ", ".join(str(int(c)) for c in self.classes[:8]) + (", ..." if len(self.classes) > 8 else "")
            raise ValueError(f"--class {value}: not a class the flow was trained on (labels {shown}, or a synset "
                             f"such as {self.synsets[int(self.classes[0])]})")
        return label


def open_chain(cfg: Config, config_path: str, decoder: bool = False) -> Chain:
    """Load the encoder, the feature normalizer, the SRC and the flow (and the RAE decoder) of this config's done
    artifacts, with the loaders the stages use."""
    from pipeline.data.features import load_normalizer
    from stages.compress import cached_src
    from stages.encode import encoder_spec, load_encoder
    from stages.sample import ModelSources, load_models
    from storage_schemas.shards import MANIFEST_SCHEMA, read_table

    with progress(f"loading the models of {config_path}", 3, "parts") as meter:
        manifests = done_manifests(cfg, config_path)
        device = resolve_device(cfg.runtime.device)
        meter.advance()
        if decoder:
            upstream = {k: manifests[k] for k in ("train_flow", "fit_src", "encode", "fit_decoder") if k in manifests}
            flow, src, normalizer, rae_decoder = load_models(ModelSources(cfg, upstream, str(device)))
        else:
            flow, src = load_flow(manifests["train_flow"], device), cached_src(str(manifests["fit_src"].dir),
                                                                              str(device))
            normalizer = load_normalizer(manifests["encode"].dir / "features.zarr", cfg.encode.stats,
                                         cfg.encode.stats_file)
            rae_decoder = None
        meter.advance()
        encoder = load_encoder(encoder_spec(cfg), str(device))
        meter.advance()
    table = read_table(manifests["shard"].dir / "manifest.parquet", MANIFEST_SCHEMA).select(["synset", "label"])
    synsets = dict(sorted(zip(table["label"].to_pylist(), table["synset"].to_pylist(), strict=True)))
    info = flow_info(manifests["train_flow"])
    classes = np.asarray(info["classes"], np.int64)
    unknown = sorted(set(classes.tolist()) - set(synsets))
    if unknown:
        raise ValueError(f"{manifests['train_flow'].dir}: the flow was trained on labels {unknown[:5]} that the shard "
                         f"set does not have")
    return Chain(cfg, manifests, device, flow, src, normalizer, encoder, rae_decoder, classes, synsets,
                 float(info["noise_sigma"]))


# --- images -> codes ------------------------------------------------------------------------------


def list_images(paths: list[str | Path], max_images: int | None = None) -> list[Path]:
    """Image files among `paths` (a file, or a folder searched recursively, sorted; hidden entries skipped)."""
    found = []
    for path in map(Path, paths):
        if path.is_file():
            found.append(path)
        elif path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                            and not any(part.startswith(".") for part in p.relative_to(path).parts))
        else:
            raise FileNotFoundError(f"{path}: no such image file or folder")
    if max_images is not None and max_images < 1:
        raise ValueError(f"--max-images: {max_images} is not a positive count")
    return found[:max_images]


def load_crop(path: Path, resolution: int, decode: str = "pil", device: str | None = None) -> np.ndarray:
    """An image file -> the ADM center crop the pipeline encodes (via the JPEG bytes `shard` would store), by
    the store's decode path (`encode.decode`)."""
    try:
        jpeg, _ = prepare_image_bytes(Path(path).read_bytes())
    except RejectedImage as e:
        raise ValueError(f"{path}: not a decodable image ({e.reason})") from None
    return decode_crop(jpeg, resolution, decode, device)


def image_features(chain: Chain, crops: np.ndarray) -> np.ndarray:
    """uint8 crops (B, R, R, 3) -> the stored-dtype features encode writes for their plain view (numpy)."""
    from stages.encode import encode_pixels, stored_array

    cfg, out = chain.cfg, []
    for b0 in range(0, len(crops), cfg.encode.batch_size):
        pixels = torch.from_numpy(np.ascontiguousarray(crops[b0:b0 + cfg.encode.batch_size])).to(chain.device)
        out.append(stored_array(encode_pixels(chain.encoder, pixels, cfg.encoder.input_size, cfg.encode.precision,
                                              cfg.encode.dtype)))
    return np.concatenate(out)


def image_codes(chain: Chain, crops: np.ndarray) -> np.ndarray:
    """uint8 crops -> codes (B, T, d) float32, as compress stores them."""
    from stages.compress import encode_codes

    return encode_codes(chain.src, chain.normalizer, image_features(chain, crops), chain.cfg.compress.batch_size,
                        str(chain.device))


# --- likelihood ------------------------------------------------------------------------------------


def score_noise(seed: int, samples: int, shape: tuple[int, ...]) -> torch.Tensor:
    """eps_s (samples, 1, T, d), s seeded by (seed, s): the same draws for every image."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(step_seed(seed, s, NOISE_STREAM)))
                        for s in range(samples)])[:, None]


@torch.no_grad()
def score_codes(flow, codes: torch.Tensor, classes: np.ndarray, *, eps: torch.Tensor | None = None,
                sigma: float = 0.0, max_batch: int = 1024) -> dict[str, np.ndarray]:
    """Exact fp32 log-densities of codes (B, T, d): `log_probs` (B, K) for each of `classes`, `log_prob_uncond`
    (B,), and flow.class_posterior's figures (`predicted_class` is a label of `classes`). With eps (S, B or 1, T,
    d): each log p is the mean over the S draws c + sigma * eps_s."""
    device = next(flow.parameters()).device
    labels = torch.as_tensor(np.append(classes, flow.num_classes), dtype=torch.long, device=device)  # + the null label
    codes = codes.to(device, torch.float32)
    draws = [codes] if eps is None else [codes + sigma * e.to(device) for e in eps]
    lp = sum(flow.log_prob_classes(x, labels, max_batch).double() for x in draws) / len(draws)
    post = class_posterior(lp[:, :-1], lp[:, -1], codes[0].numel())
    out = {k: v.cpu().numpy() for k, v in post.items()}
    out["predicted_class"] = np.asarray(classes)[out.pop("predicted")]
    out["log_probs"] = lp[:, :-1].cpu().numpy()
    return out


def score_images(chain: Chain, paths: list[str | Path], *, max_images: int | None = None, noise_samples: int = 0,
                 batch_size: int = 64) -> tuple[list[dict], dict]:
    """One row per image file (FIELDS; an unreadable file is a row with `error`), and their summary."""
    if noise_samples < 0:
        raise ValueError(f"--noise-samples: {noise_samples} is negative")
    files = list_images(paths, max_images)
    if not files:
        raise FileNotFoundError(f"no image files in {', '.join(map(str, paths))} (extensions: "
                                f"{', '.join(sorted(IMAGE_EXTENSIONS))})")
    by_synset = {s: k for k, s in chain.synsets.items()}
    flow = chain.flow
    tokens, channels = flow.blocks[0].pos_embed.shape[0], flow.blocks[0].proj_in.in_features
    eps = score_noise(chain.cfg.train.seed, noise_samples, (tokens, channels)) if noise_samples else None
    rows = []
    with progress("score", len(files), "img") as meter:
        for b0 in range(0, len(files), batch_size):
            batch, crops = [], []
            for path in files[b0:b0 + batch_size]:
                synset = path.parent.name if path.parent.name in by_synset else None
                row = dict.fromkeys(FIELDS) | {"path": str(path), "true_synset": synset,
                                               "true_class": by_synset.get(synset)}
                try:
                    crops.append(load_crop(path, *chain.crop_args))
                    batch.append(row)
                except (ValueError, OSError) as e:
                    row["error"] = str(e)
                rows.append(row)
            if batch:
                codes = torch.from_numpy(image_codes(chain, np.stack(crops)))
                scored = score_codes(flow, codes, chain.classes, eps=eps, sigma=chain.noise_sigma,
                                     max_batch=chain.cfg.train.eval_batch_size)
                for i, row in enumerate(batch):
                    label = int(scored["predicted_class"][i])
                    row |= {"predicted_class": label, "predicted_synset": chain.synsets[label],
                            **{k: float(scored[k][i]) for k in ("posterior", "bits_per_dim", "bits_per_dim_marginal",
                                                                "bits_per_dim_uncond")}}
            meter.advance(len(files[b0:b0 + batch_size]))
    return rows, summarize(rows, noise_samples)


def summarize(rows: list[dict], noise_samples: int = 0) -> dict:
    """count, errors, mean and std of each figure; the accuracy over rows whose folder names their synset."""
    ok = [r for r in rows if r["error"] is None]
    out: dict = {"count": len(ok), "errors": len(rows) - len(ok),
                 "noise": f"mean over {noise_samples} draws c + sigma * eps" if noise_samples else "clean codes"}
    for key in ("posterior", "bits_per_dim", "bits_per_dim_marginal", "bits_per_dim_uncond"):
        values = np.array([r[key] for r in ok], np.float64)
        out[f"{key}_mean"] = float(values.mean()) if len(values) else None
        out[f"{key}_std"] = float(values.std()) if len(values) else None
    labelled = [r for r in ok if r["true_class"] is not None]
    out["labelled"] = len(labelled)
    out["accuracy"] = (sum(r["predicted_class"] == r["true_class"] for r in labelled) / len(labelled)
                       if labelled else None)
    return out


# --- the flow as a classifier, in `evaluate` -------------------------------------------------------


def flow_classifier(cfg: Config, upstream: dict[str, Manifest], max_images: int | None) -> dict:
    """Bayes-rule accuracy and mean bits/dim of the flow on the clean val codes (the first view of each val image)
    of the classes it was trained on (flow.json `classes`, the choices of the Bayes rule), at most `max_images` of
    them, class-balanced (round-robin over classes in store order)."""
    from pipeline.data.codes import open_codes, split_rows
    from stages.reference import class_balanced_order

    group, attrs = open_codes(upstream["compress"].dir / "codes.zarr")
    start, stop = split_rows(attrs, "val")
    views = len(attrs["views"])
    labels = group["labels"][start:stop:views].astype(np.int64)
    classes = np.asarray(flow_info(upstream["train_flow"])["classes"], np.int64)
    trained = np.flatnonzero(np.isin(labels, classes))
    picks = np.sort(trained[class_balanced_order([{"label": int(v)} for v in labels[trained]])[:max_images]])
    if not len(picks):
        return {"images": 0, "note": BAYES_NOTE}
    device = resolve_device(cfg.runtime.device)
    flow = load_flow(upstream["train_flow"], device)
    batch = max(1, cfg.train.eval_batch_size // len(classes))
    correct, figures = 0, {k: [] for k in ("posterior", "bits_per_dim", "bits_per_dim_marginal", "bits_per_dim_uncond")}
    for b0 in range(0, len(picks), batch):
        rows = start + picks[b0:b0 + batch] * views
        codes = torch.from_numpy(group["codes"].get_orthogonal_selection((rows,)))
        scored = score_codes(flow, codes, classes, max_batch=cfg.train.eval_batch_size)
        correct += int((scored["predicted_class"] == labels[picks[b0:b0 + batch]]).sum())
        for k, values in figures.items():
            values.append(scored[k])
    means = {k: float(np.concatenate(v).mean()) for k, v in figures.items()}
    return {"accuracy": correct / len(picks), "images": len(picks), "classes": len(classes),
            "split": "val", "view": attrs["views"][0], **{f"mean_{k}": v for k, v in means.items()}, "note": BAYES_NOTE}


# --- inversion ----------------------------------------------------------------------------------------


def _decode(chain: Chain, codes: torch.Tensor) -> np.ndarray:
    from stages.sample import decode

    pixels, _ = decode(codes.to(chain.device), chain.src, chain.normalizer, chain.decoder, chain.device,
                       chain.cfg.sample.pixel_rounding)
    return pixels


def _rae_reconstruction(chain: Chain, features: np.ndarray) -> np.ndarray:
    """The RAE decoder on the encoder's own (stored-dtype) features: what the SRC is measured against."""
    from pipeline.data.features import widen
    from pipeline.models.rae import to_uint8_pixels

    with torch.no_grad(), autocast(chain.device):
        out = chain.decoder(torch.from_numpy(widen(features)).to(chain.device))
    return to_uint8_pixels(out.float(), chain.cfg.sample.pixel_rounding, chain.decoder.pixel_mean,
                           chain.decoder.pixel_std).cpu().numpy()


def _classes_for(chain: Chain, codes: torch.Tensor, given: int | None) -> tuple[np.ndarray, np.ndarray | None]:
    """The class of each code: `given`, else the Bayes-rule class; and the posteriors (None when given)."""
    if given is not None:
        return np.full(len(codes), given), None
    scored = score_codes(chain.flow, codes, chain.classes, max_batch=chain.cfg.train.eval_batch_size)
    return scored["predicted_class"], scored["posterior"]


@torch.no_grad()
def round_trip(chain: Chain, codes: torch.Tensor, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """z = f(c | y) and c' = f^-1(z | y) (fp32, the KV-cache inverse, no guidance)."""
    y = torch.as_tensor(labels, dtype=torch.long, device=chain.device)
    z, _ = chain.flow(codes.to(chain.device, torch.float32), y)
    return z, chain.flow.reverse(z, y)


def invert(chain: Chain, images: list[str | Path], out_dir: str | Path, class_: str | int | None = None) -> dict:
    """Each image -> c -> z = f(c | y) -> c' -> pixels. Writes `<stem>.npz` (z, class, synset, source) per image and
    `invert-grid.png` (one row per image: original | RAE reconstruction | SRC reconstruction | flow round trip);
    reports max |c - c'| and the PSNR of decode(c') against decode(c)."""
    from stages.compress import encode_codes

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = [Path(p) for p in images]
    with progress("invert: codes, z and back, pixels", 3, "phases") as meter:
        crops = np.stack([load_crop(p, *chain.crop_args) for p in files])
        features = image_features(chain, crops)
        codes = torch.from_numpy(encode_codes(chain.src, chain.normalizer, features, chain.cfg.compress.batch_size,
                                              str(chain.device)))
        meter.advance()
        labels, posteriors = _classes_for(chain, codes, chain.class_of(class_))
        z, back = round_trip(chain, codes, labels)
        meter.advance()
        src_pixels, flow_pixels = _decode(chain, codes), _decode(chain, back)
        rae_pixels = _rae_reconstruction(chain, features)
        meter.advance()
    from stages.fit_src import resize_like

    originals = resize_like(crops, src_pixels.shape[1])
    grid = np.stack([im for i in range(len(files)) for im in (originals[i], rae_pixels[i], src_pixels[i],
                                                                flow_pixels[i])])
    grid_path = save_grid(grid, out_dir / "invert-grid.png", ncol=4)
    rows, used = [], set()
    for i, path in enumerate(files):
        name = path.stem if path.stem not in used else f"{path.stem}-{i}"
        used.add(name)
        label, db = int(labels[i]), psnr(flow_pixels[i], src_pixels[i])
        np.savez(out_dir / f"{name}.npz", z=z[i].cpu().numpy(), label=np.int64(label),
                 synset=np.array(chain.synsets[label]), source=np.array(str(path)))
        rows.append({"path": str(path), "class": label, "synset": chain.synsets[label],
                     "class_from": "given" if posteriors is None else "bayes",
                     "posterior": None if posteriors is None else float(posteriors[i]),
                     "max_abs_code_error": float((codes[i].to(back) - back[i]).abs().max()),
                     # None when decode(c') and decode(c) are the same pixels (an infinite PSNR is no JSON)
                     "psnr_round_trip_db": db if math.isfinite(db) else None, "identical_pixels": not math.isfinite(db),
                     "z_file": str(out_dir / f"{name}.npz")})
    finite = [r["psnr_round_trip_db"] for r in rows if r["psnr_round_trip_db"] is not None]
    return {"images": rows, "grid": str(grid_path), "grid_columns": ["original", "rae", "src", "flow_round_trip"],
            "max_abs_code_error": max(r["max_abs_code_error"] for r in rows),
            "min_psnr_round_trip_db": min(finite) if finite else None,
            "identical_pixels": sum(r["identical_pixels"] for r in rows)}


@torch.no_grad()
def interpolate(chain: Chain, image_a: str | Path, image_b: str | Path, out_dir: str | Path, steps: int = 8,
                class_: str | int | None = None) -> dict:
    """Invert both images under one class y (`class_`, else A's Bayes-rule class), slerp between their latents at
    `steps` points t = 0..1, invert each and decode: frame-000.png .. and interpolation.png (one row). The end
    frames are the two images' flow round trips."""
    if steps < 2:
        raise ValueError(f"--steps: {steps} is fewer than the 2 end points")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = [Path(image_a), Path(image_b)]
    with progress("interpolate: codes, z, frames, pixels", 4, "phases") as meter:
        codes = torch.from_numpy(image_codes(chain, np.stack([load_crop(p, *chain.crop_args) for p in files])))
        labels, posteriors = _classes_for(chain, codes, chain.class_of(class_))
        label = int(labels[0])
        meter.advance()
        z, _ = round_trip(chain, codes, np.full(2, label))
        meter.advance()
        ts = [i / (steps - 1) for i in range(steps)]
        zs = torch.stack([slerp(z[0], z[1], t) for t in ts])
        back = chain.flow.reverse(zs, torch.full((steps,), label, dtype=torch.long, device=chain.device))
        meter.advance()
        frames = _decode(chain, back)
        meter.advance()
    paths = [save_grid(frame[None], out_dir / f"frame-{i:03d}.png", ncol=1) for i, frame in enumerate(frames)]
    grid = save_grid(frames, out_dir / "interpolation.png", ncol=steps)
    a64, b64 = z[0].double().flatten(), z[1].double().flatten()
    angle = math.degrees(torch.arccos((a64 @ b64 / (a64.norm() * b64.norm())).clamp(-1, 1)).item())
    return {"images": [str(p) for p in files], "class": label, "synset": chain.synsets[label],
            "class_from": "given" if posteriors is None else "bayes (image A)", "steps": steps, "t": ts,
            "angle_degrees": angle, "frames": [str(p) for p in paths], "grid": str(grid),
            "max_abs_code_error_ends": float(max((codes[0].to(back) - back[0]).abs().max(),
                                                 (codes[1].to(back) - back[-1]).abs().max()))}
