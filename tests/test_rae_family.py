"""RAE's encoder family as configs: DINOv2-S/B/L with registers, SigLIP2-B, MAE-B, each with RAE's input size and a
ViT-XL decoder; `srcflow plan` sizes each from the architecture alone (no weights needed)."""

from __future__ import annotations

import pytest
import torch

from pipeline.config import ConfigError, load_config
from pipeline.models.configured import build, encoder_geometry, pixel_norm
from pipeline.models.rae_family import ENCODERS
from tests.conftest import REPO

VARIANTS = {  # config -> (timm name, tokens, channels, encoder depth), as RAE publishes them
    "imagenet256": ("vit_base_patch14_reg4_dinov2", 256, 768, 12),
    "imagenet256-dinov2-s": ("vit_small_patch14_reg4_dinov2", 256, 384, 12),
    "imagenet256-dinov2-l": ("vit_large_patch14_reg4_dinov2", 256, 1024, 24),
    "imagenet256-siglip2-b": ("vit_base_patch16_siglip_256", 256, 768, 12),
    "imagenet256-mae-b": ("vit_base_patch16_224.mae", 256, 768, 12),
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_each_variant_config_builds_raes_encoder_and_a_vit_xl_decoder(name):
    cfg = load_config(REPO / "configs" / f"{name}.yaml")
    timm_name, tokens, channels, depth = VARIANTS[name]
    assert cfg.encoder.name == timm_name
    grid, width = encoder_geometry(cfg)
    assert (grid * grid, width) == (tokens, channels)
    encoder = build("encoder", cfg)  # the meta device: shapes only
    assert (encoder.num_tokens, encoder.channels, len(encoder.vit.blocks)) == (tokens, channels, depth)
    decoder = build("decoder", cfg)
    assert (decoder.in_channels, decoder.decoder_embed.out_features, len(decoder.decoder_layers)) == (
        channels, 1152, 28)
    assert grid * decoder.patch_size == cfg.data.resolution == 256
    # everything but the encoder and its decoder weights is imagenet256.yaml's
    base = load_config(REPO / "configs" / "imagenet256.yaml")
    assert cfg.flow == base.flow and cfg.train == base.train and cfg.src == base.src and cfg.shard == base.shard


def test_plan_sizes_each_variant_by_its_channels():
    from stages.plan import capacity_plan

    features = {}
    for name in VARIANTS:
        plan = capacity_plan(load_config(REPO / "configs" / f"{name}.yaml"))
        (encode,) = [s for s in plan["stages"] if s["stage"] == "encode"]
        features[name] = next(o["bytes"] for o in encode["outputs"] if o["path"] == "features.zarr/features")
    base = features["imagenet256"]
    assert features["imagenet256-dinov2-s"] == pytest.approx(base / 2, rel=0.01)
    assert features["imagenet256-dinov2-l"] == pytest.approx(base * 4 / 3, rel=0.01)
    assert features["imagenet256-siglip2-b"] == features["imagenet256-mae-b"] == base


def test_siglip2_normalizes_pixels_by_one_half_and_the_others_by_imagenet_statistics():
    for name in VARIANTS:
        cfg = load_config(REPO / "configs" / f"{name}.yaml")
        mean, std = pixel_norm(cfg)
        assert (mean, std) == (((0.5,) * 3, (0.5,) * 3) if "siglip" in name else
                               ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)))
        assert build("decoder", cfg).pixel_mean == mean


def test_prefix_tokens_are_dropped_per_type():
    """DINOv2: CLS + 4 registers; SigLIP: none; MAE: CLS: the tokens are the patch grid in every case."""
    from pipeline.models.rae import build_rae_encoder

    arch = dict(embed_dim=32, depth=1, num_heads=2)
    for name, shape in ENCODERS.items():
        encoder = build_rae_encoder("random", model_name=name, input_size=shape.patch_size * 3,
                                    arch={**arch, "patch_size": shape.patch_size})
        out = encoder(torch.zeros(1, 3, shape.patch_size * 3, shape.patch_size * 3))
        assert out.shape == (1, 9, 32), name
        expected = {"dinov2": 5, "siglip2": 0, "mae": 1}[shape.type]
        assert encoder.vit.num_prefix_tokens == expected, name


def test_an_unknown_encoder_and_a_looping_extends_are_refused_in_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"encoder\.name: 'vit_huge_patch14_dinov2' is not an RAE encoder"):
        load_config(None, ["encoder.name=vit_huge_patch14_dinov2"])
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match="loops back"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("extends: missing.yaml\n")
    with pytest.raises(ConfigError, match=r"missing\.yaml does not exist"):
        load_config(tmp_path / "c.yaml")
