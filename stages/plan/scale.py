"""The machines a plan is for (nodes x processes per node), and what DDP's gradient all-reduce costs on them."""

from __future__ import annotations

import math
from dataclasses import dataclass

from pipeline.config import Config, torchrun_nodes

# NCCL all-reduce bus bandwidth (GB/s) per GPU: within a node, NVLink 4 (H100/H200 SXM: 450 GB/s each way;
# nccl-tests reach ~360); across nodes, one 400 Gb/s NDR InfiniBand rail per GPU (50 GB/s; ~45 reached).
INTRA_NODE_GBS, INTER_NODE_GBS = 360.0, 45.0


@dataclass(frozen=True)
class Scale:
    """The machines a plan is for: `nodes` nodes of `per_node` processes (one per GPU)."""

    nodes: int
    per_node: int
    source: str
    intra_node_gbs: float = INTRA_NODE_GBS
    inter_node_gbs: float = INTER_NODE_GBS

    @property
    def gpus(self) -> int:
        return self.nodes * self.per_node

    def local_batch(self, batch: int) -> int:
        """A training step's images per process: the global batch over every process of every node."""
        return math.ceil(batch / self.gpus)

    def allreduce_seconds(self, nbytes: int) -> tuple[float, str]:
        """Ring all-reduce of `nbytes` over all processes: each sends and receives 2 (G - 1) / G x nbytes at the
        bus bandwidth of the slowest link (across nodes when there are several)."""
        if self.gpus <= 1:
            return 0.0, "one process: nothing to reduce"
        gbs, link = ((self.inter_node_gbs, f"{self.inter_node_gbs:g} GB/s per GPU across nodes (one 400 Gb/s NDR "
                                           "rail per GPU, assumed)") if self.nodes > 1 else
                     (self.intra_node_gbs, f"{self.intra_node_gbs:g} GB/s within a node (NVLink 4, assumed)"))
        traffic = 2 * (self.gpus - 1) / self.gpus * nbytes
        how = f"ring all-reduce: 2 x {self.gpus - 1}/{self.gpus} x {nbytes / 1e9:.2f} GB at {link}"
        return traffic / (gbs * 1e9), how


def scale_of(cfg: Config, gpus: int | None = None, nodes: int | None = None) -> Scale:
    """`--gpus G --nodes N` when given (G / N processes per node), else the config's: runtime.nproc processes on
    each of train.torchrun_args' --nnodes nodes (1 without it)."""
    configured = torchrun_nodes(cfg.train.torchrun_args)
    nodes = nodes or configured
    if gpus is None:
        return Scale(nodes, cfg.runtime.nproc, f"runtime.nproc={cfg.runtime.nproc} per node x {nodes} node(s)"
                                               + (" (train.torchrun_args --nnodes)" if configured > 1 else ""))
    if gpus < 1 or nodes < 1 or gpus % nodes:
        raise ValueError(f"--gpus {gpus} must be a positive multiple of --nodes {nodes} (GPUs per node x nodes)")
    return Scale(nodes, gpus // nodes, f"--gpus {gpus} --nodes {nodes}")
