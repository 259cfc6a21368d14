"""Flow training speed on random codes: step time, samples/s, peak memory and MFU, eager and compiled.

    python benchmarks/train_flow.py --config configs/smoke.yaml                  # CPU, seconds (eager)
    python benchmarks/train_flow.py --config configs/imagenet256.yaml --device cuda --compile both

The model is built from the config's `flow` section (the size the paper config trains), on random
unit-variance codes shaped like the config's codes (tokens from the encoder geometry, channels = src.dim),
with the training step of stage `train_flow`: constant noise, label drop, bf16 autocast on CUDA, AdamW
(fused on CUDA), gradient clipping, the EMA update. `--compile on` times the torch.compiled loss
(train.compile), `both` the eager step and then the compiled one on the same weights; the compile runs in
the untimed warm-up steps (warmup_seconds), and the compiled loss of one fixed batch is compared with the
eager loss on the same weights (compiled_probe_loss_diff). The top-level figures are the compiled run's when
there is one (what train.compile: auto trains with on CUDA). Prints one JSON object.

MFU = model FLOPs per step / step time / the device's dense bf16 peak. The FLOPs are written out in
stages/plan/compute.py flow_flops (the planner's estimates use the same count): per block, the matmuls of
proj_in / proj_out, qkv, attention out and the MLP, plus the causal attention's QK^T and AV; training is 3x the
forward (backward = 2x), whatever activation checkpointing recomputes. On CPU the MFU is null (no meaningful peak).
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch

from pipeline.config import load_config
from pipeline.device import autocast
from pipeline.models.flow import TARFlow
from pipeline.training import EMA, adamw
from stages.plan.compute import flow_flops, peak_of


def device_peak_tflops(device: torch.device, override: float | None) -> tuple[float | None, str]:
    if override:
        return override, "--peak-tflops"
    if device.type != "cuda":
        return None, "cpu: no peak"
    name = torch.cuda.get_device_name(device)
    peaks = peak_of(name)
    if peaks:
        return peaks[0], "table: stages/plan/compute.py PEAK_TFLOPS"
    return None, f"unknown device {name!r}: pass --peak-tflops"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/smoke.yaml")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=None, help="per-device batch (default: train.batch_size)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (they include the compile)")
    ap.add_argument("--compile", choices=("off", "on", "both"), default="off")
    ap.add_argument("--activation-checkpointing", action="store_true")
    ap.add_argument("--peak-tflops", type=float, default=None, help="device dense bf16 peak (default: the table)")
    ap.add_argument("--threads", type=int, default=None, help="intra-op CPU threads (default on CPU: 1, which on "
                    "a shared 2-core box trains several times faster than 2, and keeps inductor's OpenMP sane)")
    args = ap.parse_args()
    if args.threads or args.device == "cpu":
        torch.set_num_threads(args.threads or 1)

    cfg = load_config(args.config)
    device = torch.device(args.device)
    grid = cfg.encoder.input_size // (cfg.encoder.arch.patch_size or 14)
    tokens, channels = grid * grid, cfg.src.dim
    f = cfg.flow
    torch.manual_seed(0)
    model = TARFlow(in_channels=channels, num_tokens=tokens, num_classes=1000, width=f.width, heads=f.heads,
                    num_blocks=f.num_blocks, layers_per_block=f.layers_per_block, deep_layers=f.deep_layers,
                    cond=f.cond, scale=f.scale, start_token=f.start_token, soft_clip=f.soft_clip,
                    label_drop=f.label_drop).to(device)
    model.checkpoint_activations(args.activation_checkpointing)
    params = sum(p.numel() for p in model.parameters())
    opt = adamw(model.parameters(), device, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    ema = EMA(model, cfg.train.ema_decay)
    batch = args.batch or cfg.train.batch_size
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(batch, tokens, channels, device=device, generator=g)
    y = torch.randint(0, 1000, (batch,), device=device, generator=g)
    probe = (x + f.noise_sigma * torch.randn(x.shape, device=device, generator=g), y.clone())  # one fixed batch
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    flops = flow_flops(model, tokens, channels)
    step_flops = 3 * flops["forward"] * batch
    peak, peak_source = device_peak_tflops(device, args.peak_tflops)

    def loss_of(fn, noisy, labels):
        with autocast(device):
            return fn(noisy, labels)

    def measure(fn) -> dict:
        def step() -> float:
            noisy = x + f.noise_sigma * torch.randn_like(x)
            loss = loss_of(fn, noisy, model.drop_labels(y))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            opt.step()
            ema.update(model)
            return loss.item()  # a sync point, as the training loop's logging is

        probe_loss = loss_of(fn, *probe).item()  # before any step: the same weights for eager and compiled
        started = time.perf_counter()
        for _ in range(args.warmup):
            step()
        sync()
        warmup_seconds = time.perf_counter() - started
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            loss = step()
        sync()
        seconds = (time.perf_counter() - t0) / args.steps
        return {"step_seconds": round(seconds, 5), "steps_per_s": round(1 / seconds, 3),
                "samples_per_s": round(batch / seconds, 1), "warmup_seconds": round(warmup_seconds, 2),
                "achieved_tflops": round(step_flops / seconds / 1e12, 3),
                "mfu": round(step_flops / seconds / (peak * 1e12), 4) if peak else None,
                "peak_memory_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
                if device.type == "cuda" else round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                "probe_loss": probe_loss, "final_loss": round(loss, 4)}

    state = {k: v.clone() for k, v in model.state_dict().items()}
    eager_probe_loss = loss_of(model.nll_per_dim, *probe).item()
    runs = {}
    for name in {"off": ["eager"], "on": ["compiled"], "both": ["eager", "compiled"]}[args.compile]:
        model.load_state_dict(state)  # both variants start from the same weights (the optimizer state carries on)
        fn = model.nll_per_dim if name == "eager" else torch.compile(model.nll_per_dim)
        runs[name] = measure(fn)
    report = {
        "benchmark": "train_flow", "config": args.config, "device": torch.cuda.get_device_name(device)
        if device.type == "cuda" else "cpu", "torch": torch.__version__, "threads": torch.get_num_threads(),
        "params_m": round(params / 1e6, 2), "tokens": tokens, "channels": channels, "batch": batch,
        "bf16": device.type == "cuda", "fused_adamw": device.type == "cuda",
        "activation_checkpointing": args.activation_checkpointing,
        "flops": {"forward_per_sample": flops["forward"], "step": step_flops,
                  "attention_share": round(flops["attention"] / flops["forward"], 4),
                  "rule": "3 x forward (matmuls + causal attention)", "six_n_tokens_per_sample": 6 * params * tokens},
        "peak_tflops": peak, "peak_source": peak_source, "compiled": "compiled" in runs,
        **runs["compiled" if "compiled" in runs else "eager"], "runs": runs, "eager_probe_loss": eager_probe_loss,
    }
    if "compiled" in runs:  # the compiled loss against the eager one, same weights, same batch
        report["compiled_probe_loss_diff"] = abs(runs["compiled"]["probe_loss"] - eager_probe_loss)
    if len(runs) == 2:
        report["compiled_speedup"] = round(runs["eager"]["step_seconds"] / runs["compiled"]["step_seconds"], 3)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
