"""Shared fixtures: a tiny generated ImageNet and smoke configs pointing into tmp dirs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

REPO = Path(__file__).resolve().parent.parent
SMOKE = REPO / "configs" / "smoke.yaml"


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    from pipeline.data.tiny_imagenet import make_tiny_imagenet

    root = tmp_path_factory.mktemp("tiny") / "imagenet"
    make_tiny_imagenet(root, classes=4, per_class=12, val_per_class=4, size=32)
    return root


@pytest.fixture
def make_config(tmp_path, tiny_root):
    """make_config("shard.samples_per_shard=8", ...) -> the smoke config on the test dataset, in tmp."""
    from pipeline.config import load_config

    def make(*overrides: str, root: Path | None = None):
        base = [f"storage.root={tmp_path / 'artifacts'}", f"data.root={root or tiny_root}", "data.generate_tiny=null",
                "data.resolution=32", "runtime.progress=false", "shard.workers=1", "shard.samples_per_shard=16"]
        return load_config(SMOKE, base + list(overrides))

    return make
