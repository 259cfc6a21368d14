"""Flow training speed on random codes: steps/s, samples/s, MFU and peak memory of one optimizer step.

    python benchmarks/train_flow.py --config configs/smoke.yaml            # CPU, seconds
    python benchmarks/train_flow.py --config configs/imagenet256.yaml --device cuda

The model is built from the config's `flow` section (the size the paper config trains), on
random unit-variance codes shaped like the config's codes (tokens from the encoder geometry,
channels = src.dim), with the training step of stage `train_flow`: constant noise, label drop,
bf16 autocast on CUDA, AdamW, gradient clipping. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch

from pipeline.config import load_config
from pipeline.models.flow import TARFlow
from pipeline.training import autocast


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/smoke.yaml")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=None, help="per-device batch (default: train.batch_size)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="device bf16 dense peak (H100/H200: 989)")
    args = ap.parse_args()

    cfg = load_config(args.config)
    device = torch.device(args.device)
    grid = cfg.encoder.input_size // (cfg.encoder.arch.patch_size or 14)
    tokens, channels = grid * grid, cfg.src.dim
    f = cfg.flow
    model = TARFlow(in_channels=channels, num_tokens=tokens, num_classes=1000, width=f.width, heads=f.heads,
                    num_blocks=f.num_blocks, layers_per_block=f.layers_per_block, deep_layers=f.deep_layers,
                    cond=f.cond, scale=f.scale, start_token=f.start_token, soft_clip=f.soft_clip,
                    label_drop=f.label_drop).to(device)
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    batch = args.batch or cfg.train.batch_size
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(batch, tokens, channels, device=device, generator=g)
    y = torch.randint(0, 1000, (batch,), device=device, generator=g)

    def step() -> float:
        noisy = x + f.noise_sigma * torch.randn_like(x)
        with autocast(device):
            loss = model.nll_per_dim(noisy, model.drop_labels(y))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()
        return loss.item()  # a sync point, as the training loop's logging is

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    sync()
    seconds = (time.perf_counter() - t0) / args.steps
    # 6 * params * tokens per sample (forward + backward), the usual dense-transformer estimate
    flops = 6 * params * tokens * batch
    print(json.dumps({
        "benchmark": "train_flow", "config": args.config, "device": torch.cuda.get_device_name(device)
        if device.type == "cuda" else "cpu", "torch": torch.__version__, "params_m": round(params / 1e6, 2),
        "tokens": tokens, "channels": channels, "batch": batch, "bf16": device.type == "cuda",
        "step_seconds": round(seconds, 5), "steps_per_s": round(1 / seconds, 3),
        "samples_per_s": round(batch / seconds, 1),
        "mfu": round(flops / seconds / (args.peak_tflops * 1e12), 4) if device.type == "cuda" else None,
        "peak_memory_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda"
        else round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "final_loss": round(loss, 4),
    }))


if __name__ == "__main__":
    main()
