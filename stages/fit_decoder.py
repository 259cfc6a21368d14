"""Stage `fit_decoder`: train the RAE decoder on (features, images) when no released decoder is given.

    features.zarr train rows (both views)  +  the same images' ADM center crops (mirrored for a flipped row)
    (augment: resize_random_crop -- RAE's fresh crop of each image every step, encoded by the frozen encoder)
      -> RAE decoder, L1 on [0, 1] pixels (+ LPIPS), on z + s*eps, s ~ tau*U(0, 1) per sample
      -> decoder.safetensors (EMA weights), decoder.json (arch), recon_grid.png, psnr_val / l1_val

(SRC-FLOW.md "RAE", decoder training, as bytetriper/RAE src/train_stage1.py with
configs/stage1/training/DINOv2-B_decXL.yaml: AdamW betas (0.9, 0.95), no gradient clipping, warmup +
cosine to a floor, EMA 0.9978; the GAN term (from epoch 8 of 16 there) is left out.)
The data position is the step (BatchSchedule over the train rows) and the noise (and crops) of a step are a
function of (seed, step), so a run resumed from a checkpoint replays exactly what an uninterrupted run would have done.
Pixels stream: each batch's JPEGs are read by offset from the shard tars and decoded in threads, with the
feature rows read alongside, while the previous step trains; memory is bounded by the batch (plus 16 bytes
a row of JPEG locations), whatever the dataset size. A set that fits in `fit_decoder.memory_mb` (the smoke
set) is read once and held in memory instead; the batches are the same either way.

Also where every later stage gets "the RAE decoder" from: the released checkpoint named by
`decoder.weights`, or this stage's EMA weights (`decoder.safetensors`).
"""

from __future__ import annotations

import io
import json
import logging
import shutil
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from pathlib import Path

import numpy as np
import torch

from pipeline.artifacts import StageOutput
from pipeline.config import Config
from pipeline.curves import Curves
from pipeline.data.batches import BatchSchedule
from pipeline.data.features import open_features, read_features
from pipeline.data.read_ahead import read_ahead
from pipeline.data.shards import decode_crop, decode_random_crop, jpeg_members, manifest_rows, read_jpeg
from pipeline.device import autocast, inference_precision, resolve_device
from pipeline.images import grid_image, save_grid
from pipeline.integrity import read_input
from pipeline.metrics.reconstruction import mean_image_sse, psnr_from_mse
from pipeline.models.configured import decoder_arch, pixel_norm
from pipeline.progress import progress
from pipeline.training import (
    EMA,
    Checkpointer,
    StopSignal,
    TrainingStopped,
    check_finite_loss,
    load_safetensors,
    optimizer_step,
    save_safetensors,
    seed_all,
    step_seed,
    warmup_cosine,
)
from stages.encode import encoder_spec, load_encoder
from storage_schemas.model_files import model_info
from storage_schemas.success import Manifest, write_atomic
from storage_schemas.zarr_layouts import array_name

WEIGHTS = "decoder.safetensors"
ARCH = "decoder.json"
GRID = "recon_grid.png"
GRID_COLUMNS = 8
GRID_ROWS = ["image", "decoder"]  # the grids' rows: held-out crops, the decoder's reconstruction of their features
PREFETCH = 2  # batches loaded ahead of the step that trains

log = logging.getLogger("srcflow")


def run(cfg: Config, upstream: dict[str, Manifest], out: StageOutput) -> dict:
    from pipeline.models.rae import (  # imports timm: only when run
        build_rae_decoder,
        to_unit_pixels,
    )

    fd, resolution = cfg.fit_decoder, cfg.data.resolution
    device = resolve_device(cfg.runtime.device)
    arch = decoder_arch(cfg)
    lpips = load_lpips(fd.lpips_weights, device)  # a bad LPIPS setting fails here, before any work
    group, attrs = open_features(upstream["encode"].dir / "features.zarr")
    train = range(*attrs["splits"]["train"])
    if len(train) < fd.batch_size:
        raise ValueError(f"fit_decoder.batch_size: {fd.batch_size} is larger than the {len(train)} train rows of "
                         f"features.zarr")
    pairs = PairSource(group, upstream["shard"].dir, resolution, fd.loader_threads)
    augment = fd.augment == "resize_random_crop"
    encoder = load_encoder(encoder_spec(cfg), str(device)) if augment else None  # frozen, as `encode` runs it
    if not augment and pairs.hold(train, fd.memory_mb << 20):
        log.info("fit_decoder: the %d train pairs are held in memory", len(train))

    seed_all(fd.seed)
    model = build_rae_decoder(None, seed=fd.seed, **arch).to(device).train()
    ema = EMA(model, fd.ema_decay)
    # RAE yaml training.optimizer: AdamW betas [0.9, 0.95]; training.clip_grad 0.0: no clipping (grad_clip None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=fd.lr, betas=(0.9, 0.95), weight_decay=fd.weight_decay)
    scheduler = lr_schedule(optimizer, fd)
    batches = BatchSchedule(len(train), fd.batch_size, fd.seed)
    checkpoints = Checkpointer(out.path / "checkpoints", every=fd.ckpt_every, keep=1)
    step, extra = checkpoints.restore(model, ema, optimizer, scheduler)  # 0, {} on a fresh run
    losses: list[float] = list(extra.get("l1", []))  # per-step train L1, for the metrics
    noise = torch.Generator(device)
    if step:
        log.info("fit_decoder: resuming at step %d/%d from %s", step, fd.steps, checkpoints.latest())
    grid_rows = held_out_rows(group, attrs, GRID_COLUMNS)  # the images of the training-curve grids
    shown = pairs(grid_rows) if len(grid_rows) else None
    val_rows = held_out_rows(group, attrs, fd.eval_batch_size)  # val/ scalars at every log line
    held_out = pairs(val_rows) if len(val_rows) else None

    def load(s: int):
        """The batch of step s: RAE crops (the features are computed in the loop), or stored features and crops."""
        rows = train.start + batches.indices(s)
        return (None, pairs.random_crops(rows, (fd.seed, s, 1))) if augment else pairs(rows)

    with StopSignal() as stop, progress("fit_decoder", fd.steps, "steps", done=step) as bar, \
            Curves(out.path, step, images_per_step=fd.batch_size) as curves, \
            closing(read_ahead(load, range(step, fd.steps), PREFETCH)) as stream:
        for features, crops in stream:
            pixels = torch.from_numpy(crops).to(device)
            if features is None:
                features = encode_crops(encoder, pixels, cfg)
            target = unit_pixels(pixels)
            z, _ = noise_augment(features.to(device), fd.noise_tau, noise.manual_seed(step_seed(fd.seed, step)))
            with autocast(device):
                recon = to_unit_pixels(model(z), *pixel_norm(cfg))  # [0, 1], unclamped, as RAE's decode returns
            l1 = (recon - target).abs().mean()  # RAE: (recon - images).abs().mean(), images in [0, 1]
            # RAE: LPIPS on [-1, 1] (images * 2 - 1), weight gan.loss.perceptual_weight 1.0 from lpips_start 0
            loss = l1 if lpips is None else l1 + fd.lpips_weight * lpips(recon * 2 - 1, target * 2 - 1).mean()
            loss.backward()
            grad_norm = optimizer_step(optimizer, model.parameters(), fd.grad_clip)
            scheduler.step()
            ema.update(model)
            step += 1
            losses.append(l1.item())
            check_finite_loss(losses[-1], "fit_decoder", step, checkpoints)
            bar.advance()
            if step % fd.log_every == 0 or step == fd.steps:
                curves.scalars(step, loss=loss.item(), l1=l1.item(), lr=scheduler.get_last_lr()[0],
                               grad_norm=grad_norm.item())
                if held_out is not None:
                    curves.validation(step, **held_out_reconstruction(ema.module, *held_out, device))
            if (step % fd.image_every == 0 or step == fd.steps) and shown is not None:
                curves.image("reconstructions", step, reconstruction_grid(ema.module, *shown, device))
            if checkpoints.due(step) or step == fd.steps or stop.agreed(device):
                checkpoints.save(step, model, ema, optimizer, scheduler, extra={"l1": losses})
                out.report_progress(step, fd.steps, "steps")
                log.info("fit_decoder: step %d/%d, train L1 %.4f", step, fd.steps, np.mean(losses[-fd.ckpt_every:]))
                if stop.requested:
                    raise TrainingStopped(f"fit_decoder: stopped by signal {stop.signum} at step {step}/{fd.steps}; "
                                          f"checkpoint saved in {checkpoints.directory}, run again to resume")
        curves.write_loss_png("fit_decoder: L1 (+ LPIPS) on [0, 1] pixels")

    metrics, originals, recons = report(ema.module, pairs, held_out_rows(group, attrs, fd.report_images), cfg, device)
    pairs.close()
    save_safetensors(ema.module, out.path / WEIGHTS, metadata={"arch": json.dumps(arch)})  # one key: stable bytes
    write_atomic(out.path / ARCH, model_info("decoder", arch=arch, weights=WEIGHTS, steps=fd.steps,
                                             pixels="ImageNet-normalized (B, 3, R, R); to_uint8_pixels"))
    if len(originals):
        save_grid(np.concatenate([originals, recons]), out.path / GRID, ncol=len(originals), row_labels=GRID_ROWS)
    shutil.rmtree(checkpoints.directory, ignore_errors=True)  # the weights are written: the output keeps none
    head = max(1, len(losses) // 10)
    return {"steps": fd.steps, **metrics,
            "l1_train_first": float(np.mean(losses[:head])), "l1_train_last": float(np.mean(losses[-head:]))}


# --- RAE decoder training pieces ----------------------------------------------------------------


def noise_augment(features: torch.Tensor, tau: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """RAE's decoder noise augmentation: z + s * eps, eps ~ N(0, I), one s ~ tau * U(0, 1) per sample, on the
    LayerNormed features (before any per-position normalization). Returns (noisy features, s)."""
    s = tau * torch.rand(features.shape[0], generator=generator, device=features.device)
    eps = torch.randn(features.shape, generator=generator, device=features.device)
    return features + s.view(-1, 1, 1) * eps, s


def lr_schedule(optimizer: torch.optim.Optimizer, fd) -> torch.optim.lr_scheduler.LambdaLR:
    """RAE's (utils/optim_utils.py build_scheduler, type cosine, warmup_from_zero): (s + 1) / warmup during the
    warmup, then cosine from lr down to final_lr at `steps`, final_lr after; or a constant lr."""
    if fd.lr_schedule == "cosine":
        return warmup_cosine(optimizer, warmup_steps(fd), fd.steps, min_ratio=fd.final_lr / fd.lr)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


def warmup_steps(fd) -> int:
    """fit_decoder.warmup_steps, or RAE's 1 epoch of 16: steps // 16."""
    return fd.steps // 16 if fd.warmup_steps is None else fd.warmup_steps


def unit_pixels(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [0, 1], RAE's ToTensor() image and its L1 target."""
    return images_uint8.permute(0, 3, 1, 2).float() / 255.0


def encode_crops(encoder, pixels: torch.Tensor, cfg: Config) -> torch.Tensor:
    """The frozen encoder on uint8 crops (B, R, R, 3), as `encode` computes a row: encode.precision, then
    rounded to encode.dtype (what the decoder meets in features.zarr), as float32."""
    from pipeline.models.rae import to_encoder_input

    dtype = torch.bfloat16 if cfg.encode.dtype == "bfloat16" else torch.float16
    with torch.no_grad(), inference_precision(pixels.device, cfg.encode.precision):
        features = encoder(to_encoder_input(pixels, cfg.encoder.input_size, mean=encoder.pixel_mean,
                                            std=encoder.pixel_std))
    return features.to(dtype).float()


def load_lpips(path: str | None, device: torch.device):
    """LPIPS-VGG (Zhang et al. 2018) from a local state dict holding the VGG16 backbone and the linear
    layers, frozen; None when no file is given. Never downloads."""
    if path is None:
        return None
    if not Path(path).is_file():
        raise FileNotFoundError(f"fit_decoder.lpips_weights: {path} does not exist (expected a local LPIPS-VGG "
                                f"state dict, VGG16 backbone and linear layers)")
    try:
        import lpips
    except ImportError:
        raise RuntimeError("fit_decoder.lpips_weights: LPIPS is not available here (the `lpips` package is not "
                           "installed); set fit_decoder.lpips_weights: null to train with L1 only") from None
    net = lpips.LPIPS(net="vgg", pretrained=False, pnet_rand=True, verbose=False)  # random VGG: no download
    data = read_input(path, "fit_decoder.lpips_weights")  # checked against the sha256 the fingerprint holds
    state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    missing, unexpected = net.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("scaling_layer.")]  # constants, not always saved
    if missing or unexpected:
        raise ValueError(f"fit_decoder.lpips_weights: {path} does not fit lpips.LPIPS(net='vgg'): {len(missing)} "
                         f"keys missing, {len(unexpected)} unexpected (e.g. {(missing + unexpected)[:2]}); it must "
                         f"hold the VGG16 backbone and the linear layers")
    return net.to(device).eval().requires_grad_(False)


# --- data: (features, image crop) pairs, streamed ------------------------------------------------


class PairSource:
    """`pairs(rows)` -> (features (B, T, C) float32, ADM center crops (B, R, R, 3) uint8) for feature-store
    rows: the features as stored, and the image's JPEG read by offset from its shard tar, cropped at
    `resolution` and mirrored for a flipped-view row. The features are read while the JPEGs decode, in
    threads. `hold(rows)` keeps a small set in memory; other rows stream from the store and the tars."""

    def __init__(self, group, shard_dir: Path, resolution: int, threads: int):
        self.group, self.resolution = group, resolution
        self.pool = ThreadPoolExecutor(max(1, threads))
        self.tars = sorted(str(t) for t in (Path(shard_dir) / "shards").glob("*.tar"))
        self.tar, self.offset, self.size, self.sha256 = jpeg_locations(group[array_name(group, "key")], shard_dir,
                                                                       self.tars, self.pool)
        self.view = group["view"][:]
        self.held: tuple[range, torch.Tensor, np.ndarray] | None = None

    def hold(self, rows: range, budget_bytes: int) -> bool:
        """Keep these rows in memory if their features (float32) and crops fit in budget_bytes."""
        tokens, channels = self.group["features"].shape[1:]
        if len(rows) * (tokens * channels * 4 + self.resolution ** 2 * 3) > budget_bytes:
            return False
        self.held = (rows, *self.read(np.arange(rows.start, rows.stop)))
        return True

    def __call__(self, rows: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
        rows = np.asarray(rows)
        if self.held is not None and len(rows) and rows.min() >= self.held[0].start and rows.max() < self.held[0].stop:
            held, features, crops = self.held
            index = rows - held.start
            return features[torch.from_numpy(index)], crops[index]
        return self.read(rows)

    def read(self, rows: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
        order = np.argsort(rows, kind="stable")  # Zarr reads sorted rows faster
        contiguous = len(rows) > 0 and rows[order[-1]] - rows[order[0]] == len(rows) - 1
        selection = slice(int(rows[order[0]]), int(rows[order[-1]]) + 1) if contiguous else rows[order]
        features = self.pool.submit(read_features, self.group, selection)
        located = list(zip(self.tar[rows], self.offset[rows], self.size[rows], map(bytes, self.sha256[rows]),
                           strict=True))
        jpegs = list(dict.fromkeys(located))  # both views of an image: one decode
        decoded = dict(zip(jpegs, self.pool.map(self.crop, jpegs), strict=True))
        crops = np.stack([decoded[j][:, ::-1] if v == 1 else decoded[j]  # view 1 was encoded from the mirrored image
                          for j, v in zip(located, self.view[rows], strict=True)])
        return features.result()[torch.from_numpy(np.argsort(order))], crops

    def random_crops(self, rows: np.ndarray, seed) -> np.ndarray:
        """RAE's training crops (B, R, R, 3) of these rows' images, mirrored for a flipped-view row; the crop
        positions are drawn from `seed` (one per row, in row order; the stage passes (seed, step, 1)), so a
        step's crops are a function of (seed, step) and resume needs no RNG state."""
        rows = np.asarray(rows)
        positions = np.random.default_rng(seed).random((len(rows), 2))
        jpegs = zip(self.tar[rows], self.offset[rows], self.size[rows], map(bytes, self.sha256[rows]), strict=True)
        crops = self.pool.map(lambda job: decode_random_crop(self.jpeg(job[0]), self.resolution, job[1]),
                              zip(jpegs, positions, strict=True))
        return np.stack([c[:, ::-1] if v == 1 else c for c, v in zip(crops, self.view[rows], strict=True)])

    def crop(self, jpeg: tuple[int, int, int, bytes]) -> np.ndarray:
        return decode_crop(self.jpeg(jpeg), self.resolution)

    def jpeg(self, location: tuple[int, int, int, bytes]) -> bytes:
        """The JPEG at (tar, offset, size), checked against its manifest sha256 (raw digest bytes)."""
        tar, offset, size, sha256 = location
        return read_jpeg(self.tars[tar], f"at byte {offset}", (offset, size), sha256.hex())

    def close(self) -> None:
        self.pool.shutdown()


def jpeg_locations(keys, shard_dir: Path, tars: list[str], pool: ThreadPoolExecutor,
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per store row, where its image's JPEG lies: (tar index, byte offset, size), found from the tar headers
    alone (pipeline.data.shards.jpeg_members, the rule encode reads by), so a batch of rows in any order is a batch
    of random reads; and its sha256 in the manifest, which every read is checked against. 48 bytes a row."""
    where: dict[str, tuple[int, int, int]] = {}
    for i, members in enumerate(pool.map(jpeg_members, tars)):
        where.update((key, (i, offset, size)) for key, (offset, size) in members.items())
    digests = {r["key"]: r["sha256"] for r in manifest_rows(shard_dir)}
    n = keys.shape[0]
    tar, offset, size = np.empty(n, np.int32), np.empty(n, np.int64), np.empty(n, np.int32)
    sha256 = np.empty((n, 32), np.uint8)
    for lo in range(0, n, 1 << 16):  # keys in blocks: memory stays small whatever n is
        for row, key in enumerate(keys[lo:lo + (1 << 16)], start=lo):
            try:
                tar[row], offset[row], size[row] = where[str(key)]
                sha256[row] = np.frombuffer(bytes.fromhex(digests[str(key)]), np.uint8)
            except KeyError:
                raise FileNotFoundError(f"fit_decoder: image {key!r} of features.zarr is not in the shard set; the "
                                        f"shard set does not match the store, rerun `shard` and `encode` with "
                                        f"--force") from None
    return tar, offset, size, sha256


# --- the report on held-out images ---------------------------------------------------------------


def held_out_rows(group, attrs: dict, limit: int | None) -> np.ndarray:
    """The first `limit` val images, plain view (the val split's rows with view 0)."""
    lo, hi = attrs["splits"]["val"]
    rows = np.arange(lo, hi)[group["view"][lo:hi] == 0]
    return rows if limit is None else rows[:limit]


@torch.inference_mode()
def report(decoder, pairs: PairSource, rows: np.ndarray, cfg: Config, device: torch.device,
           ) -> tuple[dict, np.ndarray, np.ndarray]:
    """The decoder on clean (un-noised) held-out features against the image crops: PSNR (uint8 pixels, MSE
    over the whole set), L1 ([0, 1] pixels, as the training loss), and the PSNR of the trivial baseline that predicts
    the held-out set's own mean image. Also GRID_COLUMNS images spread over the set and their reconstructions."""
    from pipeline.models.rae import to_uint8_pixels, to_unit_pixels

    if len(rows) == 0:
        log.warning("fit_decoder: no val images in features.zarr: no psnr_val, l1_val or grid")
        return {"psnr_val": None, "l1_val": None, "psnr_val_mean_image": None, "report_images": 0}, [], []
    r = cfg.data.resolution
    sse = l1 = 0.0
    total, total_sq = np.zeros((r, r, 3)), np.zeros((r, r, 3))
    originals, recons = [], []
    # spread over the set: val is class-ordered
    grid = set(np.linspace(0, len(rows) - 1, min(GRID_COLUMNS, len(rows))).round().astype(int).tolist())
    with progress("fit_decoder report", len(rows), "img") as bar:
        for b0 in range(0, len(rows), cfg.fit_decoder.eval_batch_size):
            features, crops = pairs(rows[b0:b0 + cfg.fit_decoder.eval_batch_size])
            with autocast(device):
                recon = decoder(features.to(device)).float()
            l1 += (to_unit_pixels(recon, decoder.pixel_mean, decoder.pixel_std)
                   - unit_pixels(torch.from_numpy(crops).to(device))).abs().sum().item()
            pixels = to_uint8_pixels(recon, mean=decoder.pixel_mean, std=decoder.pixel_std).cpu().numpy()
            truth = crops.astype(np.float64)
            sse += np.square(pixels - truth).sum()
            total += truth.sum(0)
            total_sq += np.square(truth).sum(0)
            shown = [i for i in range(len(crops)) if b0 + i in grid]
            originals += list(crops[shown])
            recons += list(pixels[shown])
            bar.advance(len(crops))
    values = len(rows) * r * r * 3
    return {"psnr_val": psnr_from_mse(sse / values), "l1_val": l1 / values,
            "psnr_val_mean_image": psnr_from_mse(mean_image_sse(total, total_sq, len(rows)) / values),
            "report_images": len(rows)}, np.stack(originals), np.stack(recons)


@torch.no_grad()
def held_out_reconstruction(decoder, features: torch.Tensor, crops: np.ndarray, device: torch.device) -> dict:
    """The EMA decoder on clean held-out features: L1 on [0, 1] pixels (the training loss) and PSNR (uint8 pixels)
    against the image crops, as the report computes them."""
    from pipeline.models.rae import to_uint8_pixels, to_unit_pixels

    with autocast(device):
        recon = decoder(features.to(device)).float()
    l1 = (to_unit_pixels(recon) - unit_pixels(torch.from_numpy(crops).to(device))).abs().mean().item()
    pixels = to_uint8_pixels(recon).cpu().numpy().astype(np.float64)
    return {"l1": l1, "psnr": psnr_from_mse(float(np.square(pixels - crops).mean()))}


@torch.no_grad()
def reconstruction_grid(decoder, features: torch.Tensor, crops: np.ndarray, device: torch.device) -> np.ndarray:
    """The training-curve grid: the images (top) and the decoder's reconstructions of their clean features."""
    from pipeline.models.rae import to_uint8_pixels

    with autocast(device):
        recon = to_uint8_pixels(decoder(features.to(device)).float(), mean=decoder.pixel_mean, std=decoder.pixel_std)
    recon = recon.cpu().numpy()
    return grid_image(np.concatenate([crops, recon]), ncol=len(crops), row_labels=GRID_ROWS)


# --- what other stages use -------------------------------------------------------------------------


def load_decoder(cfg: Config, upstream: dict[str, Manifest], device: torch.device | str = "cpu"):
    """The frozen RAE decoder: released weights, or the EMA weights fit_decoder trained."""
    from pipeline.models.rae import build_rae_decoder
    from pipeline.models.rae_family import weights_file

    if cfg.decoder.weights is not None:  # read once (a folder's safetensors), checked against the fingerprint's sha256
        data = read_input(weights_file(cfg.decoder.weights, "decoder.weights"), "decoder.weights")
        decoder = build_rae_decoder(cfg.decoder.weights, data=data, **decoder_arch(cfg))
    else:
        decoder = build_rae_decoder(None, **decoder_arch(cfg))
        load_safetensors(decoder, upstream["fit_decoder"].dir / WEIGHTS)
    return decoder.to(device).eval().requires_grad_(False)
