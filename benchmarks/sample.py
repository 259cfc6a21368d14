"""Sampling speed of the flow: KV-cache reverse vs the naive reverse, side by side in one run.

    python benchmarks/sample.py                               # CPU smoke width, well under 2 min
    python benchmarks/sample.py --device cuda --paper --bf16  # adds a paper-like width

(with the package installed, as `make .venv` does; else `python -m benchmarks.sample` from the root)

Prints one JSON object: per model, samples/s of each sampler, the speedup ratio, peak memory
(torch.cuda.max_memory_allocated on CUDA; on CPU the process's peak RSS, ru_maxrss, which only
grows, so the cached sampler runs first) and the largest difference between the two samplers.
"""

import argparse
import json
import resource
import time

import torch

from pipeline.models.flow import TARFlow


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--width", type=int, default=128, help="smoke model width")
    parser.add_argument("--heads", type=int, default=4, help="smoke model heads")
    parser.add_argument("--blocks", type=int, default=4, help="smoke model blocks")
    parser.add_argument("--layers", type=int, default=2, help="smoke model layers per block")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--channels", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--cfg-scale", type=float, default=0.0, help="> 0 doubles the batch in conditioned blocks")
    parser.add_argument("--paper", action="store_true", help="also a paper-like model (CUDA only)")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast for the network (sampling math stays fp32)")
    parser.add_argument("--threads", type=int, default=None,
                        help="intra-op CPU threads; default 1 on CPU (a token step is too small to split) "
                             "and torch's choice on CUDA")
    args = parser.parse_args()
    if args.threads or args.device == "cpu":
        torch.set_num_threads(args.threads or 1)
    if args.paper and not args.device.startswith("cuda"):
        parser.error("--paper needs --device cuda (the naive sampler at width 1024 is hours on CPU)")

    common = {"in_channels": args.channels, "num_tokens": args.tokens, "num_classes": 1000,
              "cond": "prefix", "scale": "softplus", "start_token": True, "soft_clip": 4.0}
    models = {"smoke": {"width": args.width, "heads": args.heads, "num_blocks": args.blocks,
                        "layers_per_block": args.layers, **common}}
    if args.paper:  # STARFlow-like deep-shallow: a 16-layer conditioned deep block + 3 shallow 2-layer blocks
        models["paper"] = {"width": 1024, "heads": 16, "num_blocks": 4, "layers_per_block": 2,
                           "deep_layers": 16, **common}

    report = {"device": args.device, "torch": torch.__version__, "batch": args.batch, "tokens": args.tokens,
              "channels": args.channels, "repeats": args.repeats, "cfg_scale": args.cfg_scale,
              "bf16": args.bf16, "threads": torch.get_num_threads(), "models": {}}
    for name, kwargs in models.items():
        report["models"][name] = benchmark(kwargs, args)
    print(json.dumps(report, indent=2))


def benchmark(kwargs, args):
    torch.manual_seed(0)
    model = TARFlow(**kwargs).to(args.device).eval()
    for block in model.blocks:  # non-zero heads so the samplers' outputs are worth comparing
        torch.nn.init.normal_(block.proj_out.weight, std=0.01)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(args.batch, args.tokens, args.channels, generator=g).to(args.device)
    y = torch.randint(0, kwargs["num_classes"], (args.batch,), generator=g).to(args.device)

    def sample(use_cache, z=z, y=y):
        with torch.autocast(args.device.split(":")[0], dtype=torch.bfloat16, enabled=args.bf16):
            return model.reverse(z, y, cfg_scale=args.cfg_scale, use_cache=use_cache)

    result = {"params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
              **{k: v for k, v in kwargs.items() if k in ("width", "heads", "num_blocks", "layers_per_block", "deep_layers")}}
    samples = {}
    for sampler, use_cache in (("kv_cache", True), ("naive", False)):
        sample(use_cache, z[:1, :8], y[:1])  # warm-up on a short sequence
        _sync(args.device)
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats(args.device)
        start = time.perf_counter()
        for _ in range(args.repeats):
            samples[sampler] = sample(use_cache)
        _sync(args.device)
        seconds = (time.perf_counter() - start) / args.repeats
        result[sampler] = {"seconds_per_batch": round(seconds, 4), "samples_per_s": round(args.batch / seconds, 4),
                           "peak_memory_mb": round(_peak_memory_mb(args.device), 1)}
    result["speedup"] = round(result["naive"]["seconds_per_batch"] / result["kv_cache"]["seconds_per_batch"], 2)
    result["max_abs_diff"] = (samples["kv_cache"] - samples["naive"]).abs().max().item()
    return result


def _sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def _peak_memory_mb(device):
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # Linux: KiB


if __name__ == "__main__":
    main()
