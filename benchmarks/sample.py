"""Sampling speed of the flow: every sampler side by side in one run, on the same noise and labels.

    python benchmarks/sample.py                                   # CPU smoke width, 256 tokens, ~1-2 min
    python benchmarks/sample.py --flow data/artifacts/learn/train_flow/<fp16>   # a trained flow's weights
    python benchmarks/sample.py --device cuda --paper --bf16      # adds a paper-like width and seconds_for_50k

(with the package installed, as `make .venv` does; else `python -m benchmarks.sample` from the root)

Samplers (pipeline/models/flow.py, TARFlow.reverse):
    naive          sequential, no cache: the whole prefix recomputed at every step (the reference)
    kv_cache       sequential, dynamic KV cache, both CFG branches as one doubled batch (the stage's default)
    kv_two_pass    sequential, one pass and one cache per CFG branch
    kv_static      sequential, static (preallocated, masked) KV cache
    kv_graph       kv_static with each step replayed as a CUDA graph (CUDA only)
    jacobi         block-wise Jacobi (--jacobi-chunk, --jacobi-tol, --jacobi-max-iters), dynamic cache
    jacobi_graph   jacobi over static caches, each chunk's pass a CUDA graph (CUDA only)
Per sampler: seconds per batch, samples/s, peak memory (torch.cuda.max_memory_allocated on CUDA; on CPU the
process's peak RSS, which only grows: read it as an upper bound) and max |x - x_kv_cache| in code space.
For Jacobi also, per block, the passes it used and max |x_jacobi - x_sequential| of that block's inverse
given the same input (the sequential sampler's). Random weights make every block nearly the identity (its
heads are zero-initialized, here N(0, --head-std)), where Jacobi converges at once: --fit-steps trains the
flow first on AR(1) codes (c_t = rho c_{t-1} + noise: every token depends on the one before), and --flow
loads trained weights, for iteration counts that mean something.
With --paper on CUDA: kv_cache, kv_graph and jacobi_graph at each of --sweep's batch sizes, and
seconds_for_50k, 50,000 samples at one CFG scale at the best of them. A sampler that fails is recorded with
its error beside the others' figures.
"""

import argparse
import json
import math
import resource
import time
from pathlib import Path

import torch

from pipeline.models.flow import Guide, TARFlow

SAMPLERS = {  # name: reverse() keywords
    "naive": {"use_cache": False},
    "kv_cache": {},
    "kv_two_pass": {"two_pass_cfg": True},
    "kv_static": {"cache": "static"},
    "kv_graph": {"cache": "graph"},
    "jacobi": {"solver": "jacobi"},
    "jacobi_graph": {"solver": "jacobi", "cache": "graph"},
}


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
    parser.add_argument("--flow", type=Path, default=None, help="a train_flow output: its EMA flow replaces smoke")
    parser.add_argument("--head-std", type=float, default=0.01, help="random weights: std of the output heads")
    parser.add_argument("--fit-steps", type=int, default=0, help="train on AR(1) codes first (random weights)")
    parser.add_argument("--rho", type=float, default=0.8, help="--fit-steps: the codes' token-to-token correlation")
    parser.add_argument("--cfg-scale", type=float, default=1.0, help="> 0 doubles the batch in conditioned blocks")
    parser.add_argument("--cfg-mode", default="starflow", choices=("tarflow", "starflow"))
    parser.add_argument("--jacobi-chunk", type=int, default=64)
    parser.add_argument("--jacobi-tol", type=float, default=1e-3)
    parser.add_argument("--jacobi-max-iters", type=int, default=64)  # sample.jacobi_max_iters
    parser.add_argument("--samplers", default=None, help="comma-separated subset (default: all that apply)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--paper", action="store_true", help="also a paper-like model (CUDA only)")
    parser.add_argument("--sweep", default="128,512,1024", help="--paper: batch sizes for seconds_for_50k")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast for the network (sampling math and "
                        "Jacobi's passes stay fp32)")
    parser.add_argument("--threads", type=int, default=None,
                        help="intra-op CPU threads; default 1 on CPU (a token step is too small to split) "
                             "and torch's choice on CUDA")
    args = parser.parse_args()
    if args.threads or args.device == "cpu":
        torch.set_num_threads(args.threads or 1)
    cuda = args.device.startswith("cuda")
    if args.paper and not cuda:
        parser.error("--paper needs --device cuda (the naive sampler at width 1024 is hours on CPU)")

    common = {"in_channels": args.channels, "num_tokens": args.tokens, "num_classes": 1000,
              "cond": "prefix", "scale": "softplus", "start_token": True, "soft_clip": 4.0}
    models = {"smoke": {"width": args.width, "heads": args.heads, "num_blocks": args.blocks,
                        "layers_per_block": args.layers, **common}}
    if args.flow:
        from stages.train_flow import flow_info

        models = {"trained": {**flow_info(args.flow)["arch"], "weights": str(args.flow)}}
    if args.paper:  # STARFlow-like deep-shallow: a 16-layer conditioned deep block + 3 shallow 2-layer blocks
        models["paper"] = {"width": 1024, "heads": 16, "num_blocks": 4, "layers_per_block": 2,
                           "deep_layers": 16, **common}
    chosen = args.samplers.split(",") if args.samplers else [n for n in SAMPLERS if cuda or "graph" not in n]

    report = {"device": torch.cuda.get_device_name(args.device) if cuda else "cpu", "torch": torch.__version__,
              "batch": args.batch, "cfg_scale": args.cfg_scale, "cfg_mode": args.cfg_mode, "bf16": args.bf16,
              "threads": torch.get_num_threads(), "repeats": args.repeats, "fit_steps": args.fit_steps,
              "jacobi": {"chunk": args.jacobi_chunk, "tol": args.jacobi_tol, "max_iters": args.jacobi_max_iters},
              "models": {}}
    for name, kwargs in models.items():
        report["models"][name] = benchmark(name, kwargs, chosen, args)
    print(json.dumps(report, indent=2))


def build(kwargs, args):
    """(model, the fit's last NLL per dim or None): trained weights, or random ones (optionally fitted)."""
    if "weights" in kwargs:
        from stages.train_flow import load_flow

        return load_flow(kwargs["weights"], args.device), None
    torch.manual_seed(0)
    model = TARFlow(**kwargs)
    for block in model.blocks:  # non-zero heads so the samplers' outputs are worth comparing
        torch.nn.init.normal_(block.proj_out.weight, std=args.head_std)
    model = model.to(args.device)
    loss = fit(model, kwargs, args) if args.fit_steps else None
    return model.eval().requires_grad_(False), loss


def fit(model, arch, args):
    """A few hundred AdamW steps on AR(1) codes, so that the blocks' inverses are real triangular systems."""
    g = torch.Generator(device=args.device).manual_seed(1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4 if arch["width"] > 256 else 1e-3)
    shape = (max(args.batch, 16), arch["num_tokens"], arch["in_channels"])
    t = torch.arange(shape[1], device=args.device, dtype=torch.float32)
    # c = L eps, L[t, k] = rho^(t - k) sqrt(1 - rho^2) for k <= t (and 1 for k = 0): unit variance per token
    powers = (t[:, None] - t[None, :]).clamp(min=0)
    mix = torch.where(t[:, None] >= t[None, :], args.rho**powers, torch.zeros(()))
    mix[:, 1:] *= math.sqrt(1 - args.rho**2)
    for _ in range(args.fit_steps):
        codes = mix @ torch.randn(shape, device=args.device, generator=g)
        y = torch.randint(0, arch["num_classes"], shape[:1], device=args.device, generator=g)
        with torch.autocast(args.device.split(":")[0], dtype=torch.bfloat16, enabled=args.bf16):
            loss = model.nll_per_dim(codes, model.drop_labels(y))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return loss.item()


def benchmark(name, kwargs, chosen, args):
    model, fit_loss = build(kwargs, args)
    arch = {k: v for k, v in kwargs.items() if k != "weights"}
    tokens, channels = arch["num_tokens"], arch["in_channels"]
    naive_ok = name != "paper"  # the naive sampler at width 1024 costs minutes even on a GPU
    g = torch.Generator().manual_seed(0)
    z = torch.randn(args.batch, tokens, channels, generator=g).to(args.device)
    y = torch.randint(0, arch["num_classes"], (args.batch,), generator=g).to(args.device)
    jacobi = {"jacobi_chunk": args.jacobi_chunk, "jacobi_tol": args.jacobi_tol,
              "jacobi_max_iters": args.jacobi_max_iters}

    def sample(z, y, stats=None, **kw):
        with torch.autocast(args.device.split(":")[0], dtype=torch.bfloat16, enabled=args.bf16):
            return model.reverse(z, y, cfg_scale=args.cfg_scale, cfg_mode=args.cfg_mode, stats=stats, **jacobi, **kw)

    result = {"params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2), "tokens": tokens,
              "channels": channels, **{k: arch.get(k) for k in ("width", "heads", "num_blocks", "layers_per_block",
                                                                "deep_layers", "cond")}}
    if fit_loss is not None:
        result["fit_nll_per_dim"] = round(fit_loss, 4)
    outputs = {}
    for sampler in ["kv_cache"] + [s for s in chosen if s != "kv_cache"]:  # the reference first
        if sampler == "naive" and not naive_ok:
            continue
        kw, stats = SAMPLERS[sampler], []
        try:
            sample(z[:1, :8], y[:1], **kw)  # warm-up on a short sequence
            timing = timed(lambda kw=kw, stats=stats: sample(z, y, stats, **kw), args)
        except RuntimeError as e:  # one sampler failing (e.g. a CUDA graph capture) leaves the others' figures
            if sampler == "kv_cache":
                raise
            result[sampler] = {"error": f"{type(e).__name__}: {str(e).strip()[:300]}"}
            continue
        outputs[sampler] = timing.pop("output")
        result[sampler] = {**timing, "max_abs_diff": (outputs[sampler] - outputs["kv_cache"]).abs().max().item()}
        if "jacobi" in sampler:
            result[sampler]["passes_per_block"] = {s["block"]: s["iterations"] for s in stats[-len(model.blocks):]}
    if "naive" in result:
        result["kv_vs_naive"] = ratio(result, "naive", "kv_cache")  # goal P4: >= 10 at 256 tokens
    result["speedup_vs_kv_cache"] = {s: ratio(result, "kv_cache", s) for s in SAMPLERS if s in outputs}
    if "jacobi" in result:
        result["jacobi_per_block"] = per_block(model, z, y, args)
    if name == "paper":
        result["sweep"], result["seconds_for_50k"] = sweep(model, sample, tokens, channels, arch, args)
    return result


def timed(fn, args):
    sync(args.device)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(args.device)
    start = time.perf_counter()
    for _ in range(args.repeats):
        out = fn()
    sync(args.device)
    seconds = (time.perf_counter() - start) / args.repeats
    return {"seconds_per_batch": round(seconds, 4), "samples_per_s": round(len(out) / seconds, 4),
            "peak_memory_mb": round(peak_memory_mb(args.device), 1), "output": out}


def ratio(result, slow, fast):
    return round(result[slow]["seconds_per_batch"] / result[fast]["seconds_per_batch"], 3)


def per_block(model, z, y, args):
    """Per block (data -> noise index): Jacobi's passes and max |x_jacobi - x_sequential| of the block's own
    inverse, both fed the sequential sampler's input to that block."""
    guide = Guide(args.cfg_scale, args.cfg_mode, False)
    out, x = {}, z.float()
    with torch.no_grad(), torch.autocast(args.device.split(":")[0], dtype=torch.bfloat16, enabled=args.bf16):
        for i in reversed(range(len(model.blocks))):
            block = model.blocks[i]
            u = x.flip(1) if block.flip else x  # the block's own token order
            seq, _ = block.reverse_sequential(u, y, guide)
            jac, stats = block.reverse_jacobi(u, y, guide, chunk=args.jacobi_chunk, tol=args.jacobi_tol,
                                              max_iters=args.jacobi_max_iters)
            out[i] = {**stats, "max_abs_diff": (jac - seq).abs().max().item()}
            x = seq.flip(1) if block.flip else seq
    return out


def sweep(model, sample, tokens, channels, arch, args):
    """samples/s of the sequential (eager and CUDA graphs) and Jacobi (CUDA graphs) samplers at each batch
    size; seconds for 50k at the best of them."""
    rows, best = [], None
    for batch in (int(b) for b in args.sweep.split(",")):
        g = torch.Generator().manual_seed(1)
        z = torch.randn(batch, tokens, channels, generator=g).to(args.device)
        y = torch.randint(0, arch["num_classes"], (batch,), generator=g).to(args.device)
        for sampler in ("kv_cache", "kv_graph", "jacobi_graph"):
            try:
                timing = timed(lambda z=z, y=y, kw=SAMPLERS[sampler]: sample(z, y, **kw), args)
            except RuntimeError as e:  # out of memory, or a graph capture that fails: the other rows stand
                rows.append({"batch": batch, "sampler": sampler, "error": f"{type(e).__name__}: {str(e)[:200]}"})
                torch.cuda.empty_cache()
                continue
            timing.pop("output")
            rows.append({"batch": batch, "sampler": sampler, **timing})
            if best is None or timing["samples_per_s"] > best["samples_per_s"]:
                best = rows[-1]
    seconds = {"seconds": round(50_000 / best["samples_per_s"], 1), "batch": best["batch"],
               "sampler": best["sampler"], "cfg_scale": args.cfg_scale} if best else None
    return rows, seconds


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def peak_memory_mb(device):
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # Linux: KiB


if __name__ == "__main__":
    main()
