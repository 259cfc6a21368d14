"""What data-parallel training costs: a flow training step under DDP's default gradient buckets against the one
layout pipeline.distributed.data_parallel keeps for exact resume, and what a rank's code reader reads.

    python benchmarks/ddp.py --config configs/imagenet256.yaml --width 64 --tokens 16    # 2 gloo processes, CPU
    python benchmarks/ddp.py --config configs/imagenet256.yaml --device cuda --nproc 8   # one GPU each, NCCL

step: DDP's default rebuilds its buckets after the first step in the order gradients became ready;
find_unused_parameters=True keeps one layout for the whole run (so that a resumed run sums gradients as the
uninterrupted one) at the cost of one walk of the autograd graph per step. The flow has the config's depth (the walk
grows with the number of autograd nodes, not with the width); --width / --tokens shrink it so that on a CPU the walk
is not lost in the arithmetic. The two variants alternate in blocks of steps on the same processes; rank 0's median
step time per variant.

reader: a codes.zarr of --reader-images images x 2 views shaped like the config's codes (encode.rows_per_chunk rows
per chunk), one shuffle window of train.shuffle_window images (at most the store): the seconds and rows for rank 0 of
W to read its rows of the window (pipeline.data.codes.read_window) beside reading the whole window, both views (what
every rank read before). One JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline.config import load_config
from pipeline.models.configured import flow_arch
from pipeline.models.flow import TARFlow
from pipeline.training import adamw


def worker(rank: int, args, init: str, results) -> None:
    device = torch.device("cuda", rank) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(1)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=init, rank=rank,
                            world_size=args.nproc)
    try:
        cfg = load_config(args.config, [f"flow.width={args.width}"] if args.width else [])
        grid = cfg.encoder.input_size // (cfg.encoder.arch.patch_size or 14)
        tokens = args.tokens or grid * grid
        torch.manual_seed(0)
        flow = TARFlow(**flow_arch(cfg, tokens, cfg.src.dim, 1000)).to(device)
        optimizer = adamw(flow.parameters(), device, lr=1e-4)
        g = torch.Generator(device=device).manual_seed(rank)
        x = torch.randn(args.batch, tokens, cfg.src.dim, device=device, generator=g)
        y = torch.randint(0, 1000, (args.batch,), device=device, generator=g)
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        variants = {find_unused: torch.nn.parallel.DistributedDataParallel(
            _Loss(flow), device_ids=[device] if device.type == "cuda" else None, find_unused_parameters=find_unused)
            for find_unused in (False, True)}
        times: dict[bool, list[float]] = {False: [], True: []}
        for block in range(args.blocks):
            for find_unused, ddp in variants.items():
                for step in range(args.steps_per_block + 2):
                    sync()
                    started = time.perf_counter()
                    ddp(x, y).backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    sync()
                    if step >= 2 or block > 0:  # the first steps of each DDP build and rebuild its buckets
                        times[find_unused].append(time.perf_counter() - started)
        results[rank] = {str(k).lower(): statistics.median(v) for k, v in times.items()}
        if rank == 0:
            results["params_m"] = sum(p.numel() for p in flow.parameters()) / 1e6
            results["layers"] = sum(len(b.layers) for b in flow.blocks)
            results["tokens"] = tokens
    finally:
        dist.destroy_process_group()


class _Loss(torch.nn.Module):
    def __init__(self, flow: TARFlow):
        super().__init__()
        self.flow = flow

    def forward(self, x, y):
        return self.flow.nll_per_dim(x, y)


def reader(cfg, images: int, worlds: list[int], directory: str) -> dict:
    import numpy as np

    from pipeline.data.batches import WindowShuffle
    from pipeline.data.codes import TrainCodes, read_window
    from pipeline.data.zarr_store import create_row_store, write_rows, write_small_array
    from storage_schemas.zarr_layouts import CODES

    grid = cfg.encoder.input_size // (cfg.encoder.arch.patch_size or 14)
    tokens, dim, rows, chunk = grid * grid, cfg.src.dim, 2 * images, cfg.encode.rows_per_chunk
    store = os.path.join(directory, "codes.zarr")
    create_row_store(store, CODES, rows, rows_per_shard=cfg.encode.rows_per_shard, rows_per_chunk=chunk,
                     row_shapes={"codes": ((tokens, dim), "float32")},
                     attrs={"features_fingerprint": "bench", "src_fingerprint": "bench", "views": ["plain", "flip"],
                            "splits": {"train": [0, rows], "val": [rows, rows]}, "grid_size": grid})
    rng = np.random.default_rng(0)
    for start in range(0, rows, 1024):
        n = min(1024, rows - start)
        write_rows(store, start, {"codes": rng.standard_normal((n, tokens, dim), dtype=np.float32),
                                  "labels": np.zeros(n, np.int32), "key": np.array([f"k{i}" for i in range(n)]),
                                  "view": (np.arange(n) % 2).astype(np.uint8), "split": np.zeros(n, np.uint8)})
    write_small_array(store, "code_mean", np.zeros(dim), ("code_channel",))
    write_small_array(store, "code_std", np.ones(dim), ("code_channel",))
    data = TrainCodes(store, in_memory_limit_gb=0.0)
    window, out = min(cfg.train.shuffle_window, images), {}

    def whole_window(schedule) -> int:  # both views of every image, one slice per run of consecutive images
        whole = np.sort(schedule.permutation(0)[:schedule.window])
        for run in np.split(whole, np.flatnonzero(np.diff(whole) != 1) + 1):
            data.group["codes"][2 * run[0]:2 * (run[-1] + 1)]
        return 2 * len(whole)

    def timed(fn) -> tuple[float, object]:
        started = time.perf_counter()
        result = fn()
        return time.perf_counter() - started, result

    for world in worlds:
        schedule = WindowShuffle(images, cfg.train.batch_size, 0, 0, world, block=data.block, window=window)
        whole_window(schedule)  # the store in the page cache, as both are measured warm
        mine, whole = [], []
        for _ in range(3):  # alternating, medians
            mine.append(timed(lambda: read_window(data, schedule, 0, (0, 0), range(10**9))))  # noqa: B023
            whole.append(timed(lambda: whole_window(schedule)))  # noqa: B023
        rows, values = mine[0][1]
        out[str(world)] = {"rows": len(rows), "mb": round(values.nbytes / 1e6, 1),
                           "seconds": round(statistics.median(t for t, _ in mine), 4),
                           "whole_window_rows": whole[0][1],
                           "whole_window_seconds": round(statistics.median(t for t, _ in whole), 4)}
    return {"images": images, "window": window, "tokens": tokens, "channels": dim, "rows_per_chunk": chunk,
            "batch": cfg.train.batch_size, "per_world": out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/smoke.yaml")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--width", type=int, default=None, help="flow.width override (default: the config's)")
    ap.add_argument("--tokens", type=int, default=None, help="tokens per sample (default: the encoder's grid)")
    ap.add_argument("--batch", type=int, default=4, help="per process")
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--steps-per-block", type=int, default=5)
    ap.add_argument("--reader-images", type=int, default=4096, help="images of the reader's store (0: no reader)")
    ap.add_argument("--reader-worlds", type=int, nargs="+", default=[1, 8, 64])
    args = ap.parse_args()
    results = mp.Manager().dict()
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(worker, args=(args, f"file://{os.path.join(tmp, 'pg')}", results), nprocs=args.nproc,
                           start_method="spawn" if args.device == "cuda" else "fork")
        read = reader(load_config(args.config), args.reader_images, args.reader_worlds, tmp) \
            if args.reader_images else None
    default, one_layout = results[0]["false"], results[0]["true"]
    print(json.dumps({
        "benchmark": "ddp", "config": args.config, "device": torch.cuda.get_device_name(0) if args.device == "cuda"
        else "cpu", "torch": torch.__version__, "world_size": args.nproc, "params_m": round(results["params_m"], 3),
        "layers": results["layers"], "tokens": results["tokens"], "batch_per_process": args.batch,
        "step_seconds_default": round(default, 5), "step_seconds_find_unused": round(one_layout, 5),
        "find_unused_overhead_seconds": round(one_layout - default, 5),
        "find_unused_overhead_ratio": round(one_layout / default, 4),
        "per_rank": {r: results[r] for r in range(args.nproc)}, "reader": read}))


if __name__ == "__main__":
    main()
