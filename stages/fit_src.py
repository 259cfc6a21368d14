"""Stage `fit_src`: the Semantic Representation Compressor on the normalized RAE features
(SRC-FLOW.md, "The SRC" and "Constant-noise regularization").

    z = normalize(f)                  per-position RAE statistics (pipeline.data.features)
    PCA of every train token vector   float64 moments out of core with Dask over `features.zarr`
    src.kind pca:      SRC = projection onto the top d components, whitened; no training
    src.kind learned:  SRC initialised from that PCA, trained on
                       src_loss(z, SRC_dec(SRC_enc(z) + sigma * eps))        (constant noise, one sigma)
                       [+ w * MSE(RAE_dec(z_hat), RAE_dec(z)) through the frozen RAE decoder]
                       AdamW + EMA + warmup/cosine; checkpoints resume exactly (data position = step);
                       torchrun DDP at world size runtime.nproc x nodes (as train_flow), the codes normalized
                       by the global batch's statistics
    report:            held-out val images: feature MSE / cosine and pixel PSNR of the round trip, clean
                       and at sigma, always beside the PCA at the same d

Outputs: src.safetensors (EMA weights) + src.json (how to rebuild it: `load_src`), pca.safetensors,
explained_variance.json / .png, recon_grid.png; the report goes to the metrics (_SUCCESS.json).
The SRC works on normalized features; the RAE decoder takes stored-scale ones (normalizer.inverse).
"""

from __future__ import annotations

import functools
import io
import json
import logging
import shutil
from collections.abc import Callable
from contextlib import closing
from pathlib import Path

import numpy as np
import safetensors.torch
import torch

from pipeline import distributed
from pipeline.artifacts import StageOutput
from pipeline.config import Config, config_dict, validate_config
from pipeline.curves import Curves
from pipeline.data.features import (
    FeatureNormalizer,
    TrainFeatures,
    load_normalizer,
    open_features,
    read_features,
    widen,
)
from pipeline.data.shards import decode_crop, iter_jpegs, manifest_rows
from pipeline.device import autocast, resolve_device
from pipeline.images import grid_image, save_grid
from pipeline.integrity import array_damage, check_file
from pipeline.metrics.reconstruction import psnr_from_mse, sse
from pipeline.models.configured import src_arch
from pipeline.models.src import (
    SRC,
    PCAResult,
    add_code_noise,
    pca_from_moments,
    src_loss,
)
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
from stages.fit_decoder import load_decoder
from storage_schemas.model_files import model_info, read_model_info
from storage_schemas.success import Manifest, read_manifest, write_atomic
from storage_schemas.zarr_layouts import array_name

WEIGHTS, INFO, PCA_FILE = "src.safetensors", "src.json", "pca.safetensors"
WORKER = "stages.fit_src:train_worker"
PCA_BLOCK_BYTES = 64 << 20  # float64 bytes of one Dask block of the PCA pass
GRID_IMAGES = 8
# recon_grid.png's rows, written beside them: the image crop, RAE_dec(z), RAE_dec(SRC(z)) and
# RAE_dec(SRC_dec(SRC_enc(z) + sigma * eps)) (src.noise_sigma)
GRID_ROWS = ("image", "RAE", "RAE(SRC)", "RAE(SRC+noise)")
WINDOW_BATCHES = 64  # rows of a shuffle window, in batches (real scale: 16384 rows, 6.4 GB of fp16 features)

log = logging.getLogger("srcflow")


def run(cfg: Config, upstream: dict[str, Manifest], out: StageOutput) -> dict:
    store = upstream["encode"].dir / "features.zarr"
    group, attrs = open_features(store)
    normalizer = load_normalizer(store, cfg.encode.stats, cfg.encode.stats_file)
    device = resolve_device(cfg.runtime.device)
    train = tuple(attrs["splits"]["train"])

    pca = fit_pca(store, normalizer, train, out.path)
    explained = write_explained_variance(pca, cfg.src.dim, out.path)
    pca_src = SRC.from_pca(pca, dim=cfg.src.dim, num_tokens=group["features"].shape[1]).eval()

    if (out.path / WEIGHTS).is_file():  # a rerun after the weights were written (e.g. killed in the report)
        src = load_src(out.path, "cpu")
    elif cfg.src.kind == "pca":
        src = pca_src
        save_src(src, cfg, upstream, out.path)
    else:
        if distributed.job_size(cfg.runtime.nproc, cfg.train.torchrun_args)[1] > 1:
            payload = {"config": config_dict(cfg), "out": str(out.path), "fingerprint": out.fingerprint,
                       "upstream": {name: str(m.dir) for name, m in upstream.items()}}
            try:
                distributed.launch(WORKER, payload, cfg.runtime.nproc, out.path / "launch", device=cfg.runtime.device,
                                   torchrun_args=cfg.train.torchrun_args)
            except distributed.LaunchStopped as e:
                raise TrainingStopped(f"fit_src: {e}; the last checkpoint is kept, run again to resume") from None
        else:
            fit_learned(cfg, upstream, out, device)
        src = load_src(out.path, "cpu")
    shutil.rmtree(out.path / "checkpoints", ignore_errors=True)  # the weights are written: done with them

    report = reconstruction_report(cfg, upstream, group, attrs, normalizer, {"src": src, "pca": pca_src}, device,
                                   out.path)
    return {"kind": cfg.src.kind, "arch": src.arch, "dim": cfg.src.dim, "noise_sigma": cfg.src.noise_sigma,
            "decoder_noise_sigma": decoder_noise_sigma(cfg), "train_rows": train[1] - train[0],
            "pca_explained_variance_at_dim": explained, **report}


def decoder_noise_sigma(cfg: Config) -> float:
    """The code noise the SRC decoder was trained under: src.noise_sigma for a learned SRC, 0 for PCA (closed form,
    it never sees noise). `sample` decides its denoising from it (sample.denoise: auto)."""
    return cfg.src.noise_sigma if cfg.src.kind == "learned" else 0.0


# --- PCA (SRC-FLOW.md "Linear baseline": streaming covariance, closed form) ---------------------


def fit_pca(store: Path, normalizer: FeatureNormalizer, rows: tuple[int, int], out_dir: Path) -> PCAResult:
    """PCA of the normalized train token vectors; memory is independent of N: Dask streams blocks of rows
    from the store, each gives float64 sum and X^T X, and a tree reduction adds them. Saved to
    pca.safetensors (reused by a rerun of a partial output)."""
    path = out_dir / PCA_FILE
    if path.is_file():
        return load_pca(path)
    import dask
    import dask.array as da

    _, tokens, channels = da.from_zarr(str(store), component="features").shape
    n = rows[1] - rows[0]
    if n < 1:
        raise ValueError(f"fit_src: the feature store {store} has no train rows to fit the PCA on")
    block = max(1, PCA_BLOCK_BYTES // (tokens * channels * 8))
    features = da.from_zarr(str(store), component="features", chunks=(block, tokens, channels))[rows[0]:rows[1]]
    z = features.map_blocks(lambda b: normalizer(torch.from_numpy(widen(b))).double().numpy(), dtype=np.float64)
    x = z.reshape(n * tokens, channels)
    log.info("fit_src: PCA moments over %d token vectors of %d channels", n * tokens, channels)
    try:
        total, outer = dask.compute(x.sum(axis=0), x.T @ x)
    except ValueError as e:  # a chunk that fails its CRC-32C: the shard file named, the damage recorded
        raise array_damage(store, "features", e) from None
    pca = pca_from_moments(n * tokens, torch.from_numpy(total), torch.from_numpy(outer))
    tensors = {"mean": pca.mean, "eigenvalues": pca.eigenvalues, "components": pca.components,
               "explained_variance_ratio": pca.explained_variance_ratio}
    write_atomic(path, safetensors.torch.save(tensors, metadata={"count": str(n * tokens)}))
    return pca


def load_pca(path: Path) -> PCAResult:
    t = safetensors.torch.load_file(str(path))
    return PCAResult(t["mean"], t["eigenvalues"], t["components"], t["explained_variance_ratio"])


def write_explained_variance(pca: PCAResult, dim: int, out_dir: Path) -> float:
    """explained_variance.json (ratio and cumulative per component) and a PNG of the cumulative curve.
    Returns the fraction explained by the first `dim` components (the paper: 32 -> 99.06% on DINOv2-B)."""
    ratio = pca.explained_variance_ratio.double().numpy()
    cumulative = np.cumsum(ratio)
    first = lambda level: int(np.searchsorted(cumulative, level) + 1)  # noqa: E731  components to reach it
    summary = {"channels": len(ratio), "dim": dim, "cumulative_at_dim": float(cumulative[min(dim, len(ratio)) - 1]),
               "components_for": {str(level): first(level) for level in (0.9, 0.99, 0.999)},
               "ratio": ratio.tolist(), "cumulative": cumulative.tolist()}
    if len(ratio) >= 32:
        summary["cumulative_at_32"] = float(cumulative[31])
    write_atomic(out_dir / "explained_variance.json", json.dumps(summary, indent=1))

    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 3.5), dpi=120)
    fig.subplots_adjust(left=0.14, right=0.97, bottom=0.14, top=0.9)
    ax = fig.add_subplot()
    k = np.arange(1, len(ratio) + 1)
    ax.plot(k, cumulative, lw=1.5)
    ax.axvline(dim, color="C3", ls="--", lw=1, label=f"d = {dim}: {cumulative[dim - 1]:.2%}")
    ax.set(xscale="log", xlabel="principal components", ylabel="cumulative explained variance",
           title="PCA of the normalized RAE features", ylim=(min(cumulative[0], 0.9) * 0.98, 1.002))
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    write_atomic(out_dir / "explained_variance.png", buf.getvalue())
    return summary["cumulative_at_dim"]


# --- the learned SRC (SRC-FLOW.md "Learned SRC", "Constant-noise regularization") -----------------


def train_worker(payload: dict) -> None:
    """torchrun entry (pipeline.distributed, in the process group): train the learned SRC; rank 0 writes."""
    cfg = validate_config(payload["config"], source="fit_src launch payload")
    distributed.worker_logging(cfg.runtime.log_level, cfg.runtime.progress)
    upstream = {name: read_manifest(Path(d)) for name, d in payload["upstream"].items()}
    out = StageOutput("fit_src", payload["fingerprint"], Path(payload["out"]))
    fit_learned(cfg, upstream, out, resolve_device(cfg.runtime.device))


def fit_learned(cfg: Config, upstream: dict[str, Manifest], out: StageOutput, device: torch.device) -> None:
    """Train the learned SRC from the PCA in out.path (in one process, or in every torchrun worker, each on its
    share of the global batch); rank 0 calibrates the EMA model's code statistics and writes it (save_src)."""
    s = cfg.src
    store = upstream["encode"].dir / "features.zarr"
    group, attrs = open_features(store)
    normalizer = load_normalizer(store, cfg.encode.stats, cfg.encode.stats_file)
    train = tuple(attrs["splits"]["train"])
    decoder = load_decoder(cfg, upstream, device) if s.pixel_loss_weight > 0 else None
    data = TrainFeatures(group, train, normalizer, s.batch_size, s.seed, WINDOW_BATCHES, distributed.rank(),
                         distributed.world_size())
    grid_decoder = functools.cache(lambda: decoder if decoder is not None else load_decoder(cfg, upstream, device))
    held_out = normalizer(read_features(group, report_rows(group, attrs, s.eval_batch_size)[0]))
    ema = train_src(cfg, load_pca(out.path / PCA_FILE), data, decoder, normalizer, device, out, grid_decoder,
                    held_out)
    if distributed.rank() == 0:  # over the rows of the first window, as one process reads them
        whole = TrainFeatures(group, train, normalizer, s.batch_size, s.seed, WINDOW_BATCHES)
        save_src(calibrate_code_statistics(ema, whole, device), cfg, upstream, out.path)
    distributed.barrier()


def train_src(cfg: Config, pca: PCAResult, data: TrainFeatures, decoder, normalizer: FeatureNormalizer,
              device: torch.device, out: StageOutput, grid_decoder: Callable, held_out: torch.Tensor) -> SRC:
    """The training loop; returns the EMA model. The data order and the code noise are pure functions of
    (seed, step), the rest of the state is in the checkpoints: a resumed run equals an uninterrupted one.
    Under DDP each rank trains on its slice of the global batch (its rows, its rows of the global noise draw)
    and the codes are normalized with the global batch's statistics (distributed.global_moments), so W
    processes compute what one does, up to the order of float sums.
    `held_out`: normalized held-out features, whose reconstruction is logged as val/ at every log line."""
    s = cfg.src
    rank = distributed.rank()
    size = distributed.current_world_text(cfg.runtime.nproc, cfg.train.torchrun_args)
    seed_all(s.seed)
    model = SRC.from_pca(pca, dim=s.dim, num_tokens=data.features.shape[1], **src_arch(cfg)).to(device).train()
    model.batch_moments = distributed.global_moments
    ema = EMA(model, s.ema_decay)
    forward = distributed.data_parallel(model, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    scheduler = warmup_cosine(optimizer, min(s.warmup_steps, s.steps), s.steps)
    checkpoints = Checkpointer(out.path / "checkpoints", every=s.ckpt_every)
    step, _ = checkpoints.restore(model, ema, optimizer, scheduler)
    if step:
        log.info("fit_src: resumed at step %d from %s", step, checkpoints.latest())
    log.info("fit_src: %d train rows, batch %d, %s", data.schedule.n, s.batch_size, size)
    local = slice(rank * data.schedule.local_batch_size, (rank + 1) * data.schedule.local_batch_size)
    codes_shape = (s.batch_size, data.features.shape[1], s.dim)

    with StopSignal() as stop, progress("fit_src", s.steps, "steps", done=step) as meter, \
            Curves(out.path, step, images_per_step=s.batch_size, enabled=rank == 0) as curves, \
            closing(data.batches(range(step, s.steps))) as batches:  # the next batch assembled while one trains
        for z in batches:
            z = z.to(device, non_blocking=True)
            eps = code_noise(s.seed, step, codes_shape, device)[local] if s.noise_sigma else None
            with autocast(device):
                _, z_hat = forward(z, s.noise_sigma, eps=eps)
                loss, parts = src_loss(z, z_hat, s.cosine_weight)
                if decoder is not None:
                    parts["pixel"] = pixel_loss(decoder, normalizer, z, z_hat)
                    loss = loss + s.pixel_loss_weight * parts["pixel"]
            loss.backward()
            grad_norm = optimizer_step(optimizer, model.parameters(), s.grad_clip)
            scheduler.step()
            ema.update(model)
            step += 1
            meter.advance()
            if step % s.log_every == 0 or step == s.steps:
                values = {k: distributed.all_reduce_mean(v.detach()).item() for k, v in {"loss": loss, **parts}.items()}
                check_finite_loss(values["loss"], "fit_src", step, checkpoints)  # the global mean: every rank stops
                log.info("fit_src: step %d/%d %s", step, s.steps, " ".join(f"{k} {v:.4f}" for k, v in values.items()))
                curves.scalars(step, lr=scheduler.get_last_lr()[0], grad_norm=grad_norm.item(), **values)
                if rank == 0:
                    out.report_progress(step, s.steps, "steps")
                    curves.validation(step, **held_out_reconstruction(ema.module, held_out.to(device)))
            if (step % s.image_every == 0 or step == s.steps) and rank == 0:
                curves.image("reconstructions", step, reconstruction_grid(ema.module, grid_decoder(), normalizer,
                                                                           z[:GRID_IMAGES]))
            stopping = stop.agreed(device)  # a signal on any rank stops every rank at this step
            if checkpoints.due(step) or stopping:
                path = checkpoints.save(step, model, ema, optimizer, scheduler)
                if stopping:
                    raise TrainingStopped(f"fit_src: stopped by signal {stop.signum} at step {step}/{s.steps} "
                                          f"({size}); checkpoint {path} written, run again to resume")
        curves.write_loss_png("fit_src: feature loss")
    return ema.module


@torch.no_grad()
def calibrate_code_statistics(model: SRC, data: TrainFeatures, device: torch.device) -> SRC:
    """Set the EMA model's code_mean / code_scale to the exact per-channel statistics of its raw codes over
    the rows of the first shuffle window (as "precise BatchNorm"): training normalized with batch statistics
    and only tracked them with a slow momentum, so the eval-mode codes are unit-variance only after this."""
    if model.arch == "linear":
        return model
    count, total, total_sq = 0, 0.0, 0.0
    rows = min(data.schedule.n, data.schedule.window)
    with closing(data.batches(range(-(-rows // data.schedule.batch_size)))) as batches:
        for z in batches:
            raw = model.encode(z.to(device)) * model.code_scale + model.code_mean  # eval: (raw - m) / s
            raw = raw.double().reshape(-1, raw.shape[-1])
            count, total, total_sq = count + raw.shape[0], total + raw.sum(0), total_sq + raw.square().sum(0)
    mean = total / count
    var = (total_sq / count - mean.square()).clamp(min=0)
    model.code_mean.copy_(mean)
    model.code_scale.copy_((var + 1e-6).sqrt())  # as SRC.encode normalizes in training
    return model


def code_noise(seed: int, step: int, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """The code noise eps of the global batch at `step` (each rank keeps its rows): its own generator, so
    resuming needs nothing but the step."""
    generator = torch.Generator(device=device).manual_seed(step_seed(seed, step, bits=32))
    return torch.randn(shape, generator=generator, device=device)


@torch.no_grad()
def held_out_reconstruction(model: SRC, z: torch.Tensor) -> dict[str, float]:
    """The EMA SRC on held-out rows (eval mode, clean codes): feature MSE and per-token cosine of SRC_dec(SRC_enc(z))
    against z, as the report computes them."""
    z_hat = model.decode(model.encode(z)).float()
    return {"feature_mse": (z_hat - z).square().mean().item(),
            "feature_cosine": torch.nn.functional.cosine_similarity(z_hat, z, dim=-1).mean().item()}



@torch.no_grad()
def reconstruction_grid(model: SRC, decoder, normalizer: FeatureNormalizer, z: torch.Tensor) -> np.ndarray:
    """The training-curve grid: RAE_dec(z) (top) and RAE_dec(SRC_dec(SRC_enc(z))) of a few train rows."""
    return grid_image(np.concatenate([decode_pixels(decoder, normalizer, z),
                                      decode_pixels(decoder, normalizer, model.decode(model.encode(z)))]), ncol=len(z),
                      row_labels=list(GRID_ROWS[1:3]))


def pixel_loss(decoder, normalizer: FeatureNormalizer, z: torch.Tensor, z_hat: torch.Tensor) -> torch.Tensor:
    """MSE in (ImageNet-normalized) pixels between RAE_dec(z_hat) and RAE_dec(z), the decoder frozen in eval
    mode; the decoder reads stored-scale features, hence normalizer.inverse."""
    with torch.no_grad():
        target = decoder(normalizer.inverse(z))
    return (decoder(normalizer.inverse(z_hat)).float() - target.float()).square().mean()


# --- saving and loading the SRC ----------------------------------------------------------------


def save_src(src: SRC, cfg: Config, upstream: dict[str, Manifest], out_dir: Path) -> None:
    info = model_info("src", kind=cfg.src.kind, arch=src.arch, dim=cfg.src.dim, noise_sigma=cfg.src.noise_sigma,
                      decoder_noise_sigma=decoder_noise_sigma(cfg), model=src.config,
                      features_fingerprint=upstream["encode"].fingerprint)
    save_safetensors(src, out_dir / WEIGHTS, metadata={"src": info})
    write_atomic(out_dir / INFO, info)


def load_src(source, device: torch.device | str = "cpu") -> SRC:
    """The frozen SRC of a fit_src output: its Manifest or directory -> SRC in eval mode on `device`."""
    directory = Path(getattr(source, "dir", source))
    check_file(directory / INFO)  # its bytes against the output's record
    model = SRC(**read_model_info(directory, "src")["model"])
    load_safetensors(model, directory / WEIGHTS)
    return model.to(device).eval().requires_grad_(False)


# --- the reconstruction report (SRC-FLOW.md "Report reconstruction fidelity") -----------------------


def reconstruction_report(cfg: Config, upstream: dict[str, Manifest], group, attrs: dict, normalizer: FeatureNormalizer,
                          models: dict[str, SRC], device: torch.device, out_dir: Path) -> dict:
    """For each model (the SRC, and the PCA at the same d): feature MSE and per-token cosine of z vs
    SRC_dec(SRC_enc(z)), pixel PSNR of RAE_dec(SRC(z)) vs RAE_dec(z) and vs the image crop, clean and with
    codes + sigma * eps (the same eps for every model). Writes recon_grid.png."""
    rows, split = report_rows(group, attrs, cfg.src.report_images)
    keys = group[array_name(group, "key")].get_coordinate_selection(rows)
    views = group["view"].get_coordinate_selection(rows)
    images = load_images(upstream["shard"].dir, keys, views, cfg.data.resolution)
    decoder = load_decoder(cfg, upstream, device)
    models = {name: m.to(device).eval() for name, m in models.items()}
    sigma, batch_size = cfg.src.noise_sigma, cfg.src.eval_batch_size
    sums: dict[str, float] = {}
    grid: dict[str, list[np.ndarray]] = {}
    grid_at = np.linspace(0, len(rows) - 1, min(GRID_IMAGES, len(rows))).round().astype(np.int64)

    def add(key: str, value: float) -> None:
        sums[key] = sums.get(key, 0.0) + value

    with torch.inference_mode(), progress("fit_src report", len(rows), "images") as meter:
        for b0 in range(0, len(rows), batch_size):
            z = normalizer(read_features(group, rows[b0:b0 + batch_size])).to(device)
            image = images[b0:b0 + len(z)]
            decoded = decode_pixels(decoder, normalizer, z)
            image = resize_like(image, decoded.shape[1])
            add("pixels", image.size)
            add("rae_sse_vs_image", sse(decoded, image))
            pieces = {"image": image, "rae": decoded}
            for name, model in models.items():
                c = model.encode(z)
                noise = torch.Generator(device=device).manual_seed(cfg.src.seed * 7919 + b0)  # same eps per model
                for variant, codes in (("", c), ("noisy_", add_code_noise(c, sigma, noise))):
                    z_hat = model.decode(codes)
                    pixels = decode_pixels(decoder, normalizer, z_hat)
                    add(f"{name}/{variant}feature_se", (z_hat - z).double().square().sum().item())
                    add(f"{name}/{variant}cosine_sum", torch.nn.functional.cosine_similarity(
                        z_hat, z, dim=-1).double().sum().item())
                    add(f"{name}/{variant}sse_vs_rae", sse(pixels, decoded))
                    add(f"{name}/{variant}sse_vs_image", sse(pixels, image))
                    pieces[f"{name}/{variant or 'clean_'}"] = pixels
            add("values", z.numel())
            add("tokens", z.shape[0] * z.shape[1])
            shown = np.flatnonzero(np.isin(np.arange(b0, b0 + len(z)), grid_at))  # GRID_IMAGES spread over the rows
            for k, v in pieces.items():
                grid.setdefault(k, []).append(v[shown])
            meter.advance(len(z))

    to_psnr = lambda total: psnr_from_mse(total / sums["pixels"])  # noqa: E731
    report = {"report_split": split, "report_images": len(rows), "rae_psnr_vs_image": to_psnr(sums["rae_sse_vs_image"])}
    for name in models:
        for variant in ("", "noisy_"):
            report[f"{name}/{variant}feature_mse"] = sums[f"{name}/{variant}feature_se"] / sums["values"]
            report[f"{name}/{variant}feature_cosine"] = sums[f"{name}/{variant}cosine_sum"] / sums["tokens"]
            report[f"{name}/{variant}psnr_vs_rae"] = to_psnr(sums[f"{name}/{variant}sse_vs_rae"])
            report[f"{name}/{variant}psnr_vs_image"] = to_psnr(sums[f"{name}/{variant}sse_vs_image"])
    rows_of_grid = [np.concatenate(grid[k]) for k in ("image", "rae", "src/clean_", "src/noisy_")]
    save_grid(np.concatenate(rows_of_grid), out_dir / "recon_grid.png", ncol=len(rows_of_grid[0]),
              row_labels=list(GRID_ROWS))
    return report


def report_rows(group, attrs: dict, limit: int) -> tuple[np.ndarray, str]:
    """Up to `limit` held-out rows spread evenly over the split (which is in class order), one view per
    image (the first stored view); train rows when the store has no val split."""
    split = "val" if attrs["splits"]["val"][1] > attrs["splits"]["val"][0] else "train"
    start, stop = attrs["splits"][split]
    views = group["view"][start:stop]
    rows = start + np.flatnonzero(views == views[0])
    if len(rows) > limit:
        rows = rows[np.linspace(0, len(rows) - 1, limit).round().astype(np.int64)]
    return rows.astype(np.int64), split


def load_images(shard_dir: Path, keys: np.ndarray, views: np.ndarray, resolution: int) -> np.ndarray:
    """ADM center crops (uint8, N x R x R x 3) of these images from the shard set, flipped for view 1."""
    manifest = {r["key"]: r for r in manifest_rows(shard_dir)}
    wanted = {k: manifest[k]["sha256"] for k in keys.tolist()}
    jpegs = dict(iter_jpegs(sorted({str(Path(shard_dir) / "shards" / manifest[k]["shard"]) for k in wanted}), wanted))
    crops = [decode_crop(jpegs[k], resolution) for k in keys]
    return np.stack([c[:, ::-1] if v == 1 else c for c, v in zip(crops, views, strict=True)])


def decode_pixels(decoder, normalizer: FeatureNormalizer, z: torch.Tensor) -> np.ndarray:
    from pipeline.models.rae import to_uint8_pixels

    return to_uint8_pixels(decoder(normalizer.inverse(z)), mean=decoder.pixel_mean, std=decoder.pixel_std).cpu().numpy()


def resize_like(images: np.ndarray, size: int) -> np.ndarray:
    """Crops at the decoder's output size (only differs in tests: 32 px data through a 64 px decoder)."""
    if images.shape[1] == size:
        return images
    from PIL import Image

    return np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BICUBIC)) for im in images])
