"""FD_DINOv2: the Frechet distance in DINOv2-L/14 feature space (Stein et al. 2023, "Exposing flaws of generative
model evaluation metrics"; EDM2 reports it beside FID), through torch-fidelity's DINOv2 extractor and a local file.

torch-fidelity 0.4.0 registers "dinov2-vit-l-14" (FeatureExtractorDinoV2): uint8 images, TF1-compatible bilinear
resize to 224, ImageNet mean/std, the backbone's CLS token after its final norm (1024-d). It builds the backbone
only with torch.hub from GitHub (facebookresearch/dinov2 code and weights, downloaded) and raises
NotImplementedError for `feature_extractor_weights_path`. `DinoV2Extractor` is that extractor with its forward
unchanged and the backbone built here: timm's ViT with DINOv2's layout (the hub's dinov2_vitl14 parameter names)
from a local file (facebookresearch's dinov2_vitl14_pretrain.pth, a timm or transformers state dict, or a
transformers Dinov2Model folder). Its position grid (37 x 37 at 518 px) is resampled once to 224 px as the hub
model does at every forward (dinov2/models/vision_transformer.py interpolate_pos_encoding: bicubic, scale factor
(16 + 0.1) / 37, no antialias; hub defaults interpolate_offset 0.1, interpolate_antialias False).

The reference statistics (mu, sigma over the reference images' features) are stored beside the Inception ones,
keyed by the weights' sha256. The SRC-Flow paper reports no FD_DINOv2: these numbers are never the paper's.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.feature_extractor_dinov2 import FeatureExtractorDinoV2
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

from pipeline.metrics.fidelity import fid_statistics

INPUT_SIZE = FeatureExtractorDinoV2.INPUT_IMAGE_SIZE  # 224
HUB_INTERPOLATE_OFFSET = 0.1
LABEL = "not a number of the SRC-Flow paper (it reports gFID only)"
# torch-fidelity's names by width: DINOv2-S/B/L/g are 384/768/1024/1536 wide with 64-channel heads
EXTRACTOR_NAMES = {384: "dinov2-vit-s-14", 768: "dinov2-vit-b-14", 1024: "dinov2-vit-l-14"}
WEIGHTS_EXPECTED = ("DINOv2-L/14: facebookresearch's dinov2_vitl14_pretrain.pth, or a timm / transformers state "
                    "dict or Dinov2Model folder")


class DinoV2Extractor(FeatureExtractorDinoV2):
    """torch-fidelity's DINOv2 extractor (its forward: resize, normalize, backbone) on a backbone from a local file."""

    def __init__(self, backbone: torch.nn.Module, name: str):
        FeatureExtractorBase.__init__(self, name, ["dinov2"])  # not FeatureExtractorDinoV2's: that one downloads
        self.feature_extractor_internal_dtype = torch.float32
        self.model = backbone
        self.requires_grad_(False)
        self.eval()


def load_dinov2(weights: str | Path, device="cpu", meta: bool = False) -> DinoV2Extractor:
    """The extractor on the DINOv2 ViT in `weights` (architecture read from its shapes: patch 14, 64-channel heads,
    LayerScale); device "meta": only check that the file is such a network (no weights read)."""
    import timm

    from pipeline.integrity import read_input
    from pipeline.models.rae import check_state_dict, hf_to_timm, read_state_dict

    path = weights_file(weights)
    data = None if meta else read_input(path, "evaluate.dinov2_weights")  # read once, checked against the plan's sha256
    state = hf_to_timm(read_state_dict(str(path), "evaluate.dinov2_weights", WEIGHTS_EXPECTED, meta, data))
    state.pop("mask_token", None)
    try:
        width, depth = state["patch_embed.proj.weight"].shape[0], 1 + max(
            int(k.split(".")[1]) for k in state if k.startswith("blocks."))
        mlp_ratio = state["blocks.0.mlp.fc1.weight"].shape[0] / width
    except (KeyError, ValueError) as e:
        raise ValueError(f"evaluate.dinov2_weights: {weights} is not a DINOv2 ViT ({type(e).__name__}: {e}); "
                         f"expected {WEIGHTS_EXPECTED}") from None
    with torch.device("meta" if meta else "cpu"):
        vit = timm.create_model("vit_large_patch14_dinov2", pretrained=False, img_size=INPUT_SIZE, num_classes=0,
                                embed_dim=width, depth=depth, num_heads=max(width // 64, 1), mlp_ratio=mlp_ratio)
    if "pos_embed" in state:
        state["pos_embed"] = hub_position_grid(state["pos_embed"], vit.patch_embed.grid_size[0])
    check_state_dict(state, vit.state_dict(), "evaluate.dinov2_weights", str(weights), "a DINOv2 ViT")
    if not meta:
        vit.load_state_dict(state, strict=True)
    name = EXTRACTOR_NAMES.get(width, f"dinov2-{width}d-stand-in")
    extractor = DinoV2Extractor(vit, name)
    return extractor if meta else extractor.to(device)


def weights_file(weights: str | Path) -> Path:
    """The file of `evaluate.dinov2_weights`: itself, or a transformers folder's model.safetensors."""
    path = Path(weights)
    return path / "model.safetensors" if path.is_dir() else path


def hub_position_grid(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """(1, 1 + M*M, C) position embeddings -> (1, 1 + grid*grid, C) as the hub DINOv2 interpolates them."""
    m = math.isqrt(pos_embed.shape[1] - 1)
    if m == grid or pos_embed.device.type == "meta":
        return pos_embed if m == grid else pos_embed.new_empty((1, 1 + grid * grid, pos_embed.shape[2]))
    scale = (grid + HUB_INTERPOLATE_OFFSET) / m
    patches = pos_embed[:, 1:].float().reshape(1, m, m, -1).permute(0, 3, 1, 2)
    patches = F.interpolate(patches, scale_factor=(scale, scale), mode="bicubic", antialias=False)
    patches = patches.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)
    return torch.cat([pos_embed[:, :1].float(), patches], dim=1).to(pos_embed.dtype)


def dinov2_features(extractor: DinoV2Extractor, images: np.ndarray, device) -> np.ndarray:
    """(B, H, W, 3) uint8 images -> (B, C) float64 features, torch-fidelity's forward."""
    x = torch.from_numpy(np.array(images)).permute(0, 3, 1, 2).contiguous().to(device)
    with torch.no_grad():
        (features,) = extractor(x)
    return features.double().cpu().numpy()


def fd_dinov2(features: np.ndarray, reference: dict) -> float:
    """The Frechet distance of the samples' features to the reference mu/sigma, float64 (torch-fidelity's)."""
    stats = {"mu": reference["mu"], "sigma": reference["sigma"]}
    if stats["mu"].shape != (features.shape[1],):
        raise ValueError(f"the DINOv2 reference has {stats['mu'].shape[0]}-d statistics, the samples "
                         f"{features.shape[1]}-d features")
    return float(fid_statistics_to_metric(fid_statistics(features), stats, False)[KEY_METRIC_FID])


def check_reference_dinov2(reference: dict, weights_sha256: str) -> None:
    ref_sha = reference["meta"].get("dinov2_weights_sha256")
    if ref_sha != weights_sha256:
        raise ValueError(f"the DINOv2 reference statistics come from weights sha256 {str(ref_sha)[:12]}.., "
                         f"evaluate.dinov2_weights is {weights_sha256[:12]}..; rebuild the reference stage")
