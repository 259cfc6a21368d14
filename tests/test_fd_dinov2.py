"""FD_DINOv2 beside FID in `evaluate`: torch-fidelity's DINOv2 extractor on a local file, reference statistics keyed
by that file's sha256, every number labelled as not the paper's. A small random DINOv2 stands in for DINOv2-L/14
(it proves the code path, never an FD of the method); the backbone is held against transformers' Dinov2Model."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from torch_fidelity.feature_extractor_dinov2 import FeatureExtractorDinoV2

from pipeline.metrics.fd_dinov2 import DinoV2Extractor, check_reference_dinov2, hub_position_grid, load_dinov2
from pipeline.metrics.fidelity import load_reference, make_standin_inception_weights
from stages.runner import plan, run_pipeline
from tests.test_evaluate import BASE, colour_shift, fake_sample_output, first_train_crop_per_class


def standin_dinov2(path, seed: int = 0):
    """A 2-block, 64-wide DINOv2 ViT/14 at 518 px (a 37 x 37 position grid, as the released ones), saved with the
    hub's parameter names (timm's are the same), LayerScale at 1 so the blocks matter."""
    torch.manual_seed(seed)
    vit = timm.create_model("vit_large_patch14_dinov2", pretrained=False, num_classes=0, embed_dim=64, depth=2,
                            num_heads=1)
    state = vit.state_dict()
    for k in state:
        if k.endswith(".gamma"):
            state[k] = torch.ones_like(state[k])
    torch.save(state, path)
    return path


def test_the_backbone_equals_transformers_dinov2_and_the_forward_is_torch_fidelitys(tmp_path):
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    config = Dinov2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=1, patch_size=14, image_size=224,
                          intermediate_size=256)
    model = Dinov2Model(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(tmp_path)
    extractor = load_dinov2(tmp_path)
    assert type(extractor).forward is FeatureExtractorDinoV2.forward and isinstance(extractor, DinoV2Extractor)
    x = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        mine, theirs = extractor.model(x), model(pixel_values=x).pooler_output  # the CLS token after the final norm
    assert mine.shape == theirs.shape == (3, 64)
    assert float((mine - theirs).abs().max()) < 1e-4
    images = torch.randint(0, 256, (2, 3, 64, 48), dtype=torch.uint8)
    (features,) = extractor(images)  # torch-fidelity's resize to 224 and ImageNet normalization
    assert features.shape == (2, 64) and features.dtype == torch.float32


def test_the_position_grid_is_resampled_as_the_hub_model_does():
    """37 x 37 -> 16 x 16 with the hub's scale factor (16 + 0.1) / 37, which differs from resampling to size 16."""
    pos = torch.randn(1, 1 + 37 * 37, 8, generator=torch.Generator().manual_seed(0))
    out = hub_position_grid(pos, 16)
    assert out.shape == (1, 257, 8) and torch.equal(out[:, 0], pos[:, 0])
    by_size = F.interpolate(pos[:, 1:].reshape(1, 37, 37, 8).permute(0, 3, 1, 2), size=(16, 16), mode="bicubic")
    assert float((out[:, 1:] - by_size.permute(0, 2, 3, 1).reshape(1, 256, 8)).abs().max()) > 1e-3
    assert hub_position_grid(out, 16) is out  # the right grid already: unchanged


@pytest.fixture(scope="module")
def evaluated(module_config, tmp_path_factory):
    folder = tmp_path_factory.mktemp("fd-weights")
    inception = folder / "standin-inception.pth"
    make_standin_inception_weights(inception, seed=0)
    dinov2 = standin_dinov2(folder / "dinov2_standin.pth")
    cfg = module_config(*BASE, f"evaluate.inception_weights={inception}", f"evaluate.dinov2_weights={dinov2}")
    shard_dir = run_pipeline(cfg, until="train_flow")["shard"].dir
    crops, labels = first_train_crop_per_class(shard_dir, cfg.data.resolution)
    fake_sample_output(cfg, {0.0: colour_shift(crops), 1.0: crops}, labels, metrics={"bits_per_dim": 1.25})
    manifests = run_pipeline(cfg, only=["reference", "evaluate"])
    report = json.loads((manifests["evaluate"].dir / "metrics.json").read_text())
    return SimpleNamespace(cfg=cfg, dinov2=dinov2, manifests=manifests, report=report,
                           by_scale={e["cfg_scale"]: e for e in report["evaluations"]},
                           reference=load_reference(manifests["reference"].dir / "reference-dinov2.npz"))


def test_fd_dinov2_is_zero_for_the_reference_images_and_rises_when_they_shift(evaluated):
    own, shifted = evaluated.by_scale[1.0], evaluated.by_scale[0.0]
    trace = float(np.trace(evaluated.reference["sigma"]))
    assert abs(own["fd_dinov2"]) < 1e-3 * trace
    assert shifted["fd_dinov2"] > own["fd_dinov2"] + 0.05 * trace and math.isfinite(shifted["fd_dinov2"])
    assert all(math.isfinite(e["fid"]) for e in evaluated.report["evaluations"])  # beside the FID


def test_every_fd_dinov2_is_labelled_and_keyed_by_the_weights(evaluated):
    from pipeline.artifacts import file_sha256

    sha = file_sha256(evaluated.dinov2)
    for e in evaluated.report["evaluations"]:
        assert e["dinov2_weights_sha256"] == sha and "not a number of the SRC-Flow paper" in e["fd_dinov2_note"]
        assert e["fd_dinov2_reference"] == "train-shards" and e["fd_dinov2_extractor"] == "dinov2-64d-stand-in"
    meta = evaluated.reference["meta"]
    assert meta["dinov2_weights_sha256"] == sha and meta["num_images"] == 4
    assert evaluated.manifests["reference"].external_inputs["dinov2_weights"] == sha
    assert evaluated.manifests["evaluate"].metrics["fd_dinov2_cfg1.0"] == evaluated.by_scale[1.0]["fd_dinov2"]
    assert "FD_DINOv2" in (evaluated.manifests["evaluate"].dir / "report.md").read_text()
    with pytest.raises(ValueError, match="rebuild the reference"):
        check_reference_dinov2(evaluated.reference, "0" * 64)


def test_other_dinov2_weights_need_another_reference(evaluated, module_config, tmp_path):
    other = standin_dinov2(tmp_path / "other.pth", seed=1)
    cfg = module_config(*BASE, f"evaluate.inception_weights={evaluated.cfg.evaluate.inception_weights}",
                        f"evaluate.dinov2_weights={other}")
    planned = {p.name: p for p in plan(cfg)}
    for name in ("reference", "evaluate"):
        assert planned[name].fingerprint != evaluated.manifests[name].fingerprint and planned[name].state == "stale"
    without = {p.name: p for p in plan(module_config(*BASE, "evaluate.inception_weights="
                                                     f"{evaluated.cfg.evaluate.inception_weights}"))}
    assert "dinov2_weights" not in without["reference"].external
