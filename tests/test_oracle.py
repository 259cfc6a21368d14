"""srcflow's RAE encoders and decoder held against implementations nobody here wrote: diffusers' AutoencoderRAE and
transformers' Dinov2WithRegistersModel. Small random models (every parameter perturbed, so no zero bias, unit
LayerNorm or zero CLS token hides a wrong mapping) are saved with save_pretrained and loaded by srcflow from the
folder; srcflow's tokens (normalized with the statistics the folder carries) must equal diffusers' `encode`, its
decoder's pixels diffusers' `decode`, within TOL.

TOL (max abs difference of float32 tokens and [0, 1] pixels, values of order 1): the two sides differ by summation
order only (timm's packed qkv vs three Linears, fused vs unfused attention); measured here: tokens <= 5e-7, pixels
<= 1e-5. The normalized latents differ besides by diffusers dividing by latents_std + 1e-5 where RAE (and srcflow)
divide by sqrt(var + 1e-5) = latents_std: a relative 1e-5 / std (REL; measured 1.2e-4 absolute)."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.data.features import FeatureNormalizer, load_released_stats
from pipeline.models.rae import build_rae_decoder, build_rae_encoder, to_encoder_input, to_unit_pixels

TOL = 3e-5
REL = 1e-5 / 0.5 + 1e-5  # latents_std >= 0.5 here, + float32 rounding
WIDTH = 64  # diffusers builds 64-channel heads: one head
DECODER = dict(decoder_hidden_size=32, decoder_num_hidden_layers=2, decoder_num_attention_heads=2,
               decoder_intermediate_size=48, patch_size=2)
# per encoder type: diffusers' AutoencoderRAE arguments, and srcflow's encoder.name and encoder.arch for them, at
# RAE's input sizes (16 x 16 tokens: diffusers' decoder positions are RAE's only there, see below);
# transformers keeps SigLIP's and ViT-MAE's MLP at 3072 for any width: mlp_ratio 3072 / 64
CASES = {
    "dinov2": (dict(encoder_patch_size=14, encoder_input_size=224), "vit_base_patch14_reg4_dinov2",
               dict(patch_size=14)),
    "siglip2": (dict(encoder_patch_size=16, encoder_input_size=256, encoder_norm_mean=[0.5] * 3,
                     encoder_norm_std=[0.5] * 3), "vit_base_patch16_siglip_256", dict(patch_size=16, mlp_ratio=48.0)),
    "mae": (dict(encoder_patch_size=16, encoder_input_size=256), "vit_base_patch16_224.mae",
            dict(patch_size=16, mlp_ratio=48.0)),
}


def perturbed(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def images(n: int = 3, size: int = 40, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=sorted(CASES))
def rae_folder(request, tmp_path_factory):
    """(encoder type, the saved diffusers folder, diffusers' model, srcflow's encoder kwargs)."""
    from diffusers import AutoencoderRAE

    kind = request.param
    extra, name, arch = CASES[kind]
    grid = extra["encoder_input_size"] // extra["encoder_patch_size"]
    g = torch.Generator().manual_seed(1)
    torch.manual_seed(0)
    model = AutoencoderRAE(encoder_type=kind, encoder_hidden_size=WIDTH, encoder_num_hidden_layers=2, **DECODER,
                           latents_mean=(torch.randn(WIDTH, grid, grid, generator=g) * 0.1).tolist(),
                           latents_std=(torch.rand(WIDTH, grid, grid, generator=g) + 0.5).tolist(), **extra)
    perturbed(model, seed=2)
    folder = tmp_path_factory.mktemp(f"rae-{kind}")
    model.save_pretrained(folder)
    ours = dict(model_name=name, input_size=extra["encoder_input_size"],
                arch=dict(embed_dim=WIDTH, depth=2, num_heads=1, **arch))
    return kind, folder, model, ours


def test_encoder_tokens_equal_diffusers_encode(rae_folder):
    _, folder, model, ours = rae_folder
    encoder = build_rae_encoder(str(folder), **ours)
    pixels = images()
    normalizer = FeatureNormalizer(*load_released_stats(str(folder)))
    with torch.no_grad():
        tokens = encoder(to_encoder_input(pixels, ours["input_size"], mean=encoder.pixel_mean, std=encoder.pixel_std))
        latents = model.encode(pixels.permute(0, 3, 1, 2).float() / 255).latent  # (B, C, h, w), [0, 1] input
        their_tokens = model._denormalize_latents(latents).flatten(2).transpose(1, 2)  # diffusers' own inverse
    theirs = latents.flatten(2).transpose(1, 2)
    assert tokens.shape == theirs.shape == (3, normalizer.std.shape[0], WIDTH)
    assert float((tokens - their_tokens).abs().max()) < TOL
    assert torch.allclose(normalizer(tokens), theirs, rtol=REL, atol=TOL)
    assert float(theirs.std()) > 0.5  # not a degenerate comparison


def test_decoder_pixels_equal_diffusers_decode(rae_folder):
    _, folder, model, ours = rae_folder
    grid = ours["input_size"] // ours["arch"]["patch_size"]
    decoder = build_rae_decoder(str(folder), in_channels=WIDTH, num_tokens=grid * grid, hidden_size=32, depth=2,
                                num_heads=2, intermediate_size=48, patch_size=2,
                                pixel_mean=model.config.encoder_norm_mean or (0.485, 0.456, 0.406),
                                pixel_std=model.config.encoder_norm_std or (0.229, 0.224, 0.225))
    normalizer = FeatureNormalizer(*load_released_stats(str(folder)))
    latents = torch.randn(2, WIDTH, grid, grid, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        theirs = model.decode(latents).sample  # [0, 1] pixels, unclamped
        ours_out = decoder(normalizer.inverse(latents.flatten(2).transpose(1, 2)))
    mine = to_unit_pixels(ours_out, decoder.pixel_mean, decoder.pixel_std)
    assert mine.shape == theirs.shape == (2, 3, grid * 2, grid * 2)
    assert float((mine - theirs).abs().max()) < TOL


def test_decoder_positions_are_raes_sincos_which_diffusers_matches_on_a_16x16_grid():
    """RAE's decoder uses MAE's 2-D sin-cos positions (src/stage1/decoders/utils.py, also saved in its model.pt);
    diffusers recomputes them with base_size=16, which scales the positions by 16 / grid: equal at RAE's 16 x 16
    tokens, not at 32 x 32 (the 512 px model). srcflow computes RAE's at every grid."""
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    from pipeline.models.rae import sincos_pos_embed_2d

    def theirs(grid):
        return get_2d_sincos_pos_embed(32, grid, cls_token=True, extra_tokens=1, output_type="pt").float()

    assert torch.allclose(sincos_pos_embed_2d(32, 16), theirs(16), atol=1e-6)
    assert not torch.allclose(sincos_pos_embed_2d(32, 32), theirs(32), atol=1e-2)


def test_encoder_equals_transformers_dinov2_with_registers(tmp_path):
    """A transformers folder (config.json + model.safetensors) with a 37x37 position grid, run at 56 px: srcflow
    resamples the grid once at load exactly as transformers does at every forward (bicubic, antialiased)."""
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    torch.manual_seed(0)
    config = Dinov2WithRegistersConfig(hidden_size=WIDTH, num_hidden_layers=2, num_attention_heads=2, patch_size=14,
                                       image_size=518, intermediate_size=WIDTH * 4)
    perturbed(Dinov2WithRegistersModel(config), seed=4).save_pretrained(tmp_path)
    reference = Dinov2WithRegistersModel.from_pretrained(tmp_path).eval()
    reference.layernorm.weight = reference.layernorm.bias = None  # RAE's Dinov2withNorm
    encoder = build_rae_encoder(str(tmp_path), model_name="vit_base_patch14_reg4_dinov2", input_size=56,
                                arch=dict(embed_dim=WIDTH, depth=2, num_heads=2, patch_size=14))
    x = to_encoder_input(images(), 56)  # 4 x 4 tokens
    with torch.no_grad():
        theirs = reference(pixel_values=x).last_hidden_state[:, 5:]
        mine = encoder(x)
    assert mine.shape == theirs.shape == (3, 16, WIDTH)
    assert float((mine - theirs).abs().max()) < TOL


def test_a_folder_that_disagrees_with_the_config_is_refused_at_plan_time_naming_the_key(rae_folder, make_config):
    from stages.inputs import decoder_inputs, encoder_weights_digest

    kind, folder, _, ours = rae_folder
    arch = ours["arch"]
    grid = ours["input_size"] // arch["patch_size"]
    fitting = [f"encoder.weights={folder}", f"encoder.name={ours['model_name']}",
               f"encoder.input_size={ours['input_size']}", *(f"encoder.arch.{k}={v}" for k, v in arch.items()),
               f"decoder.weights={folder}", "decoder.hidden_size=32", "decoder.depth=2", "decoder.num_heads=2",
               "decoder.intermediate_size=48", "decoder.patch_size=2", "src.dim=4", f"data.resolution={grid * 2}"]
    cfg = make_config(*fitting)
    assert len(encoder_weights_digest(cfg)) == 64 and len(decoder_inputs(cfg)["decoder_weights"]) == 64
    # twice the input at patch 1 decodes to the same resolution: the config's shapes fit, the folder's do not
    for overrides, key in ((["encoder.arch.depth=3"], "encoder_num_hidden_layers"),
                           ([f"encoder.input_size={ours['input_size'] * 2}", "decoder.patch_size=1"],
                            "encoder_input_size"),
                           (["decoder.depth=3"], "decoder_num_hidden_layers")):
        bad = make_config(*fitting, *overrides)
        with pytest.raises(ValueError) as err:
            encoder_weights_digest(bad)
            decoder_inputs(bad)
        assert key in str(err.value) and "\n" not in str(err.value)
    other = "vit_base_patch14_reg4_dinov2" if kind != "dinov2" else "vit_base_patch16_224.mae"
    with pytest.raises(ValueError, match="encoder_type"):
        build_rae_encoder(str(folder), **{**ours, "model_name": other})
    config = json.loads((folder / "config.json").read_text())
    assert config["_class_name"] == "AutoencoderRAE"
