"""Shared fixtures: a tiny generated ImageNet and smoke configs pointing into tmp dirs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tiny models on 2 shared cores: one intra-op thread is several times faster than two spinning ones.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

REPO = Path(__file__).resolve().parent.parent
SMOKE = REPO / "configs" / "smoke.yaml"


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tiny models are dominated by per-op overhead: one intra-op thread is faster and immune to a busy CPU."""
    import torch

    torch.set_num_threads(1)


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
