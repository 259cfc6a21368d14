"""Hours per stage at a scale: measured throughputs where a record matches the config and the device kind, else
estimates from each model's FLOPs at a stated share of the device's peak; DDP's gradient all-reduce per step.

Every figure is a list of terms, each with its hours, `measured` or `estimate`, and its source, so a reader can
check the arithmetic. The assumptions are named constants below, each with where it comes from.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import Config
from stages.plan.measured import Measurement, device_hours, identity
from stages.plan.scale import Scale

# By device name, first match wins (NVIDIA data sheets): dense peak TFLOP/s (no sparsity) at bf16, tf32 and fp32,
# and memory bandwidth in GB/s.
PEAK_TFLOPS = (("GH200", 989.0, 494.7, 66.9, 4000.0), ("H200", 989.0, 494.7, 66.9, 4800.0),
               ("H100 PCIe", 756.0, 378.0, 51.2, 2000.0), ("H100 NVL", 835.0, 417.5, 60.0, 3900.0),
               ("H100", 989.0, 494.7, 66.9, 3350.0), ("H800", 989.0, 494.7, 66.9, 3350.0),
               ("B200", 2250.0, 1100.0, 80.0, 8000.0), ("A100", 312.0, 156.0, 19.5, 2039.0),
               ("A800", 312.0, 156.0, 19.5, 2039.0), ("L40S", 362.0, 183.0, 91.6, 864.0),
               ("L4", 121.0, 60.0, 30.3, 300.0), ("A10", 125.0, 62.5, 31.2, 600.0))
DEFAULT_GPU = "NVIDIA H100"  # the GPU estimates assume when no record names one
# Share of the peak a stage's matmuls reach. train_flow measured 0.35 of an H200's bf16 peak at batch 256
# (benchmarks/results/train_flow-cuda.json); we assume the same for the other batched GPU passes, and less for
# the sampler's token-by-token KV-cache steps (small matmuls, one kernel chain per token).
GPU_MFU, GPU_SAMPLE_MFU = 0.35, 0.2
# A CPU process: its fp32 matmul rate (GFLOP/s) and memory bandwidth (GB/s), assumed for a 2-core machine;
# `srcflow rehearse` measures both on the machine (probes) instead.
CPU_GFLOPS, CPU_GBS = 60.0, 10.0
# Of the probed 2048 x 2048 matmul rate, what the stages' passes reach (their matmuls are as large): measured by
# `srcflow rehearse` at 0.9-1.1 for encode, fit_src and compress on a quiet 2-core EPYC (a busy one gives them less).
CPU_MFU = 0.9
# shard: a full JPEG decode validates every image (~4 ms at ImageNet's ~400x350 with libjpeg-turbo), plus its
# read, sha256 and tar write: about this many images per second per worker process (assumed).
SHARD_IMAGES_PER_S = 150.0
# encode on a CPU also decodes and ADM-crops each image (PIL, ~10 ms at 500x375 on one core; assumed).
DECODE_SECONDS_PER_IMAGE = 0.01
INCEPTION_FLOPS = 2 * 5.71e9  # torchvision's Inception-v3: 5.71 G multiply-adds at 299 px
@dataclass(frozen=True)
class Target:
    """The device a plan's hours are for: a GPU (by name, for its peak) or this kind of CPU process."""

    name: str
    kind: str  # gpu | cpu
    tflops: dict[str, float]  # precision -> peak TFLOP/s
    source: str
    gbs: float  # memory bandwidth, GB/s

    def runs(self, m: Measurement) -> bool:
        """A record times this device: any GPU record for a GPU (their speed is the model's and the precision's,
        both in the record's identity); for a CPU, only one of the same CPU model (CPUs differ several-fold)."""
        if self.kind == "gpu":
            return m.kind == "gpu"
        return m.kind == "cpu" and m.device != "unknown device" and m.device in self.name

    def estimate(self, flops: float, precision: str, mfu: float) -> tuple[float, str]:
        """Seconds for `flops` at `mfu` of the peak at `precision` (bf16, tf32, fp32 or fp64), and how. A CPU runs the
        first three at its fp32 rate and fp64 at half of it; a GPU's fp64 is taken at its fp32 peak (the fp64
        tensor cores of an H100, H200 or A100 match it; other parts are slower)."""
        share = mfu if self.kind == "gpu" else CPU_MFU
        wide = precision == "fp64"
        if self.kind == "gpu":
            peak, at = self.tflops["fp32" if wide else precision], precision
        else:
            peak, at = self.tflops["fp32"] / (2 if wide else 1), "fp64" if wide else "fp32"
        return flops / (peak * 1e12 * share), f"{flops / 1e9:,.1f} GFLOP at {share:g} x {peak:g} TFLOP/s " \
                                              f"({at}, {self.source})"


    def read(self, nbytes: float) -> tuple[float, str]:
        """Seconds to read `nbytes` from memory, and how: what bounds a sampler's token-by-token steps, which read
        every weight of a block for each token."""
        return nbytes / (self.gbs * 1e9), f"{nbytes / 1e9:,.1f} GB of weight reads at {self.gbs:g} GB/s"


def gpu_target(measured: list[Measurement]) -> Target:
    """The GPU named by the GPU records (their peak from PEAK_TFLOPS), else DEFAULT_GPU's."""
    names = [m.device for m in measured if m.kind == "gpu" and peak_of(m.device)]
    name = max(set(names), key=names.count) if names else DEFAULT_GPU
    bf16, tf32, fp32, gbs = peak_of(name)
    return Target(name, "gpu", {"bf16": bf16, "tf32": tf32, "fp32": fp32},
                  f"{name} dense peak, data sheet" + ("" if names else "; no GPU record: assumed"), gbs)


def cpu_target(gflops: float | None = None, name: str | None = None, gbs: float | None = None) -> Target:
    """This machine's CPU (its model name; its records apply), at `gflops` and `gbs` (a probe's) or CPU_GFLOPS and
    CPU_GBS."""
    measured = gflops is not None
    gflops, gbs = gflops if measured else CPU_GFLOPS, gbs or CPU_GBS
    return Target(name or cpu_name(), "cpu", {"fp32": gflops / 1e3}, f"{gflops:.0f} GFLOP/s, {gbs:.0f} GB/s " +
                  ("measured by probes" if measured else "assumed per process"), gbs)


def cpu_name() -> str:
    """The CPU's model name and this machine's cores (/proc/cpuinfo)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"CPU ({os.cpu_count()} cores)"


def peak_of(name: str) -> tuple[float, float, float, float] | None:
    for key, *peaks in PEAK_TFLOPS:
        if key in name:
            return tuple(peaks)
    return None


# --- FLOPs of the models (matmuls; norms and activations left out) -------------------------------------------


def encoder_flops(encoder) -> dict:
    """Matmul FLOPs (2 x multiply-adds) of one view through the ViT: patch embedding, qkv, attention scores and
    values, output projection, MLP; LayerNorms, softmax and GELU left out (a few per cent at DINOv2-B)."""
    vit = encoder.vit
    d, patches = vit.embed_dim, vit.patch_embed.num_patches
    n = patches + vit.num_prefix_tokens
    hidden = vit.blocks[0].mlp.fc1.out_features
    proj = vit.patch_embed.proj
    patch = 2 * patches * proj.in_channels * proj.kernel_size[0] * proj.kernel_size[1] * d
    block = 2 * n * d * 3 * d + 2 * 2 * n * n * d + 2 * n * d * d + 2 * 2 * n * d * hidden
    return {"per_view": patch + len(vit.blocks) * block, "patch_embed": patch, "per_block": block,
            "blocks": len(vit.blocks), "tokens_with_prefix": n, "width": d, "mlp_hidden": hidden}


def flow_flops(model, tokens: int, channels: int) -> dict:
    """Forward FLOPs per sample of the flow: per block of L input tokens (T - 1, + 1 with a start token, + 1 for a
    prefix label token), width w, n layers, D channels, MLP ratio r,
        2 L D w + 2 L w 2D                     proj_in, proj_out
      + n (2 L w^2 (4 + 2r)                    qkv (3), attention out (1), MLP (2r) matmuls
           + 2 L^2 w)                          QK^T and AV, 4 L^2 w, halved: causal, as flash attention computes it
    Training is 3x the forward (backward = 2x)."""
    matmul = attention = 0
    for block in model.blocks:
        w = block.proj_in.out_features
        length = tokens - 1 + (block.start is not None)
        attn_length = length + (block.cond == "prefix")  # the label token goes through the layers too
        ratio = block.layers[0].mlp.fc1.out_features / w
        matmul += 2 * length * channels * w + 2 * length * w * 2 * channels
        matmul += len(block.layers) * 2 * attn_length * w * w * (4 + 2 * ratio)
        attention += len(block.layers) * 2 * attn_length**2 * w
    return {"matmul": matmul, "attention": attention, "forward": matmul + attention}


def decoder_flops(cfg: Config) -> float:
    """One image through the RAE decoder (a ViT over the tokens and its CLS token, then the pixel head)."""
    from stages.plan.sizers import geometry, param_count

    tokens, _ = geometry(cfg)
    d = cfg.decoder
    seq = tokens + 1
    return 2 * param_count("decoder", cfg) * seq + 4 * seq**2 * d.hidden_size * d.depth


# --- hours per stage ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Term:
    term: str
    seconds: float  # per unit of `per`
    per: str  # "run" (the stage's work on one device) or "step" (one training step of one process)
    kind: str  # measured | estimate
    source: str

    def asdict(self, scale_to: float = 1.0) -> dict:
        return {"term": self.term, "hours": self.seconds * scale_to / 3600, "kind": self.kind, "source": self.source}


TRAINING = {"fit_decoder": "fit_decoder", "fit_src": "src", "train_flow": "train"}  # stage -> config section


def stage_hours(plan, cfg: Config, data, measured: list[Measurement], target: Target, scale: Scale) -> dict:
    """Device-hours and wall-clock hours of a StagePlan at `scale` on `target`, with every term's source."""
    if plan.stage in TRAINING:
        return _training_hours(plan, cfg, measured, target, scale, data)
    terms, parallel = _run_terms(plan, cfg, data, measured, target, scale)
    device_seconds = sum(t.seconds for t in terms)
    return {"device": target.name if plan.stage != "shard" else "CPU worker", "processes": parallel,
            "device_hours": device_seconds / 3600, "wall_hours": device_seconds / parallel / 3600,
            "estimate": any(t.kind == "estimate" for t in terms), "terms": [t.asdict() for t in terms]}


def _run_terms(plan, cfg: Config, data, measured: list[Measurement], target: Target, scale: Scale,
               ) -> tuple[list[Term], int]:
    """(terms of a data-parallel or single-process stage's device-seconds, processes sharing it)."""
    stage, work = plan.stage, plan.timed_in or {plan.unit: plan.work}
    record = _measured(stage, work, cfg, measured, target)
    jobs = max(plan.jobs, 1)
    if stage == "shard":
        procs = cfg.shard.workers
        return [record or Term("read, validate (full decode), hash and tar each image", plan.work / SHARD_IMAGES_PER_S,
                               "run", "estimate", f"{SHARD_IMAGES_PER_S:g} images/s per worker (assumed)")], procs
    single = stage in ("reference", "evaluate")
    procs = 1 if single else min(scale.gpus if target.kind == "gpu" else cfg.runtime.workers, jobs)
    if stage == "evaluate":
        inception = [t for t in [record] if t] or [_flops_term("Inception-v3 (pool, logits, spatial)", plan.work,
                                                               INCEPTION_FLOPS, inception_precision(cfg), target,
                                                               GPU_MFU)]
        return inception + _bayes_terms(cfg, data, target), procs
    if record is not None:
        return [record], procs
    if stage == "sample":
        return _sample_terms(plan, cfg, target), procs
    if stage == "encode":
        return _encode_terms(plan, cfg, measured, target), procs
    what, per_unit, precision, mfu = _per_unit(stage, cfg)
    return [_flops_term(what, plan.work, per_unit, precision, target, mfu)], procs


def _measured(stage: str, work: dict, cfg: Config, measured: list[Measurement], target: Target) -> Term | None:
    found, _ = device_hours(stage, work, identity(cfg, stage), measured, target.runs)
    if found is None:
        return None
    return Term(f"{stage} at {found['rate']:,.4g} {found['unit']} on {found['device']}", found["hours"] * 3600,
                "run", "measured", f"benchmarks/results/{found['source']}")


def _flops_term(what: str, units: int, flops_per_unit: float, precision: str, target: Target,
                mfu: float = GPU_MFU) -> Term:
    seconds, how = target.estimate(units * flops_per_unit, precision, mfu)
    return Term(what, seconds, "run", "estimate", f"{units:,} x {flops_per_unit / 1e9:,.2f} GFLOP: {how}")


def inception_precision(cfg: Config) -> str:
    """The Inception's arithmetic (evaluate.inception_dtype) as a peak-rate key."""
    return {"float64": "fp64", "float32": "fp32"}[cfg.evaluate.inception_dtype]


def _per_unit(stage: str, cfg: Config) -> tuple[str, float, str, float]:
    """(what, FLOPs per unit of work, precision, share of the peak) of the stages timed by FLOPs."""
    from stages.plan.sizers import geometry, param_count

    tokens, _ = geometry(cfg)
    if stage == "compress":  # the SRC encoder branch: about half its parameters, per token
        return "SRC encoder forward per row", param_count("src", cfg) * tokens, "bf16", GPU_MFU
    if stage == "reference":
        return (f"Inception-v3 per image ({cfg.evaluate.inception_dtype})", INCEPTION_FLOPS, inception_precision(cfg),
                GPU_MFU)
    raise ValueError(f"no FLOP model for stage {stage!r}")


def _inverse_term(what: str, samples: int, batches: int, cfg: Config, target: Target, branches: int) -> Term:
    """The flow's inverse with its KV cache: token by token, each step reads every weight of the block it is in, so
    it is bound by the larger of its FLOPs (`branches` passes: 2 with classifier-free guidance) and those reads."""
    from stages.plan.sizers import geometry, param_count

    tokens, _ = geometry(cfg)
    flops = samples * branches * flow_flops(_meta("flow", cfg), tokens, cfg.src.dim)["forward"]
    compute, how = target.estimate(flops, "bf16", GPU_SAMPLE_MFU)
    reads, read_how = target.read(batches * tokens * 4 * param_count("flow", cfg))
    if reads > compute:
        return Term(what, reads, "run", "estimate", f"{batches:,} batches x {tokens} token steps: {read_how} (bound "
                                                    f"by the reads; its FLOPs, {how}, take {compute:,.0f} s)")
    return Term(what, compute, "run", "estimate", f"{samples:,} samples: {how} (the weight reads, {read_how}, "
                                                  f"take {reads:,.0f} s)")


def _sample_terms(plan, cfg: Config, target: Target) -> list[Term]:
    from stages.plan.sizers import geometry, param_count

    tokens, _ = geometry(cfg)
    s = cfg.sample
    scales = len(s.cfg_scale)
    per_scale = plan.work // max(scales, 1)
    batches = scales * math.ceil(per_scale / s.batch_size)
    decode = decoder_flops(cfg) + param_count("src", cfg) * tokens
    return [_inverse_term("flow inverse, 2 CFG branches", plan.work, batches, cfg, target, 2),
            _flops_term("SRC and RAE decoders per sample", plan.work, decode, "bf16", target)]


def _encode_terms(plan, cfg: Config, measured: list[Measurement], target: Target) -> list[Term]:
    """The encoder's forward per row at encode.precision (TF32 matmuls for fp32 on a GPU), bounded below by the
    whole path (JPEG decode, crop, write) of a record of the same encoder on this kind of device at another
    precision: its forward is not what limits it. On a CPU the decode shares the cores: a term of its own."""
    flops = encoder_flops(_meta("encoder", cfg))["per_view"]
    precision = "bf16" if cfg.encode.precision == "bf16" else "tf32"
    forward = _flops_term("encoder forward per row", plan.work, flops, precision, target)
    if target.kind == "cpu":
        images = plan.work // len(cfg.encode.views)
        return [forward, Term("JPEG decode and ADM crop per image", images * DECODE_SECONDS_PER_IMAGE, "run",
                              "estimate", f"{images:,} images x {DECODE_SECONDS_PER_IMAGE * 1e3:g} ms (assumed)")]
    expect = {k: v for k, v in identity(cfg, "encode").items() if k != "encode_precision"}
    other, _ = device_hours("encode", {plan.unit: plan.work}, expect, measured, target.runs)
    if other is not None and other["hours"] * 3600 > forward.seconds:
        threads = f", with {other['cpu_count']} CPU threads decoding for one GPU" if other.get("cpu_count") else ""
        return [Term(f"encode's whole path (JPEG decode, crop, forward, write) at {other['rate']:,.4g} "
                     f"{other['unit']}", other["hours"] * 3600, "run", "estimate",
                     f"benchmarks/results/{other['source']} at another encode.precision{threads}: its rate is bound "
                     f"by the decode, not the forward ({forward.source} would take {forward.seconds / 3600:.2f} h)")]
    return [forward]


def _bayes_terms(cfg: Config, data, target: Target) -> list[Term]:
    """The flow as a Bayes-rule classifier: one forward per val image and class of the codes (the shallow blocks
    before the first conditioned one run once per image; counted in full here: an upper bound)."""
    from stages.plan.sizers import geometry

    tokens, _ = geometry(cfg)
    images = min(cfg.evaluate.bayes_max_images or data.val, data.val)
    classes = data.classes
    flops = flow_flops(_meta("flow", cfg), tokens, cfg.src.dim)["forward"]
    return [_flops_term("flow log-likelihood per (val image, class)", images * classes, flops, "fp32", target)]


GRID_IMAGES = 8  # the TensorBoard grids of fit_src and train_flow (their GRID_IMAGES)


def _once_terms(plan, cfg: Config, data, target: Target) -> list[Term]:
    """What a training stage does once, in one process, besides its steps: fit_src's reconstruction report (the RAE
    decoder on each report image, clean and from the SRC's and the PCA's codes, each clean and noisy) and its
    grids; train_flow's sample grids (8 flow inverses and decodes) and its held-out bits/dim (val rows and as
    many train rows, conditional and unconditional, fp32)."""
    from stages.plan.sizers import geometry

    tokens, _ = geometry(cfg)
    decode = decoder_flops(cfg)
    if plan.stage == "fit_src":
        grids = cfg.src.steps // cfg.src.image_every  # every image_every steps
        report = min(cfg.src.report_images, data.val)
        return [_flops_term(f"RAE decodes: the report ({report} images x 5) and {grids} grid(s)",
                            5 * report + 2 * GRID_IMAGES * grids, decode, "bf16", target)]
    if plan.stage == "train_flow":
        grids = math.ceil(cfg.train.steps / cfg.train.image_every)  # every image_every steps, and at the end
        flow = flow_flops(_meta("flow", cfg), tokens, cfg.src.dim)["forward"]
        rows = data.val * len(cfg.encode.views)
        return [_inverse_term(f"{grids} sample grid(s): flow inverse", grids * GRID_IMAGES, grids, cfg, target, 1),
                _flops_term(f"{grids} sample grid(s): RAE decodes", grids * GRID_IMAGES, decode, "bf16", target),
                _flops_term("held-out bits/dim: val rows and as many train rows, with and without the label",
                            4 * rows, flow, "fp32", target)]
    return []


def _training_hours(plan, cfg: Config, measured: list[Measurement], target: Target, scale: Scale,
                    data=None) -> dict:
    """Per step: the per-process batch's compute plus the all-reduce of the fp32 gradients (no overlap with the
    backward assumed: an upper bound; DDP overlaps buckets, so the truth lies between the larger and the sum)."""
    from stages.plan.sizers import param_count

    section = TRAINING[plan.stage]
    batch, steps = getattr(cfg, section).batch_size, plan.work
    procs = scale.gpus if target.kind == "gpu" else cfg.runtime.nproc
    local = math.ceil(batch / procs)
    record = _measured(plan.stage, {"samples": local}, cfg, measured, target)
    if record is not None:
        compute = Term(f"compute of {local} samples per process", record.seconds, "step", "measured", record.source +
                       f" ({record.term}; per-sample rate taken as batch-independent)")
    else:
        model = {"fit_decoder": "decoder", "fit_src": "src", "train_flow": "flow"}[plan.stage]
        per_sample = 3 * _forward_per_sample(model, cfg)
        seconds, how = target.estimate(local * per_sample, "bf16", GPU_MFU)
        compute = Term(f"compute of {local} samples per process", seconds, "step", "estimate",
                       f"3 x forward = {per_sample / 1e9:,.2f} GFLOP per sample: {how}")
    params = param_count({"fit_decoder": "decoder", "fit_src": "src", "train_flow": "flow"}[plan.stage], cfg)
    at = Scale(scale.nodes, scale.per_node, scale.source) if target.kind == "gpu" else Scale(1, procs, "")
    comm_seconds, how = at.allreduce_seconds(4 * params)
    comm = Term(f"DDP all-reduce of {params / 1e6:,.0f}M fp32 gradients", comm_seconds, "step", "estimate", how)
    step = compute.seconds + comm.seconds
    once = _once_terms(plan, cfg, data, target) if data is not None else []
    extra = sum(t.seconds for t in once)
    wall = steps * step + extra
    return {"device": target.name, "processes": procs, "per_process_batch": local,
            "step_seconds": step, "compute_seconds": compute.seconds, "allreduce_seconds": comm.seconds,
            "scaling_efficiency": compute.seconds / step if step else 1.0,
            "device_hours": (steps * step * procs + extra) / 3600, "wall_hours": wall / 3600,
            "estimate": True if comm.seconds or once else compute.kind == "estimate",
            "terms": [compute.asdict(steps * procs), comm.asdict(steps * procs), *(t.asdict() for t in once)]}


def _forward_per_sample(model: str, cfg: Config) -> float:
    from stages.plan.sizers import geometry, param_count

    tokens, _ = geometry(cfg)
    if model == "flow":
        return flow_flops(_meta("flow", cfg), tokens, cfg.src.dim)["forward"]
    if model == "decoder":
        return decoder_flops(cfg)
    return param_count("src", cfg) * 2 * tokens  # per-token MLP (mlp arch): 2 x params per token


def _meta(model: str, cfg: Config):
    from pipeline.models.configured import build
    from stages.plan.dataset import IMAGENET_CLASSES

    return build(model, cfg, IMAGENET_CLASSES)
