"""Stage `train_flow`: the class-conditional TARFlow on the codes under constant noise (SRC-FLOW.md,
"TARFlow / STARFlow", "Constant-noise regularization"), and its exact likelihood on held-out codes.

    data     codes.zarr train rows (unit variance per channel, pipeline/data/codes.py): a random view
             per image per step, chunk-aligned shuffle windows read ahead in a thread
    x        c + flow.noise_sigma * eps, one constant sigma; labels dropped to the null label with
             probability flow.label_drop (the unconditional branch CFG needs)
    loss     flow.nll_per_dim(x, y), nats per dimension; AdamW (fused on CUDA) + warmup/cosine, gradient
             clipping, EMA (one multi-tensor lerp), bf16 autocast on CUDA (log-dets stay fp32); the loss is
             torch.compiled under train.compile (auto: on CUDA); train.activation_checkpointing recomputes
             each layer in the backward pass
    resume   checkpoints every train.ckpt_every steps and on SIGTERM / SIGINT: model, EMA, optimizer,
             scheduler, RNG states, the log window; every random draw of step s (data order, view,
             noise, label drop) is a pure function of (train.seed, s), drawn for the global batch, so a
             resumed run, or W processes (torchrun DDP: runtime.nproc x the nodes of train.torchrun_args),
             continue the same trajectory
    output   flow.safetensors (EMA weights) + flow.json (`load_flow`), metrics.jsonl (train NLL and
             bits/dim every train.log_every steps)
    metrics  held-out bits/dim of the EMA flow on the val codes + sigma * eps (fixed noise, seeded by
             (train.seed, row)): conditional, unconditional (null label) and the standard-Gaussian
             baseline on the same noisy codes; the EMA flow's bits/dim on as many train rows alike

Bits/dim (TARFlow convention, pipeline.models.flow.bits_per_dim): the NLL of the continuous
noise-regularized code in nats per dimension divided by ln 2; no dequantization term. The baseline, a
standard Gaussian, scores (log2(2 pi) + E[x^2] / ln 2) / 2 per dimension: 2.08 bits on unit-variance codes
at sigma = 0.2 (E[x^2] = 1 + sigma^2).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from contextlib import closing
from pathlib import Path

import numpy as np
import torch

from pipeline import distributed
from pipeline.artifacts import ArtifactStore, StageOutput
from pipeline.config import Config, config_dict, validate_config
from pipeline.curves import Curves
from pipeline.data.batches import WindowShuffle
from pipeline.data.codes import TrainCodes, code_batches, open_codes, read_rows, split_rows
from pipeline.device import autocast, compile_enabled, resolve_device
from pipeline.images import grid_image
from pipeline.integrity import check_file
from pipeline.models.configured import flow_arch
from pipeline.models.flow import TARFlow, bits_per_dim
from pipeline.progress import progress
from pipeline.training import (
    EMA,
    Checkpointer,
    StopSignal,
    TrainingStopped,
    adamw,
    check_finite_loss,
    load_safetensors,
    optimizer_step,
    save_safetensors,
    seed_all,
    step_seed,
    warmup_cosine,
)
from storage_schemas.model_files import model_info, read_model_info
from storage_schemas.success import Manifest, write_atomic

WEIGHTS, INFO, METRICS, SUMMARY = "flow.safetensors", "flow.json", "metrics.jsonl", "train_summary.json"
WORKER = "stages.train_flow:train_worker"
GRID_IMAGES, GRID_STREAM = 8, 6  # the TensorBoard sample grid: images, and its noise's seed stream

log = logging.getLogger("srcflow")


def run(cfg: Config, upstream: dict[str, Manifest], out: StageOutput) -> dict:
    codes = upstream["compress"].dir / "codes.zarr"
    open_codes(codes)  # a bad store fails here, before any process starts
    if not (out.path / WEIGHTS).is_file():  # else: a rerun after training finished (e.g. killed in the evaluation)
        payload = {"config": config_dict(cfg), "codes": str(codes), "out": str(out.path),
                   "codes_fingerprint": upstream["compress"].fingerprint}
        if distributed.job_size(cfg.runtime.nproc, cfg.train.torchrun_args)[1] > 1:
            relay = MetricsRelay(out.path / METRICS, cfg.train.steps, out)
            try:
                distributed.launch(WORKER, payload, cfg.runtime.nproc, out.path / "launch", device=cfg.runtime.device,
                                   torchrun_args=cfg.train.torchrun_args, on_poll=relay)
            except distributed.LaunchStopped as e:
                raise TrainingStopped(f"train_flow: {e}; the last checkpoint is kept, run again to resume") from None
            relay()
        else:
            train(cfg, codes, out.path, resolve_device(cfg.runtime.device), payload["codes_fingerprint"], out)
        shutil.rmtree(out.path / "checkpoints", ignore_errors=True)

    summary = json.loads((out.path / SUMMARY).read_text())
    device = resolve_device(cfg.runtime.device)
    flow = load_flow(out.path, device)
    _, attrs = open_codes(codes)
    val_rows = split_rows(attrs, "val")[1] - split_rows(attrs, "val")[0]
    if val_rows == 0:
        log.warning("train_flow: %s has no val rows: no held-out bits/dim", codes)
        return summary

    def evaluate(split: str, rows: int | None = None) -> dict:
        return likelihood(flow, codes, split, cfg.flow.noise_sigma, cfg.train.seed, cfg.train.eval_batch_size,
                          device, max_rows=rows)

    val, train_rows = evaluate("val"), evaluate("train", val_rows)
    log.info("train_flow: val bits/dim %.4f (unconditional %.4f, standard Gaussian %.4f); EMA train bits/dim %.4f",
             val["bits_per_dim"], val["bits_per_dim_uncond"], val["gaussian_bits_per_dim"], train_rows["bits_per_dim"])
    return {**summary, **{f"val_{k}": v for k, v in val.items()},
            "train_ema_bits_per_dim": train_rows["bits_per_dim"], "train_eval_rows": train_rows["rows"]}


# --- the training loop (one process, or every torchrun worker) -------------------------------------


def train_worker(payload: dict) -> None:
    """torchrun entry (pipeline.distributed, in the process group): train; rank 0 writes."""
    cfg = validate_config(payload["config"], source="train_flow launch payload")
    distributed.worker_logging(cfg.runtime.log_level, cfg.runtime.progress)
    train(cfg, Path(payload["codes"]), Path(payload["out"]), resolve_device(cfg.runtime.device),
          payload["codes_fingerprint"], None)


def train(cfg: Config, codes: Path, out_dir: Path, device: torch.device, codes_fingerprint: str,
          out: StageOutput | None) -> None:
    """Train to train.steps (resuming from the newest checkpoint), then write flow.safetensors (EMA),
    flow.json and train_summary.json. `out` is None in a torchrun worker: the launching process relays
    metrics.jsonl to the log and the progress file."""
    t, f = cfg.train, cfg.flow
    rank, world = distributed.rank(), distributed.world_size()
    size = distributed.current_world_text(cfg.runtime.nproc, cfg.train.torchrun_args)
    data = TrainCodes(codes, t.in_memory_limit_gb)
    seed_all(t.seed)
    flow = TARFlow(**flow_arch(cfg, data.tokens, data.channels, data.num_classes)).to(device).train()
    flow.checkpoint_activations(t.activation_checkpointing)
    ema = EMA(flow, t.ema_decay)
    loss_fn = distributed.data_parallel(distributed.Calls(flow, "nll_per_dim"), device)
    if compile_enabled(t.compile, device):  # compiled on the first step (forward and backward graphs)
        loss_fn = torch.compile(loss_fn)
    optimizer = adamw(flow.parameters(), device, lr=t.lr, betas=t.adam_betas, weight_decay=t.weight_decay)
    scheduler = warmup_cosine(optimizer, min(t.warmup_steps, t.steps), t.steps)
    checkpoints = Checkpointer(out_dir / "checkpoints", every=t.ckpt_every)
    step, extra = checkpoints.restore(flow, ema, optimizer, scheduler)
    if step:
        log.info("train_flow: resumed at step %d from %s", step, checkpoints.latest())
    metrics = MetricsFile(out_dir / METRICS)
    if rank == 0:
        metrics.truncate(step)  # lines a killed run logged after its last checkpoint
    schedule = WindowShuffle(data.n, t.batch_size, t.seed, rank, world, block=data.block, window=t.shuffle_window)
    local = slice(rank * schedule.local_batch_size, (rank + 1) * schedule.local_batch_size)
    # this rank's NLL since the last log line (sum, steps): the log line is its mean over the ranks; resumed at the
    # same world size, each rank's own, else the mean
    window_sum, window_steps = extra.get("window", (0.0, 0))
    window_sum = torch.tensor(window_sum, device=device)
    first_step, started = step, time.perf_counter()
    log.info("train_flow: %d train images x %d views (%s), %d tokens x %d channels, %.2fM params, %s, batch %d",
             data.n, data.views, "in memory" if data.in_memory else "streamed", data.tokens, data.channels,
             sum(p.numel() for p in flow.parameters()) / 1e6, size, t.batch_size)

    grid = sample_grid(cfg, codes_fingerprint, device, data) if rank == 0 else None
    val_start, val_stop = split_rows(open_codes(codes)[1], "val")
    held_out = rank == 0 and val_stop > val_start  # val/bits_per_dim in TensorBoard
    data_wait = 0.0  # seconds the step waited for its batch
    with StopSignal() as stop, \
            closing(code_batches(data, schedule, t.seed, range(step, t.steps), prefetch=t.prefetch,
                                 pin_memory=device.type == "cuda")) as batches, \
            Curves(out_dir, step, images_per_step=t.batch_size, enabled=rank == 0) as curves, \
            progress("train_flow", t.steps - step, "steps") as meter:
        while step < t.steps:
            waited = time.perf_counter()
            codes_batch, labels = next(batches)
            data_wait += time.perf_counter() - waited
            x = codes_batch.to(device, non_blocking=True)
            x = x + f.noise_sigma * step_noise(t.seed, step, (t.batch_size, *x.shape[1:]), device)[local]
            y = step_labels(flow, labels, t.seed, step, t.batch_size, local).to(device, non_blocking=True)
            with autocast(device):
                loss = loss_fn(x, y)
            loss.backward()
            grad_norm = optimizer_step(optimizer, flow.parameters(), t.grad_clip)
            scheduler.step()
            ema.update(flow)
            step += 1
            window_sum, window_steps = window_sum + loss.detach().float(), window_steps + 1
            meter.advance()
            if step % t.log_every == 0 or step == t.steps:
                nll = distributed.all_reduce_mean(window_sum).item() / window_steps
                check_finite_loss(nll, "train_flow", step, checkpoints)  # the same mean on every rank
                elapsed = time.perf_counter() - started
                record = {"step": step, "nll": nll, "bits_per_dim": bits_per_dim(nll),
                          "lr": scheduler.get_last_lr()[0], "steps_per_s": (step - first_step) / elapsed,
                          "data_wait_fraction": data_wait / elapsed}
                if rank == 0:
                    metrics.append(record)
                curves.scalars(step, loss=nll, bits_per_dim=record["bits_per_dim"], lr=record["lr"],
                               grad_norm=grad_norm.item())
                if held_out:  # the EMA flow on the first eval_batch_size val rows (fixed noise): one batch
                    with torch.no_grad():
                        val = likelihood(ema.module, codes, "val", f.noise_sigma, t.seed, t.eval_batch_size, device,
                                         max_rows=t.eval_batch_size)
                    curves.validation(step, bits_per_dim=val["bits_per_dim"],
                                      bits_per_dim_uncond=val["bits_per_dim_uncond"])
                if out is not None:
                    log_record(record, t.steps)
                    out.report_progress(step, t.steps, "steps")
                window_sum, window_steps = torch.zeros((), device=device), 0
            if grid is not None and (step % t.image_every == 0 or step == t.steps):
                curves.image("samples", step, grid(ema.module))
            stopping = stop.agreed(device)  # a signal on any rank stops every rank at this step
            if checkpoints.due(step) or stopping:
                mean = [distributed.all_reduce_mean(window_sum).item(), window_steps]
                path = checkpoints.save(step, flow, ema, optimizer, scheduler, extra={"window": mean},
                                        rank_extra={"window": [window_sum.item(), window_steps]})
                if stopping:
                    raise TrainingStopped(f"train_flow: stopped by a signal at step {step}/{t.steps} ({size}); "
                                          f"checkpoint {path} written, run again to resume")
        curves.write_loss_png("train_flow: NLL per dimension (nats)")
    elapsed = time.perf_counter() - started
    rows_read = distributed.gather(data.rows_read)  # per rank: its share of the rows, or the split held in memory

    if rank == 0:
        last = metrics.last() or {}
        summary = {"steps": t.steps, "world_size": world, "rows_read_per_rank": rows_read,
                   "train_nll": last.get("nll"),
                   "train_bits_per_dim": last.get("bits_per_dim"),
                   "train_seconds": round(elapsed, 3), "steps_per_s": (step - first_step) / max(elapsed, 1e-9),
                   "data_wait_fraction": data_wait / max(elapsed, 1e-9),
                   "params_m": sum(p.numel() for p in flow.parameters()) / 1e6,
                   "train_images": data.n, "views": data.views, "codes_streamed": not data.in_memory}
        write_atomic(out_dir / SUMMARY, json.dumps(summary, indent=1))
        save_flow(ema.module, cfg, data, codes, codes_fingerprint, out_dir)
    distributed.barrier()


def sample_grid(cfg: Config, codes_fingerprint: str, device: torch.device, data: TrainCodes):
    """flow -> a uint8 grid of GRID_IMAGES samples (one fixed noise, the trained classes in turn: the grids of every
    step compare), decoded like `sample` does through the frozen SRC, feature normalizer and RAE decoder that the
    codes came from. They are found through compress's own upstream, so train_flow's inputs stay compress alone:
    the grids only show progress. None, with a warning, where one is not in this store (synthetic codes)."""
    from stages.sample import decode, decoding_models, token_step_threads

    store = ArtifactStore(cfg.storage.root)
    try:
        found = {"compress": store.manifest("compress", codes_fingerprint)}
        found |= {name: store.manifest(name, fp) for name, fp in found["compress"].upstream.items()}
        found |= {name: store.manifest(name, fp) for name, fp in found["fit_src"].upstream.items()
                  if name == "fit_decoder"}
        src, normalizer, decoder = decoding_models(cfg, found, device)
    except (OSError, ValueError, KeyError) as e:
        log.warning("train_flow: no sample grids in TensorBoard (%s)", e)
        return None
    noise = torch.Generator().manual_seed(step_seed(cfg.train.seed, 0, GRID_STREAM))
    z = torch.randn((GRID_IMAGES, data.tokens, data.channels), generator=noise).to(device)
    y = torch.from_numpy(data.classes[np.arange(GRID_IMAGES) % len(data.classes)]).to(device)  # trained classes

    def grid(flow: TARFlow) -> np.ndarray:
        with torch.no_grad(), token_step_threads(device), autocast(device):
            codes = flow.reverse(z, y)
        return grid_image(decode(codes.float(), src, normalizer, decoder, device)[0], ncol=GRID_IMAGES)

    return grid


def step_noise(seed: int, step: int, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """eps of the global batch at `step` (each rank keeps its slice): a pure function of (seed, step)."""
    g = torch.Generator(device=device).manual_seed(step_seed(seed, step, 0))
    return torch.randn(shape, generator=g, device=device)


def step_labels(flow: TARFlow, labels: torch.Tensor, seed: int, step: int, global_batch: int,
                local: slice) -> torch.Tensor:
    """Label dropout drawn for the global batch at `step` (model.drop_labels), this rank's slice kept."""
    full = torch.zeros(global_batch, dtype=labels.dtype)
    full[local] = labels
    return flow.drop_labels(full, generator=torch.Generator().manual_seed(step_seed(seed, step, 2)))[local]


# --- metrics file and its relay ---------------------------------------------------------------------


class MetricsFile:
    """metrics.jsonl: one JSON object per log line, `step` first."""

    def __init__(self, path: Path):
        self.path = path

    def records(self) -> list[dict]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def last(self) -> dict | None:
        records = self.records()
        return records[-1] if records else None

    def truncate(self, step: int) -> None:
        kept = [r for r in self.records() if r["step"] <= step]
        write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def append(self, record: dict) -> None:
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")


class MetricsRelay:
    """Called while torchrun runs: new metrics.jsonl lines -> the srcflow log and the stage progress."""

    def __init__(self, path: Path, steps: int, out: StageOutput):
        self.file, self.steps, self.out, self.seen = MetricsFile(path), steps, out, None

    def __call__(self) -> None:
        records = self.file.records()
        new = [r for r in records if self.seen is None or r["step"] > self.seen]
        for record in new:
            log_record(record, self.steps)
        if new:
            self.seen = new[-1]["step"]
            self.out.report_progress(self.seen, self.steps, "steps")


def log_record(record: dict, steps: int) -> None:
    log.info("train_flow: step %d/%d nll %.4f bits/dim %.4f lr %.2e (%.2f steps/s, data wait %.1f%%)",
             record["step"], steps, record["nll"], record["bits_per_dim"], record["lr"], record["steps_per_s"],
             100 * record["data_wait_fraction"])


# --- the exported flow ----------------------------------------------------------------------------


def save_flow(flow: TARFlow, cfg: Config, data: TrainCodes, codes: Path, codes_fingerprint: str,
              out_dir: Path) -> None:
    group, attrs = open_codes(codes)
    info = model_info("flow", arch=flow_arch(cfg, data.tokens, data.channels, data.num_classes),
                      noise_sigma=cfg.flow.noise_sigma, classes=data.classes.tolist(), views=attrs["views"],
                      codes_fingerprint=codes_fingerprint,
                      code_stats={"mean": group["code_mean"][...].tolist(), "std": group["code_std"][...].tolist(),
                                  "note": "codes as stored by compress (the SRC's unit-variance encode output); the "
                                          "flow models them as they are, sampled codes go straight to SRC.decode"})
    write_atomic(out_dir / INFO, info)
    save_safetensors(flow, out_dir / WEIGHTS, metadata={"flow": info})


def flow_info(source) -> dict:
    """flow.json of a train_flow output (its Manifest or directory)."""
    directory = Path(getattr(source, "dir", source))
    check_file(directory / INFO)  # its bytes against the output's record
    return read_model_info(directory, "flow")


def load_flow(source, device: torch.device | str = "cpu") -> TARFlow:
    """The EMA flow of a train_flow output (its Manifest or directory), frozen, in eval mode on `device`."""
    directory = Path(getattr(source, "dir", source))
    model = TARFlow(**flow_info(directory)["arch"])
    load_safetensors(model, directory / WEIGHTS)
    return model.to(device).eval().requires_grad_(False)


# --- exact likelihood on held-out codes ---------------------------------------------------------------


def row_noise(seed: int, start: int, stop: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Fixed evaluation noise: row r's eps is seeded by (seed, r), whatever the batch (CPU)."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(step_seed(seed, r, 3)))
                        for r in range(start, stop)])


@torch.no_grad()
def likelihood(flow: TARFlow, codes: Path, split: str, sigma: float, seed: int, batch_size: int,
               device: torch.device, max_rows: int | None = None) -> dict:
    """Exact bits/dim (fp32) of the rows of `split` + sigma * eps: conditional on their labels, with the
    null label, and of a standard Gaussian on the same noisy codes."""
    group, attrs = open_codes(codes)
    start, stop = split_rows(attrs, split)
    if max_rows is not None:
        stop = min(stop, start + max_rows)
    if stop <= start:
        raise ValueError(f"{codes}: the {split} split has no rows to evaluate the likelihood on")
    flow = flow.to(device).eval()
    totals = {"cond": 0.0, "uncond": 0.0, "gauss": 0.0}
    dims = 0
    for a in range(start, stop, batch_size):
        b = min(a + batch_size, stop)
        c, y = read_rows(group, a, b)
        x = torch.from_numpy(c) + sigma * row_noise(seed, a, b, c.shape[1:])
        x, y = x.to(device), torch.from_numpy(y).to(device)
        totals["cond"] += flow.log_prob(x, y).double().sum().item()
        totals["uncond"] += flow.log_prob(x, torch.full_like(y, flow.num_classes)).double().sum().item()
        totals["gauss"] += (-0.5 * x.double().square() - 0.5 * math.log(2 * math.pi)).sum().item()
        dims += x.numel()
    per_dim = {k: -v / dims for k, v in totals.items()}
    return {"bits_per_dim": bits_per_dim(per_dim["cond"]), "bits_per_dim_uncond": bits_per_dim(per_dim["uncond"]),
            "gaussian_bits_per_dim": bits_per_dim(per_dim["gauss"]), "nll": per_dim["cond"], "rows": stop - start}
