"""Training curves: TensorBoard event files in `<stage output>/tensorboard/` and a `loss.png` at the end.

    curves = Curves(out_dir, step, images_per_step=batch_size, enabled=rank == 0)   # step: 0, or the resumed one
    with curves:
        ... curves.scalars(step, loss=..., lr=..., grad_norm=...)      # + train/images_per_s since the last call
        ... curves.validation(step, bits_per_dim=...)                  # val/<name>: held-out rows
        ... curves.image("reconstructions", step, grid)                # uint8 (H, W, 3)
        curves.write_loss_png()                                        # once training is done

`tensorboard --logdir <storage.root>/tensorboard` shows every training output by a name a person reads (`name_runs`:
the stage and the keys in which its outputs differ). A resumed run opens a new event file
with purge_step = its step + 1, so TensorBoard drops what a killed run logged after its last checkpoint.
loss.png is drawn from the event files themselves (every run of the output), so it needs no loss history
in the checkpoints. Only rank 0 writes; elsewhere every call is a no-op.
"""

from __future__ import annotations

import io
import json
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any, Self

import numpy as np

from pipeline.config import flatten
from storage_schemas.success import read_manifest, temp_name, write_atomic

DIRECTORY, LOSS_PNG, LOSS_TAG = "tensorboard", "loss.png", "train/loss"
RUNS = "tensorboard"  # <storage.root>/tensorboard/: a link to each training output's DIRECTORY, named by name_runs
NAMED_KEYS = 4  # keys in a run's name, at most


class Curves:
    def __init__(self, out_dir: Path, step: int, images_per_step: int, enabled: bool = True):
        self.out_dir, self.images_per_step = Path(out_dir), images_per_step
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: only when training

            wait_for_a_later_second(self.out_dir / DIRECTORY)
            # a resumed run: TensorBoard drops the points a killed run logged after the checkpoint of `step`
            self.writer = SummaryWriter(str(self.out_dir / DIRECTORY), purge_step=step + 1 if step else None)
        self.last_step, self.last_time = step, time.perf_counter()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def scalars(self, step: int, **values: float) -> None:
        """`train/<name>` for each value, and train/images_per_s since the previous call (or the start)."""
        now = time.perf_counter()
        rate = (step - self.last_step) * self.images_per_step / max(now - self.last_time, 1e-9)
        self.last_step, self.last_time = step, now
        if self.writer is None:
            return
        for name, value in {**values, "images_per_s": rate}.items():
            self.writer.add_scalar(f"train/{name}", float(value), step)

    def validation(self, step: int, **values: float) -> None:
        """`val/<name>` for each value: figures on held-out rows while training runs."""
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(f"val/{name}", float(value), step)

    def image(self, name: str, step: int, grid: np.ndarray) -> None:
        """An image grid, uint8 (H, W, 3), as `train/<name>`."""
        if self.writer is not None:
            self.writer.add_image(f"train/{name}", grid, step, dataformats="HWC")

    def write_loss_png(self, title: str = "") -> None:
        """loss.png: train/loss against the step, over every event file of this output."""
        if self.writer is None:
            return
        self.writer.flush()
        steps, losses = read_scalars(self.out_dir / DIRECTORY, LOSS_TAG)
        from matplotlib.figure import Figure

        fig = Figure(figsize=(5, 3.5), dpi=120)
        fig.subplots_adjust(left=0.16, right=0.97, bottom=0.14, top=0.9)
        ax = fig.add_subplot()
        ax.plot(steps, losses, lw=1.2)
        ax.set(xlabel="step", ylabel="train loss", title=title)
        ax.grid(alpha=0.3)
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        write_atomic(self.out_dir / LOSS_PNG, buf.getvalue())

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def wait_for_a_later_second(directory: Path) -> None:
    """TensorBoard reads a directory's event files in name order, and a name starts with the second the file was
    opened (events.out.tfevents.<seconds>.<host>...): a resumed run's file must not share the second of an
    earlier one, or its purge could land before the points it should drop (a resume that quick: tests)."""
    seconds = [int(p.name.split(".")[3]) for p in directory.glob("events.out.tfevents.*")
               if p.name.split(".")[3].isdigit()]
    while seconds and time.time() < max(seconds) + 1:
        time.sleep(0.05)


def read_scalars(directory: Path, tag: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one scalar tag over the event files in `directory`, as TensorBoard shows it (the
    points a resumed run purged left out)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(directory), size_guidance={"scalars": 0}).Reload()
    if tag not in events.Tags()["scalars"]:
        return [], []
    points = events.Scalars(tag)
    return [p.step for p in points], [p.value for p in points]


def semantic_chain(root: Path, stage: str, fingerprint: str) -> dict[str, Any]:
    """The semantic config of a committed output and of everything upstream of it, as dotted keys (`src.dim`)."""
    manifest = read_manifest(Path(root) / stage / fingerprint[:16])
    chain: dict[str, Any] = {}
    for name, fp in manifest.upstream.items():
        chain |= semantic_chain(root, name, fp)
    return chain | flatten(manifest.semantic_config)


def name_runs(root: Path, stage: str, running: tuple[str, dict[str, Any]] | None = None) -> None:
    """`<root>/tensorboard/<name>` -> `../<stage>/<fp16>/tensorboard` for every committed output of `stage` and the
    `running` one ((fingerprint, its semantic chain)). The name is the stage and the semantic keys (its own and its
    upstream's) whose values differ among these outputs: `fit_src src.dim=8` beside `fit_src src.dim=16`, a sweep
    point's grid keys; the first 8 digits of the fingerprint where that leaves two alike."""
    root = Path(root)
    chains = {}
    for out_dir in sorted((root / stage).glob("[!.]*")):
        try:
            fingerprint = read_manifest(out_dir).fingerprint
            chains[fingerprint] = semantic_chain(root, stage, fingerprint)
        except (OSError, ValueError):  # partial, damaged or foreign: not named
            continue
    if running is not None:
        chains[running[0]] = running[1]
    differ = sorted({k for c in chains.values() for k in c
                     if len({json.dumps(c.get(k), sort_keys=True) for c in chains.values()}) > 1})
    names = {fingerprint: " ".join([stage, *[f"{k}={run_value(chain.get(k))}" for k in differ[:NAMED_KEYS]],
                                    *(["..."] if len(differ) > NAMED_KEYS else [])])
             for fingerprint, chain in chains.items()}
    alike = Counter(names.values())
    names = {fp: f"{name} {fp[:8]}" if alike[name] > 1 else name for fp, name in names.items()}
    links = root / RUNS
    links.mkdir(exist_ok=True)
    wanted = {name: f"../{stage}/{fingerprint[:16]}/{DIRECTORY}" for fingerprint, name in names.items()}
    for link in links.iterdir():  # this stage's links that name an output otherwise, or one that is gone
        if link.is_symlink() and os.readlink(link).startswith(f"../{stage}/") and \
                wanted.get(link.name) != os.readlink(link):
            link.unlink()
    for name, target in wanted.items():
        link = links / name
        if not link.is_symlink():
            tmp = temp_name(link)
            os.symlink(target, tmp)
            os.replace(tmp, link)


def run_value(value: Any) -> str:
    """A config value as a run name shows it: lists comma-joined, paths by their last part, at most 32 characters."""
    if isinstance(value, list):
        text = ",".join(run_value(v) for v in value)
    elif isinstance(value, dict):
        text = ",".join(f"{k}:{run_value(v)}" for k, v in sorted(value.items()))
    elif isinstance(value, str) and "/" in value:
        text = value.rstrip("/").rsplit("/", 1)[-1]
    else:
        text = json.dumps(value) if not isinstance(value, str) else value
    return text.replace("/", "_")[:32]
