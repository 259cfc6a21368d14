"""Specification of the RAE pieces in pipeline/models/rae.py (tiny random models, CPU, no downloads)."""

import math

import numpy as np
import pytest
import safetensors.torch
import timm
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.models.rae import (
    DECODER_SIZES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    RAEDecoder,
    RAEEncoder,
    WeightsError,
    build_rae_decoder,
    build_rae_encoder,
    center_crop_arr,
    load_rae_decoder_state,
    sincos_pos_embed_2d,
    to_encoder_input,
    to_uint8_pixels,
    to_unit_pixels,
)

NAME = "vit_base_patch14_reg4_dinov2"
TINY = {"embed_dim": 64, "depth": 2, "num_heads": 2, "patch_size": 8}  # at input 64: 8x8 = 64 tokens x 64 channels
INPUT = 64


def tiny_timm(seed=0, input_size=INPUT):
    torch.manual_seed(seed)
    return timm.create_model(NAME, pretrained=False, img_size=input_size, num_classes=0, **TINY).eval()


def images(b=2, size=INPUT, seed=0):
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


def encode(encoder, x):
    with torch.no_grad():
        return encoder(x)


# --- pixels ----------------------------------------------------------------------------------------


def test_center_crop_arr_gives_square_uint8_rgb_for_any_shape_and_mode():
    for size, mode in [((1000, 333), "RGB"), ((333, 1000), "L"), ((130, 64), "RGBA"), ((64, 64), "CMYK")]:
        arr = center_crop_arr(Image.new(mode, size), 64)
        assert arr.shape == (64, 64, 3) and arr.dtype == np.uint8


def test_center_crop_arr_crops_the_center_when_short_side_matches():
    # 128 x 64 (w x h), size 64: no BOX step (64 < 128), scale 1 (PIL returns a copy), keep columns 32..95
    x = np.tile(np.arange(128, dtype=np.uint8)[None, :, None], (64, 1, 3))
    arr = center_crop_arr(Image.fromarray(x), 64)
    assert (arr[:, :, 0] == np.arange(32, 96)[None, :]).all()


def test_center_crop_arr_box_halves_large_images():
    # 128 x 128 with constant 2x2 blocks, size 64: one BOX halving gives the block values exactly, then scale 1
    blocks = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    arr = center_crop_arr(Image.fromarray(blocks.repeat(2, 0).repeat(2, 1)), 64)
    np.testing.assert_array_equal(arr, blocks)


def test_to_encoder_input_resizes_and_normalises_both_layouts():
    u8 = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)
    nhwc, nchw = to_encoder_input(u8, 28), to_encoder_input(u8.permute(0, 3, 1, 2), 28)
    assert nhwc.shape == (2, 3, 28, 28) and nhwc.dtype == torch.float32
    torch.testing.assert_close(nhwc, nchw, rtol=0, atol=0)
    same = to_encoder_input(u8, 32)  # no resize: exactly (x / 255 - mean) / std
    expect = (u8.permute(0, 3, 1, 2) / 255.0 - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(
        IMAGENET_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(same, expect)


def test_to_uint8_pixels_inverts_to_encoder_input():
    u8 = torch.randint(0, 256, (2, 16, 16, 3), dtype=torch.uint8)
    back = to_uint8_pixels(to_encoder_input(u8, 16))
    assert back.dtype == torch.uint8 and back.shape == u8.shape
    torch.testing.assert_close(back, u8, rtol=0, atol=0)
    clipped = to_uint8_pixels(torch.full((1, 3, 2, 2), 100.0))
    assert (clipped == 255).all()


def test_truncation_is_rae_and_adms_sample_conversion_and_rounding_the_nearest_level():
    """RAE's sample_ddp.py: rae.decode(x).clamp(0, 1).mul(255).to(uint8); ADM: ((x + 1) * 127.5).clamp(0, 255)
    .to(uint8). Both truncate: half a level below rounding on average."""
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 1.5
    unit = to_unit_pixels(x)
    rae = unit.clamp(0, 1).mul(255).to(torch.uint8).permute(0, 2, 3, 1)
    adm = ((unit * 2 - 1 + 1) * 127.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    truncated = to_uint8_pixels(x, "truncate")
    assert torch.equal(truncated, rae) and torch.equal(truncated, adm)
    rounded = to_uint8_pixels(x, "round")
    assert torch.equal(rounded, (unit.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1))
    inside = ((unit > 0) & (unit < 1)).permute(0, 2, 3, 1)  # clamped values are 0 or 255 either way
    assert 0.4 < (rounded.double() - truncated.double())[inside].mean() < 0.6
    with pytest.raises(ValueError, match="rounding"):
        to_uint8_pixels(x, "floor")


# --- encoder ---------------------------------------------------------------------------------------


def test_encoder_drops_cls_and_registers_and_reports_its_grid():
    enc = build_rae_encoder("random", input_size=INPUT, arch=TINY)
    out = encode(enc, images())
    assert out.shape == (2, (INPUT // 8) ** 2, 64)
    assert (enc.grid_size, enc.num_tokens, enc.channels, enc.input_size) == (8, 64, 64, INPUT)
    vit = tiny_timm()
    assert vit.num_prefix_tokens == 5 and vit.forward_features(images()).shape[1] == 64 + 5
    assert not enc.training and not any(p.requires_grad for p in enc.parameters())
    enc.train()
    assert not enc.training  # frozen stays in eval mode


def test_encoder_tokens_are_layer_normed_without_affine():
    out = encode(build_rae_encoder("random", input_size=INPUT, arch=TINY), images())
    torch.testing.assert_close(out.mean(-1), torch.zeros(out.shape[:2]), rtol=0, atol=1e-5)
    torch.testing.assert_close(out.var(-1, unbiased=False), torch.ones(out.shape[:2]), rtol=0, atol=1e-3)


def test_encoder_ignores_the_final_norm_affine(tmp_path):
    plain, affine = tiny_timm(), tiny_timm()
    with torch.no_grad():
        affine.norm.weight.uniform_(0.5, 2.0)
        affine.norm.bias.normal_()
    safetensors.torch.save_file(plain.state_dict(), tmp_path / "plain.safetensors")
    safetensors.torch.save_file(affine.state_dict(), tmp_path / "affine.safetensors")
    a = encode(build_rae_encoder(str(tmp_path / "plain.safetensors"), input_size=INPUT, arch=TINY), images())
    b = encode(build_rae_encoder(str(tmp_path / "affine.safetensors"), input_size=INPUT, arch=TINY), images())
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    # and it equals the patch tokens of timm's pre-norm features, layer-normed by hand
    pre = plain.blocks(plain.norm_pre(plain._pos_embed(plain.patch_embed(images()))))[:, 5:]
    torch.testing.assert_close(a, F.layer_norm(pre, (64,), eps=plain.norm.eps).detach())


def test_encoder_random_init_is_deterministic_by_seed():
    a, b, c = (build_rae_encoder("random", input_size=INPUT, arch=TINY, seed=s) for s in (0, 0, 1))
    for (k, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), k
    assert not torch.equal(encode(a, images()), encode(c, images()))


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_encoder_loads_timm_checkpoints_exactly(tmp_path, suffix):
    src = tiny_timm(seed=3)
    path = tmp_path / f"dinov2{suffix}"
    if suffix == ".safetensors":
        safetensors.torch.save_file(src.state_dict(), path)
    else:
        torch.save(src.state_dict(), path)
    expect = encode(RAEEncoder(tiny_timm(seed=3), INPUT), images())
    got = encode(build_rae_encoder(str(path), input_size=INPUT, arch=TINY), images())
    torch.testing.assert_close(got, expect, rtol=0, atol=0)


def test_encoder_resamples_pos_embed_like_timm_pretrained_overlay(tmp_path):
    # checkpoint at 64 px (8x8 grid), model at 32 px (4x4): same weights as timm's own offline path
    path = tmp_path / "dinov2.safetensors"
    safetensors.torch.save_file(tiny_timm(seed=4).state_dict(), path)
    ours = build_rae_encoder(str(path), input_size=32, arch=TINY)
    ref = timm.create_model(NAME, pretrained=True, img_size=32, num_classes=0,
                            pretrained_cfg_overlay={"file": str(path)}, **TINY).eval()
    assert ours.num_tokens == 16
    x = images(size=32)
    pre = ref.blocks(ref.norm_pre(ref._pos_embed(ref.patch_embed(x))))[:, 5:]
    torch.testing.assert_close(encode(ours, x), F.layer_norm(pre, (64,), eps=ref.norm.eps).detach())


def timm_to_hf(sd: dict, depth: int) -> dict:
    """timm reg4 names -> HF Dinov2WithRegistersModel names, written from transformers'
    convert_dinov2_with_registers_to_hf.py (create_rename_keys, read_in_q_k_v). HF keeps a CLS slot in
    position_embeddings (added to the CLS token); timm folds it into cls_token, so a zero slot is exact."""
    pos = sd["pos_embed"]
    hf = {
        "embeddings.cls_token": sd["cls_token"],
        "embeddings.mask_token": torch.zeros(1, pos.shape[-1]),
        "embeddings.position_embeddings": torch.cat([torch.zeros_like(pos[:, :1]), pos], dim=1),
        "embeddings.register_tokens": sd["reg_token"],
        "embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
        "layernorm.weight": sd["norm.weight"],
        "layernorm.bias": sd["norm.bias"],
    }
    for i in range(depth):
        t, h = f"blocks.{i}.", f"encoder.layer.{i}."
        for n in ("norm1", "norm2", "mlp.fc1", "mlp.fc2"):
            for wb in ("weight", "bias"):
                hf[h + f"{n}.{wb}"] = sd[t + f"{n}.{wb}"]
        hf[h + "layer_scale1.lambda1"] = sd[t + "ls1.gamma"]
        hf[h + "layer_scale2.lambda1"] = sd[t + "ls2.gamma"]
        for wb in ("weight", "bias"):
            hf[h + f"attention.output.dense.{wb}"] = sd[t + f"attn.proj.{wb}"]
            q, k, v = sd[t + f"attn.qkv.{wb}"].chunk(3)
            for n, part in zip(("query", "key", "value"), (q, k, v), strict=True):
                hf[h + f"attention.attention.{n}.{wb}"] = part.clone()
    return hf


def test_encoder_loads_hf_dinov2_with_registers_checkpoints(tmp_path):
    src = tiny_timm(seed=5)
    with torch.no_grad():
        for name, p in src.named_parameters():
            if "gamma" in name:
                p.normal_()  # layer scale away from its 1e-5 init, so a wrong mapping shows
    hf = timm_to_hf(src.state_dict(), TINY["depth"])
    assert len(hf) == len(src.state_dict()) + 2 * 2 * TINY["depth"] + 1  # qkv split in 3, + mask_token
    path = tmp_path / "model.safetensors"
    safetensors.torch.save_file(hf, path)
    expect = encode(RAEEncoder(src, INPUT), images())
    got = encode(build_rae_encoder(str(path), input_size=INPUT, arch=TINY), images())
    torch.testing.assert_close(got, expect, rtol=0, atol=0)


def test_encoder_loads_original_facebookresearch_dinov2_layout(tmp_path):
    # dinov2_vitb14_reg4_pretrain.pth: timm names except register_tokens, mask_token and a CLS slot in pos_embed
    src = tiny_timm(seed=6)
    sd = src.state_dict()
    sd["register_tokens"] = sd.pop("reg_token")
    sd["pos_embed"] = torch.cat([torch.zeros_like(sd["pos_embed"][:, :1]), sd["pos_embed"]], dim=1)
    sd["mask_token"] = torch.zeros(1, 64)
    torch.save(sd, tmp_path / "dinov2_reg4_pretrain.pth")
    got = encode(build_rae_encoder(str(tmp_path / "dinov2_reg4_pretrain.pth"), input_size=INPUT, arch=TINY), images())
    torch.testing.assert_close(got, encode(RAEEncoder(src, INPUT), images()), rtol=0, atol=0)


def test_encoder_missing_weights_is_one_line_naming_the_path(tmp_path):
    path = tmp_path / "nope" / "dinov2.pth"
    with pytest.raises(WeightsError) as e:
        build_rae_encoder(str(path), arch=TINY, input_size=INPUT)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"encoder.weights: {path} does not exist") and "DINOv2" in msg


@pytest.mark.parametrize("content", [b"definitely not a checkpoint", b"\x80\x02garbage" * 10])
def test_encoder_garbage_file_is_one_line(tmp_path, content):
    for name in ("junk.pth", "junk.safetensors"):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(WeightsError) as e:
            build_rae_encoder(str(tmp_path / name), arch=TINY, input_size=INPUT)
        assert "\n" not in str(e.value) and str(tmp_path / name) in str(e.value)


def test_encoder_wrong_checkpoint_names_missing_keys(tmp_path):
    sd = tiny_timm().state_dict()
    del sd["blocks.0.attn.qkv.weight"]
    torch.save(sd, tmp_path / "partial.pth")
    torch.save({"some.other.weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(WeightsError, match=r"is not a DINOv2 checkpoint: 1 expected keys missing "
                                           r"\(e\.g\. blocks\.0\.attn\.qkv\.weight\)$"):
        build_rae_encoder(str(tmp_path / "partial.pth"), arch=TINY, input_size=INPUT)
    with pytest.raises(WeightsError, match="expected keys missing") as e:
        build_rae_encoder(str(tmp_path / "other.pth"), arch=TINY, input_size=INPUT)
    assert "\n" not in str(e.value)
    wide = timm.create_model(NAME, img_size=INPUT, num_classes=0, **dict(TINY, embed_dim=96))
    torch.save(wide.state_dict(), tmp_path / "wide.pth")
    with pytest.raises(WeightsError, match="shape mismatches"):
        build_rae_encoder(str(tmp_path / "wide.pth"), arch=TINY, input_size=INPUT)


def test_file_sha256_matches_hashlib(tmp_path):
    import hashlib

    from pipeline.artifacts import file_sha256

    data = np.random.default_rng(0).bytes(3_000_001)
    (tmp_path / "f.bin").write_bytes(data)
    assert file_sha256(tmp_path / "f.bin", cache_dir=tmp_path / "digests") == hashlib.sha256(data).hexdigest()


# --- decoder ---------------------------------------------------------------------------------------

DEC = {"in_channels": 64, "hidden_size": 32, "depth": 2, "num_heads": 4, "intermediate_size": 48, "patch_size": 4,
       "num_tokens": 16}


def rae_decoder_state(a, seed=0):
    """A state dict written from RAE's GeneralDecoder / HF ViTMAELayer names and shapes
    (bytetriper/RAE stage1/decoders/decoder.py), independent of RAEDecoder."""
    g = torch.Generator().manual_seed(seed)
    W, M, P = a["hidden_size"], a["intermediate_size"], a["patch_size"] ** 2 * 3

    def r(*shape):
        return torch.randn(*shape, generator=g) * 0.2

    sd = {
        "decoder_embed.weight": r(W, a["in_channels"]), "decoder_embed.bias": r(W),
        "decoder_pos_embed": sincos_pos_embed_2d(W, math.isqrt(a["num_tokens"]))[None],
        "trainable_cls_token": r(1, 1, W),
        "decoder_norm.weight": 1 + r(W), "decoder_norm.bias": r(W),
        "decoder_pred.weight": r(P, W), "decoder_pred.bias": r(P),
    }
    for i in range(a["depth"]):
        L = f"decoder_layers.{i}."
        for n in ("layernorm_before", "layernorm_after"):
            sd[L + n + ".weight"], sd[L + n + ".bias"] = 1 + r(W), r(W)
        for n in ("attention.attention.query", "attention.attention.key", "attention.attention.value",
                  "attention.output.dense"):
            sd[L + n + ".weight"], sd[L + n + ".bias"] = r(W, W), r(W)
        sd[L + "intermediate.dense.weight"], sd[L + "intermediate.dense.bias"] = r(M, W), r(M)
        sd[L + "output.dense.weight"], sd[L + "output.dense.bias"] = r(W, M), r(W)
    return sd


def reference_decode(sd, tokens, a):
    """HF ViTMAE decoder semantics written out by hand: eager softmax attention, exact GELU, eps 1e-12."""
    W, H, p = a["hidden_size"], a["num_heads"], a["patch_size"]
    g = math.isqrt(a["num_tokens"])

    def ln(x, n):
        return F.layer_norm(x, (W,), sd[n + ".weight"], sd[n + ".bias"], eps=1e-12)

    def lin(x, n):
        return x @ sd[n + ".weight"].T + sd[n + ".bias"]

    x = lin(tokens, "decoder_embed")
    x = torch.cat([sd["trainable_cls_token"].expand(len(x), -1, -1), x], 1) + sd["decoder_pos_embed"]
    B, N, _ = x.shape
    for i in range(a["depth"]):
        L = f"decoder_layers.{i}."
        h = ln(x, L + "layernorm_before")
        q, k, v = (lin(h, L + f"attention.attention.{n}").view(B, N, H, -1).transpose(1, 2)
                   for n in ("query", "key", "value"))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(W // H), -1) @ v
        x = x + lin(att.transpose(1, 2).reshape(B, N, W), L + "attention.output.dense")
        m = F.gelu(lin(ln(x, L + "layernorm_after"), L + "intermediate.dense"))
        x = x + lin(m, L + "output.dense")
    patches = lin(ln(x, "decoder_norm"), "decoder_pred")[:, 1:]
    img = torch.empty(B, 3, g * p, g * p)
    for t in range(g * g):  # token t = (row, col); its vector is laid out (pixel row, pixel col, channel)
        r, c = divmod(t, g)
        img[:, :, r * p:(r + 1) * p, c * p:(c + 1) * p] = patches[:, t].view(B, p, p, 3).permute(0, 3, 1, 2)
    return img


def test_decoder_maps_tokens_to_normalised_pixels():
    dec = build_rae_decoder(None, **DEC)
    out = dec(torch.randn(2, 16, 64))
    assert out.shape == (2, 3, 16, 16) and not dec.training
    with pytest.raises(ValueError):
        dec(torch.randn(2, 9, 64))


def test_decoder_random_init_is_deterministic_by_seed():
    a, b, c = (build_rae_decoder("random", seed=s, **DEC) for s in (0, 0, 1))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert not torch.equal(a.decoder_embed.weight, c.decoder_embed.weight)


def test_decoder_pos_embed_is_mae_sincos_with_zero_cls_row():
    W, g = 16, 3
    pe = sincos_pos_embed_2d(W, g)
    assert pe.shape == (1 + g * g, W) and (pe[0] == 0).all()
    omega = [1 / 10000 ** (k / (W / 4)) for k in range(W // 4)]
    for t in range(g * g):
        row, col = divmod(t, g)  # MAE: first half encodes the column (meshgrid(w, h)), second the row
        expect = ([math.sin(col * w) for w in omega] + [math.cos(col * w) for w in omega]
                  + [math.sin(row * w) for w in omega] + [math.cos(row * w) for w in omega])
        torch.testing.assert_close(pe[1 + t], torch.tensor(expect), rtol=0, atol=1e-6)
    assert not any(n == "decoder_pos_embed" for n, _ in RAEDecoder(**DEC).named_parameters())  # fixed


def test_decoder_has_exactly_the_rae_key_names():
    assert set(RAEDecoder(**DEC).state_dict()) == set(rae_decoder_state(DEC))


def test_decoder_vit_xl_is_about_415m_parameters():
    with torch.device("meta"):
        dec = RAEDecoder(**DECODER_SIZES["ViT-XL"])
    assert 410e6 < sum(p.numel() for p in dec.parameters()) < 420e6


def test_decoder_loads_training_checkpoint_prefers_ema_and_reproduces_outputs(tmp_path):
    ema, model = rae_decoder_state(DEC, seed=1), rae_decoder_state(DEC, seed=2)
    prefix = "module._orig_mod."  # DDP + torch.compile
    torch.save({"ema": {prefix + k: v for k, v in ema.items()}, "model": {prefix + k: v for k, v in model.items()},
                "step": torch.tensor(7)}, tmp_path / "ckpt.pt")
    dec = build_rae_decoder(str(tmp_path / "ckpt.pt"), **DEC)
    for k, v in dec.state_dict().items():
        assert torch.equal(v, ema[k]), k
    tokens = torch.randn(2, 16, 64)
    with torch.no_grad():
        torch.testing.assert_close(dec(tokens), reference_decode(ema, tokens, DEC), rtol=1e-4, atol=1e-4)


def test_decoder_loads_an_rae_stage1_training_checkpoint_of_the_whole_model(tmp_path):
    """RAE's train_stage1.py saves {model, ema, optimizer, scheduler, disc, ...}, model and ema holding the whole
    RAE: `encoder.*` (the frozen DINOv2) beside `decoder.*`; here `model` also carries a DDP prefix."""
    ema, model = rae_decoder_state(DEC, seed=4), rae_decoder_state(DEC, seed=5)
    encoder = {"encoder.model.embeddings.patch_embeddings.projection.weight": torch.zeros(8, 3, 14, 14),
               "encoder.model.layernorm.weight": torch.ones(8)}
    wrapped = {**encoder, **{f"decoder.{k}": v for k, v in model.items()}}
    torch.save({"model": {f"module.{k}": v for k, v in wrapped.items()},
                "ema": {**encoder, **{f"decoder.{k}": v for k, v in ema.items()}},
                "optimizer": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(2)}},
                              "param_groups": [{"lr": 1e-4, "params": [0]}]},
                "scheduler": None, "disc": {"head.weight": torch.zeros(1)}, "epoch": 3}, tmp_path / "ep-0003.pt")
    dec = build_rae_decoder(str(tmp_path / "ep-0003.pt"), **DEC)
    for k, v in dec.state_dict().items():
        assert torch.equal(v, ema[k]), k  # the EMA decoder, not the raw model's nor the encoder's
    assert set(load_rae_decoder_state(str(tmp_path / "ep-0003.pt"))) == set(ema)


def test_decoder_loads_plain_release_state_dict_and_safetensors(tmp_path):
    sd = rae_decoder_state(DEC, seed=3)
    torch.save(sd, tmp_path / "model.pt")
    safetensors.torch.save_file({k: v for k, v in sd.items() if k != "decoder_pos_embed"},
                                tmp_path / "model.safetensors")  # pos embed is recomputed when absent
    a = build_rae_decoder(str(tmp_path / "model.pt"), **DEC)
    b = build_rae_decoder(str(tmp_path / "model.safetensors"), **DEC)
    tokens = torch.randn(1, 16, 64)
    with torch.no_grad():
        torch.testing.assert_close(a(tokens), b(tokens), rtol=0, atol=0)
    assert set(load_rae_decoder_state(str(tmp_path / "model.pt"))) == set(sd)


def test_decoder_weight_errors_are_one_line(tmp_path):
    sd = rae_decoder_state(DEC)
    torch.save(dict(sd, **{"decoder_layers.9.output.dense.weight": torch.zeros(1)}), tmp_path / "extra.pt")
    torch.save({k: v for k, v in sd.items() if k != "decoder_pred.weight"}, tmp_path / "short.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    cases = {
        "extra.pt": "1 unexpected keys (e.g. decoder_layers.9.output.dense.weight)",
        "short.pt": "1 expected keys missing (e.g. decoder_pred.weight)",
        "junk.pt": "could not be read",
        "absent.pt": "does not exist",
    }
    for name, needle in cases.items():
        with pytest.raises(WeightsError) as e:
            build_rae_decoder(str(tmp_path / name), **DEC)
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith(f"decoder.weights: {tmp_path / name}") and needle in msg, msg
    torch.save(sd, tmp_path / "good.pt")
    with pytest.raises(WeightsError, match=r"shape mismatches \(e\.g\. decoder_embed\.weight: checkpoint "
                                           r"\(32, 64\) vs model \(32, 48\)\)$"):
        build_rae_decoder(str(tmp_path / "good.pt"), **dict(DEC, in_channels=48))
