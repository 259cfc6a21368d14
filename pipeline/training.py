"""Building blocks the three training stages (RAE decoder, SRC, flow) share.

Each stage writes its own readable loop; this module only holds the pieces that loop calls:

    device = resolve_device(cfg.runtime.device)                              # pipeline/device.py
    seed_all(cfg.seed + rank)
    model, ema = ..., EMA(model, decay)
    optimizer = torch.optim.AdamW(...); scheduler = warmup_cosine(optimizer, warmup, steps)
    batches = BatchSchedule(n, batch_size, seed, rank, world_size)         # pipeline/data/batches.py
    checkpoints = Checkpointer(run_dir / "checkpoints", every=cfg.ckpt_every)
    step, extra = checkpoints.restore(model, ema, optimizer, scheduler)     # 0, {} on a fresh run
    with StopSignal() as stop:
        while step < steps:
            idx = batches.indices(step)                                     # the data position is `step`
            noise = torch.Generator(device).manual_seed(step_seed(seed, step))  # draws of step: (seed, step)
            with autocast(device): loss = ...
            loss.backward(); grad_norm = optimizer_step(optimizer, model.parameters(), grad_clip)
            scheduler.step(); ema.update(model); step += 1
            stopping = stop.agreed(device)                                  # same answer on every rank
            if checkpoints.due(step) or stopping:
                checkpoints.save(step, model, ema, optimizer, scheduler, extra={...})
            if stopping: raise TrainingStopped(...)                         # the output stays partial
    save_safetensors(ema.module, out / "ema.safetensors", metadata={...})

Resume contract: a checkpoint holds model, EMA, optimizer, scheduler, every rank's RNG state and
`step`; the data order is a pure function of (seed, step) (BatchSchedule), and DDP keeps one gradient
bucket layout for the whole run (distributed.data_parallel), so a run resumed at step s replays bit for
bit what an uninterrupted run would have done at the same world size, on any number of nodes.
Nothing here knows about Zarr or Prefect; DDP is only unwrapped (`.module`) and, when a process
group is up, used to gather RNG states and to agree on a stop.
"""

from __future__ import annotations

import copy
import io
import json
import logging
import math
import os
import random
import re
import signal
import sys
import threading
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import safetensors
import safetensors.torch
import torch
import torch.distributed as dist
from torch import nn

from pipeline.distributed import rank, world_size
from pipeline.integrity import read_verified
from storage_schemas.success import write_atomic

log = logging.getLogger("srcflow")


class CheckpointError(ValueError):
    """A checkpoint or weights file is missing, unreadable or does not fit the model. One-line message."""


class TrainingStopped(RuntimeError):
    """SIGTERM / SIGINT during training: a checkpoint was written, the output stays partial; run again to resume."""


class NonFiniteError(ValueError):
    """A NaN / inf loss or weights: training stops, nothing is committed, the last good checkpoint is kept."""


def check_finite_loss(value: float, stage: str, step: int, checkpoints: Checkpointer) -> None:
    """Stop training in one line at a non-finite loss (the weights it came from or goes to are not trusted)."""
    if not math.isfinite(value):
        last = checkpoints.latest()
        raise NonFiniteError(f"{stage}: the loss is {value} at step {step}: training stopped and nothing is "
                             f"committed; the last good checkpoint ({last or 'none yet'}) is kept (lower the lr or "
                             f"clip the gradients, then run again)")


def non_finite(module: nn.Module) -> list[str]:
    """Names of the floating-point tensors of a module's state dict that hold a NaN or inf."""
    state = unwrap(module).state_dict()
    names = [k for k, v in state.items() if v.is_floating_point()]
    if not names:
        return []
    finite = torch.stack([torch.isfinite(state[k]).all() for k in names]).cpu()
    return [k for k, ok in zip(names, finite.tolist(), strict=True) if not ok]


# ----------------------------------------------------------------------------------------------
# Optimizer and model wrappers.


def adamw(params, device: torch.device | str, **kwargs) -> torch.optim.AdamW:
    """AdamW, fused (one kernel for every tensor's update) on CUDA; the same update rule as the default
    multi-tensor one, and its state dict loads into either."""
    return torch.optim.AdamW(params, fused=torch.device(device).type == "cuda", **kwargs)


def optimizer_step(optimizer: torch.optim.Optimizer, parameters: Iterable[nn.Parameter],
                   grad_clip: float | None) -> torch.Tensor:
    """One optimizer step once loss.backward() is done: clip the global gradient norm to grad_clip (None or
    0: no clipping), step, zero the gradients (set to None). Returns the gradient norm before clipping, a
    tensor on the gradients' device (no device sync until it is read)."""
    parameters = [p for p in parameters if p.grad is not None]
    if grad_clip:
        norm = torch.nn.utils.clip_grad_norm_(parameters, grad_clip)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in parameters])
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside DDP / DataParallel / torch.compile wrappers (state-dict keys without
    `module.` / `_orig_mod.`)."""
    # torch.compile's wrapper class lives in torch._dynamo, which is slow to import: only look if loaded.
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif eval_frame is not None and isinstance(model, eval_frame.OptimizedModule):
            model = model._orig_mod
        else:
            return model


# ----------------------------------------------------------------------------------------------
# Weight averaging and learning rate.


class EMA:
    """Exponential moving average of a model's weights (Polyak averaging; as edm2 / timm ModelEmaV3):
    ema <- decay * ema + (1 - decay) * param, computed in fp32; buffers (e.g. running statistics)
    are copied. `module` is a frozen deep copy in eval mode, usable for evaluation and export."""

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay = decay
        self.module = copy.deepcopy(unwrap(model)).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        model = unwrap(model)
        pairs = list(zip(self.module.parameters(), model.parameters(), strict=True))
        fp32 = [(e, p.detach()) for e, p in pairs if e.dtype == p.dtype == torch.float32]
        if fp32:  # one multi-tensor kernel for all fp32 weights instead of one lerp_ per tensor
            torch._foreach_lerp_([e for e, _ in fp32], [p for _, p in fp32], 1.0 - self.decay)
        for e, p in pairs:
            if not e.dtype == p.dtype == torch.float32:  # bf16 / fp16 weights: average in fp32, round once
                e.copy_(e.float().lerp_(p.detach().float(), 1.0 - self.decay))
        for e, b in zip(self.module.buffers(), model.buffers(), strict=True):
            e.copy_(b)

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state)


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                  min_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup (Goyal et al. 2017) then cosine decay to min_ratio * lr (Loshchilov & Hutter 2017).
    The factor at step s (optimizer steps taken so far; call scheduler.step() after optimizer.step()):
      s < warmup:  (s + 1) / warmup                     -- the first step already has a non-zero lr
      s >= warmup: min_ratio + (1 - min_ratio) * (1 + cos(pi * p)) / 2,  p = (s - warmup) / (total - warmup)
    clamped at p = 1 (min_ratio) past total_steps."""
    if warmup_steps < 0 or total_steps < warmup_steps:
        raise ValueError(f"need 0 <= warmup_steps <= total_steps, got warmup_steps={warmup_steps}, "
                         f"total_steps={total_steps}")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ----------------------------------------------------------------------------------------------
# Random state.


def step_seed(seed: int, step: int, stream: int = 0, bits: int = 63) -> int:
    """The seed of one random draw at `step`: a pure function of (seed, step, stream) through numpy's
    SeedSequence, so a resumed run needs no RNG state. `stream` tells a step's draws apart (train_flow: 0
    noise, 2 label drop, 3 evaluation noise per row); SeedSequence reads a trailing 0 as absent, so stream 0
    is also the seed of (seed, step) alone (fit_decoder's noise, fit_src's code noise, sample's noise).
    bits=63: the first 64-bit word >> 1, a non-negative int64; bits=32: the first 32-bit word, the draw
    fit_src's code noise has always used (its stored SRC weights were trained with it)."""
    entropy = np.random.SeedSequence([seed, step, stream])
    if bits == 63:
        return int(entropy.generate_state(1, np.uint64)[0] >> 1)
    if bits == 32:
        return int(entropy.generate_state(1, np.uint32)[0])
    raise ValueError(f"step_seed bits must be 63 or 32, got {bits}")


def seed_all(seed: int) -> None:
    """Seed python `random`, numpy's global generator, torch CPU and every CUDA device."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Python, numpy (global), torch CPU and all CUDA generator states, as plain ints / lists / tensors
    so the dict survives torch.save + torch.load(weights_only=True). CUDA states only once CUDA is in
    use here: this never initialises CUDA (nor fails in a forked child of a CUDA process), and a
    generator CUDA has not started holds nothing to save beyond the seed."""
    version, mt, gauss_next = random.getstate()
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    return {
        "python": {"version": version, "state": list(mt), "gauss_next": gauss_next},
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
    }


def set_rng_state(state: dict) -> None:
    """Inverse of rng_state(). CUDA states are restored for the devices both the state and this
    machine have."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    npy = state["numpy"]
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        for device, cuda_state in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, device)


# ----------------------------------------------------------------------------------------------
# Checkpoints.


def record_path(checkpoint: Path) -> Path:
    """`ckpt-N.pt.json`: the checkpoint's size and CRC-32C, written after it; a checkpoint without one is
    incomplete."""
    return checkpoint.with_name(checkpoint.name + ".json")


class CountingWriter:
    """The file object torch.save streams a checkpoint into: counts and CRC-32Cs the bytes as they pass, and keeps
    the OSError of a failed write (torch reports it as `unexpected pos`, naming neither the file nor the cause)."""

    def __init__(self, f):
        self.f, self.bytes, self.crc, self.error = f, 0, 0, None

    def write(self, data) -> int:
        import crc32c

        try:
            written = self.f.write(data)
        except OSError as e:
            self.error = e
            raise
        self.bytes, self.crc = self.bytes + len(data), crc32c.crc32c(data, self.crc)
        return written

    def flush(self) -> None:
        self.f.flush()


def save_checkpoint(path: str | os.PathLike, **state) -> None:
    """torch.save(state) atomically, then its record (`record_path`: size and CRC-32C, counted as it was
    written). Values must be tensors / plain containers / numbers / strings so that load_checkpoint
    (weights_only=True) can read them back. A full disk is an OSError naming the file."""
    path, record = Path(path), {}

    def write(f) -> None:
        out = CountingWriter(f)
        try:
            torch.save(state, out)
        except RuntimeError:
            if out.error is not None:
                raise out.error from None
            raise
        record.update(bytes=out.bytes, crc32c=f"{out.crc:08x}")

    write_atomic(path, write)
    write_atomic(record_path(path), json.dumps(record))


def load_checkpoint(path: str | os.PathLike) -> dict:
    """The dict save_checkpoint wrote, tensors on the CPU, from bytes checked against its record (read once);
    weights_only=True (no code runs on load). A checkpoint without a record (written before records were, or by a
    run killed between the two renames: whole either way) is loaded unchecked, with a warning."""
    import crc32c

    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint") from None
    try:
        record = json.loads(record_path(path).read_text())
    except FileNotFoundError:
        record = None
        log.warning("%s: no record %s: loaded unchecked", path, record_path(path).name)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable record {record_path(path).name} ({type(e).__name__}); delete "
                              f"both to resume from the checkpoint before") from None
    crc = f"{crc32c.crc32c(data):08x}"
    if record is not None and (len(data), crc) != (record.get("bytes"), record.get("crc32c")):
        raise CheckpointError(f"{path}: {len(data)} bytes, checksum {crc}, recorded {record.get('bytes')} bytes, "
                              f"{record.get('crc32c')}: the checkpoint is damaged; delete it and "
                              f"{record_path(path).name} to resume from the one before")
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: unreadable checkpoint ({first_line})") from e


class Checkpointer:
    """Periodic training checkpoints `ckpt-{step:08d}.pt` in `directory`, keeping the newest `keep`.

    `step` counts optimizer steps taken. save() and restore() are called on every rank: save gathers
    each rank's RNG state and `rank_extra` (a collective when a process group is up) and rank 0 writes;
    restore reads the newest file on every rank and puts back this rank's RNG state and returns its
    rank_extra merged over `extra` (when the world size matches; else `extra` alone).
    """

    PATTERN = re.compile(r"ckpt-(\d{8,})\.pt")

    def __init__(self, directory: str | os.PathLike, every: int, keep: int = 2):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.directory, self.every, self.keep = Path(directory), every, keep

    def due(self, step: int) -> bool:
        return self.every > 0 and step > 0 and step % self.every == 0

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first (temp files `.ckpt-*.pt.tmp-*` never match)."""
        if not self.directory.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.directory.iterdir() if (m := self.PATTERN.fullmatch(p.name))]
        return [p for _, p in sorted(found)]

    def latest(self) -> Path | None:
        found = self.checkpoints()
        return found[-1] if found else None

    def save(self, step: int, model: nn.Module, ema: EMA | None, optimizer: torch.optim.Optimizer,
             scheduler=None, extra: dict | None = None, rank_extra: dict | None = None) -> Path:
        """`extra`: rank 0's plain values; `rank_extra`: each rank's own (e.g. its share of a running sum)."""
        _check_plain(extra or {}, "extra")
        bad = non_finite(model) or (non_finite(ema.module) if ema is not None else [])
        if bad:  # every rank holds the same weights: every rank stops here
            raise NonFiniteError(f"{self.directory}: the weights hold NaN/inf at step {step} (e.g. {bad[0]}): not "
                                 f"saved; the last good checkpoint ({self.latest() or 'none yet'}) is kept")
        _check_plain(rank_extra or {}, "rank_extra")
        mine = (rng_state(), rank_extra or {})
        gathered = [None] * world_size()
        if world_size() > 1:
            dist.all_gather_object(gathered, mine)
        else:
            gathered[0] = mine
        path = self.directory / f"ckpt-{step:08d}.pt"
        if rank() == 0:
            save_checkpoint(path, step=step, model=unwrap(model).state_dict(),
                            ema=ema.state_dict() if ema is not None else None,
                            optimizer=optimizer.state_dict(),
                            scheduler=scheduler.state_dict() if scheduler is not None else None,
                            rng=[r for r, _ in gathered], rank_extra=[e for _, e in gathered], extra=extra or {})
            for old in self.checkpoints()[:-self.keep]:
                old.unlink(missing_ok=True)
                record_path(old).unlink(missing_ok=True)
        return path

    def restore(self, model: nn.Module, ema: EMA | None, optimizer: torch.optim.Optimizer | None,
                scheduler=None) -> tuple[int, dict]:
        """Load the newest checkpoint into the given objects; (step, extra with this rank's rank_extra over it),
        or (0, {}) when there is none."""
        path = self.latest()
        if path is None:
            return 0, {}
        state = load_checkpoint(path)
        try:
            unwrap(model).load_state_dict(state["model"])
            if ema is not None:
                ema.load_state_dict(state["ema"])
            if optimizer is not None:
                optimizer.load_state_dict(state["optimizer"])
            if scheduler is not None:
                scheduler.load_state_dict(state["scheduler"])
        except (KeyError, RuntimeError, ValueError, TypeError) as e:
            raise CheckpointError(f"{path}: does not fit this run ({str(e).strip().splitlines()[0]})") from e
        if len(state["rng"]) != world_size():
            return state["step"], state["extra"]
        set_rng_state(state["rng"][rank()])
        return state["step"], {**state["extra"], **state.get("rank_extra", [{}] * world_size())[rank()]}


def _check_plain(value, where: str) -> None:
    """Fail at save time, not at resume, on values torch.load(weights_only=True) refuses: numpy scalars
    (np.float64 too, though it subclasses float), arrays, arbitrary objects."""
    if isinstance(value, dict):
        for k, v in value.items():
            _check_plain(k, where)
            _check_plain(v, f"{where}[{k!r}]")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
    elif not (value is None or type(value) in (bool, int, float, str) or isinstance(value, torch.Tensor)):
        raise TypeError(f"checkpoint {where} is a {type(value).__name__}; use tensors, numbers, strings, "
                        f"lists or dicts (weights_only loading refuses anything else)")


# ----------------------------------------------------------------------------------------------
# Clean stop on SIGTERM / SIGINT.


class StopSignal:
    """`with StopSignal() as stop:` -- SIGTERM / SIGINT set `stop.requested` instead of killing the
    process, so the loop can checkpoint and return. A second SIGINT raises KeyboardInterrupt. The
    previous handlers come back on exit. Outside the main thread (where Python cannot install
    handlers) it does nothing and `requested` stays False."""

    def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
        self.signals = tuple(signals)
        self.requested = False
        self.signum: int | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested, self.signum = True, signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.signals}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def agreed(self, device: torch.device | str = "cpu") -> bool:
        """`requested` on any rank (an all-reduce when a process group is up), so that all ranks stop,
        and enter save()'s collective, at the same step. Call it at the same point on every rank.
        `device` must suit the backend (the rank's GPU for NCCL)."""
        if world_size() == 1:
            return self.requested
        flag = torch.tensor([float(self.requested)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


# ----------------------------------------------------------------------------------------------
# Exported weights.


def save_safetensors(module: nn.Module, path: str | os.PathLike, metadata: dict[str, str]) -> None:
    """The module's state dict (unwrapped, on the CPU) as safetensors with string metadata, atomically."""
    bad = {k: type(v).__name__ for k, v in metadata.items() if not (isinstance(k, str) and isinstance(v, str))}
    if bad:
        raise ValueError(f"safetensors metadata must map str -> str; not strings: {bad}")
    if nan := non_finite(module):
        raise NonFiniteError(f"{path}: the weights hold NaN/inf ({len(nan)} tensors, e.g. {nan[0]}): not written, "
                             f"nothing is committed")
    state = {k: v.detach().cpu().contiguous() for k, v in unwrap(module).state_dict().items()}
    # safetensors writes by file name: the temp file's, which write_atomic then fsyncs and renames
    write_atomic(Path(path), lambda f: safetensors.torch.save_file(state, f.name, metadata=metadata))


def load_safetensors(module: nn.Module, path: str | os.PathLike) -> dict[str, str]:
    """Load a save_safetensors file into module, strictly (same names and shapes), from bytes read once and checked
    against their record in the output's `_SUCCESS.json` (pipeline.integrity.read_verified); returns its metadata."""
    try:
        data = read_verified(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such weights file") from None
    try:
        state = safetensors.torch.load(data)
        metadata = safetensors_metadata(data)
    except Exception as e:
        raise CheckpointError(f"{path}: unreadable safetensors file ({str(e).strip().splitlines()[0]})") from e
    module = unwrap(module)
    expected = module.state_dict()
    problems = []
    for what, names in (("missing", sorted(expected.keys() - state.keys())),
                        ("unexpected", sorted(state.keys() - expected.keys())),
                        ("wrong shape", [f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
                                         for k in sorted(expected.keys() & state.keys())
                                         if state[k].shape != expected[k].shape])):
        if names:
            shown = ", ".join(names[:4]) + (f", ... ({len(names)} in all)" if len(names) > 4 else "")
            problems.append(f"{what}: {shown}")
    if problems:
        raise CheckpointError(f"{path}: does not fit {type(module).__name__} ({'; '.join(problems)})")
    module.load_state_dict(state)
    return metadata


def safetensors_metadata(data: bytes) -> dict[str, str]:
    """The `__metadata__` of safetensors bytes: an 8-byte little-endian header length, then the JSON header."""
    size = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + size]).get("__metadata__") or {}
