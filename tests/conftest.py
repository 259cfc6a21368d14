"""Shared fixtures: a tiny generated ImageNet, smoke configs pointing into tmp dirs, and stores built once per session
and copied per use."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

# Tiny models on 2 shared cores: one intra-op thread is several times faster than two spinning ones.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

REPO = Path(__file__).resolve().parent.parent
SMOKE = REPO / "configs" / "smoke.yaml"

# The `stores` configs: the test dataset (4 classes x 12 train + 4 val, 32 px, two views: 96 train rows, 32 val rows)
# through the smoke encoder (8 x 8 tokens of 64 channels), a tiny random RAE decoder with 32 px output, and a small
# SRC so that every fit takes seconds.
UPSTREAM = ("runtime.device=cpu", "encode.rows_per_shard=8", "encode.rows_per_chunk=4", "decoder.hidden_size=32",
            "decoder.depth=1", "decoder.num_heads=2", "decoder.intermediate_size=64")
SRC = ("src.dim=6", "src.hidden=32", "src.depth=1", "src.steps=12", "src.batch_size=16", "src.warmup_steps=3",
       "src.report_images=8", "src.eval_batch_size=4", "src.ckpt_every=5", "src.log_every=5")


def flip_byte(path: Path, offset: int) -> None:
    """XOR one byte of a file in place, keeping its size and mtime (what bit rot or a bad copy leaves behind)."""
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def byte_in_row(store: Path, name: str, row: int) -> tuple[Path, int]:
    """The shard file of row-store array `name` that holds `row`, and the offset of a byte in the middle of that row
    (for flip_byte; the direct writer's layout: inner chunks back to back, each followed by its CRC-32C)."""
    import numpy as np
    import zarr

    arr = zarr.open_group(str(store), mode="r")[name]
    unit, chunk, row_bytes = arr.shards[0], arr.chunks[0], arr.dtype.itemsize * int(np.prod(arr.shape[1:]))
    k, r = divmod(row, unit)
    offset = r // chunk * (chunk * row_bytes + 4) + r % chunk * row_bytes + row_bytes // 2
    return Path(store) / name / arr.metadata.encode_chunk_key((k,) + (0,) * (arr.ndim - 1)), offset


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tiny models are dominated by per-op overhead: one intra-op thread is faster and immune to a busy CPU."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def seeded_random(request):
    """Python's `random` seeded by the test's id: a test that draws a kill point draws the same one on every run,
    so a failure reproduces."""
    random.seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    from pipeline.data.tiny_imagenet import make_tiny_imagenet

    root = tmp_path_factory.mktemp("tiny") / "imagenet"
    make_tiny_imagenet(root, classes=4, per_class=12, val_per_class=4, size=32)
    return root


def smoke_overrides(storage: Path, tiny_root: Path, root: Path | None = None) -> list[str]:
    """The overrides that point the smoke config at the test dataset (or `root`) and a store under `storage`."""
    return [f"storage.root={storage}", f"data.root={root or tiny_root}", "data.generate_tiny=null",
            # the stand-in Inception weights: written once per session, next to the test dataset
            f"evaluate.inception_weights={tiny_root.parent / 'standin-inception.pth'}",
            "data.resolution=32", "decoder.patch_size=4", "runtime.progress=false", "shard.workers=1",
            "shard.samples_per_shard=16"]


def config_factory(storage: Path, tiny_root: Path):
    """factory("shard.samples_per_shard=8", ...) -> the smoke config on the test dataset, stored under `storage`."""
    from pipeline.config import load_config

    def make(*overrides: str, root: Path | None = None):
        return load_config(SMOKE, smoke_overrides(storage, tiny_root, root) + list(overrides))

    return make


@pytest.fixture
def make_config(tmp_path, tiny_root):
    return config_factory(tmp_path / "artifacts", tiny_root)


@pytest.fixture(scope="module")
def module_config(tmp_path_factory, tiny_root):
    """Like make_config, but one artifact store per test module, so tests can share upstream outputs."""
    return config_factory(tmp_path_factory.mktemp("artifacts"), tiny_root)


@pytest.fixture(scope="session")
def prebuilt(tmp_path_factory):
    """prebuilt(cfg, until="encode") -> cfg, whose store now holds every output of cfg through `until`.

    Each output is built once per session, in one shared store (outputs are found by fingerprint, so configs that
    agree up to a stage share it), and copied into cfg.storage.root. A copy is plain files: a test may damage,
    extend or move its store without touching the shared one or another test's copy.
    """
    from stages.runner import run_pipeline

    shared = tmp_path_factory.mktemp("prebuilt") / "store"

    def copy(cfg, until: str = "encode"):
        in_shared = cfg.model_copy(update={"storage": cfg.storage.model_copy(update={"root": str(shared)})})
        for manifest in run_pipeline(in_shared, until=until).values():
            target = Path(cfg.storage.root) / manifest.dir.relative_to(shared)
            if not target.exists():
                shutil.copytree(manifest.dir, target)
        return cfg

    return copy


@pytest.fixture(scope="session")
def random_decoder(tmp_path_factory, tiny_root) -> Path:
    """A random RAE decoder file (seed 1) of the `stores` decoder architecture."""
    import torch

    from pipeline.models.configured import decoder_arch
    from pipeline.models.rae import build_rae_decoder

    path = tmp_path_factory.mktemp("decoder") / "decoder.pt"
    cfg = config_factory(tmp_path_factory.mktemp("unused"), tiny_root)(*UPSTREAM)
    torch.save(build_rae_decoder(None, seed=1, **decoder_arch(cfg)).state_dict(), path)
    return path


@pytest.fixture(scope="session")
def stores(prebuilt, random_decoder, tiny_root, tmp_path_factory):
    """`stores(name, *overrides, until="encode")` -> the UPSTREAM + SRC config (with `random_decoder`) in a fresh
    root named after `name`, already holding every stage through `until` (see `prebuilt`)."""
    def make(name: str, *overrides: str, until: str = "encode"):
        storage = tmp_path_factory.mktemp(name) / "store"
        cfg = config_factory(storage, tiny_root)(*UPSTREAM, f"decoder.weights={random_decoder}", *SRC, *overrides)
        return prebuilt(cfg, until)

    return make


@pytest.fixture(scope="session")
def prefect_home(tmp_path_factory) -> Path:
    """One migrated Prefect database for the session's subprocess runs: each ephemeral server that a test starts
    then skips the migrations (seconds each, and slower still when two servers start at once)."""
    home = tmp_path_factory.mktemp("prefect-home")
    env = {**os.environ, "PREFECT_HOME": str(home)}
    env.pop("PREFECT_API_URL", None)
    prefect = str(Path(sys.executable).with_name("prefect"))
    subprocess.run([prefect, "server", "database", "upgrade", "-y"], env=env, check=True, capture_output=True,
                   timeout=300)
    return home
