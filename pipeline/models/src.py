"""Semantic Representation Compressor (SRC): RAE feature tokens f (B, T, C = 768) <-> compact codes
c (B, T, d ~ 32) that the flow models (SRC-FLOW.md, "The SRC"; our design where the paper is silent).

    PCA (closed form, streamed moments)   pca_from_moments(count, sum, outer_sum)
    encode  c = (P_d (f - mean) + g_enc(f) - code_mean) / code_scale      unit variance per channel
    decode  f_hat = P_d^T (c * code_scale + code_mean) + mean + g_dec(c)
    train   src_loss(f, decode(c + sigma * eps)), one constant sigma (constant-noise regularization)

P_d holds the top-d principal directions (rows) and code_scale starts at sqrt(eigenvalue_d), so the
linear path alone is PCA whitened to unit variance; "linear" is exactly that (the closed-form
baseline). "mlp" (per token) and "transformer" (over the token grid) add residual non-linear branches
g_enc, g_dec whose last layer is zero at init, so a fresh learned SRC equals the PCA map exactly.

Our choice: a learned encoder could otherwise beat the constant noise by growing its codes, so in
training mode the learned archs normalise codes with the batch's per-channel mean / std (gradients
flow through them, as BatchNorm) and track them into code_mean / code_scale (momentum
`stats_momentum`); eval mode uses those buffers. The codes the flow sees stay unit-variance.
Plain torch + timm; no storage or parallelism in here: data-parallel training swaps `batch_moments` for
one over every process's rows (as SyncBatchNorm), from the outside.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from timm.models.vision_transformer import Block
from torch import nn

from pipeline.models.rae import sincos_pos_embed_2d

ARCHS = ("linear", "mlp", "transformer")


def batch_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance of the rows of x (rows, channels)."""
    return x.mean(0), x.var(0, unbiased=False)


# ----------------------------------------------------------------------------------------------
# PCA from streamed moments (SRC-FLOW.md, "Linear baseline": out of core, closed form).


@dataclass(frozen=True)
class PCAResult:
    mean: torch.Tensor  # (C,) float64
    eigenvalues: torch.Tensor  # (C,) descending, population covariance
    components: torch.Tensor  # (C, C), row i = eigenvector of eigenvalue i
    explained_variance_ratio: torch.Tensor  # (C,) eigenvalues / their sum


def feature_moments(f: torch.Tensor) -> tuple[int, torch.Tensor, torch.Tensor]:
    """(count, sum, outer_sum) over all token vectors of f (..., C), float64; moments add across batches."""
    x = f.reshape(-1, f.shape[-1]).double()
    return x.shape[0], x.sum(0), x.T @ x


def pca_from_moments(count, sum, outer_sum) -> PCAResult:
    """PCA of the population covariance E[x x^T] - mean mean^T, in float64 (torch.linalg.eigh).
    Eigenvectors are signed so that each one's largest-magnitude entry is positive (deterministic).
    The raw-moment formula loses precision only when |mean| >> std, not the case for RAE's
    normalised features."""
    total = torch.as_tensor(sum, dtype=torch.float64)
    outer = torch.as_tensor(outer_sum, dtype=torch.float64)
    if count < 2 or total.ndim != 1 or outer.shape != (total.shape[0],) * 2:
        raise ValueError(f"expected count >= 2, sum (C,), outer_sum (C, C); got count={count}, "
                         f"sum {tuple(total.shape)}, outer_sum {tuple(outer.shape)}")
    mean = total / count
    cov = outer / count - torch.outer(mean, mean)
    eigenvalues, vectors = torch.linalg.eigh((cov + cov.T) / 2)  # ascending, columns
    eigenvalues, vectors = eigenvalues.flip(0).clamp(min=0.0), vectors.flip(1)
    components = vectors.T.contiguous()
    pivot = components.abs().argmax(dim=1, keepdim=True)
    components = components * torch.sign(components.gather(1, pivot))
    return PCAResult(mean, eigenvalues, components, eigenvalues / eigenvalues.sum())


# ----------------------------------------------------------------------------------------------
# The compressor.


class SRC(nn.Module):
    """Feature tokens (B, T, channels) <-> unit-variance codes (B, T, dim); see the module docstring.
    Build it with SRC.from_pca(pca, dim=..., arch=...); the constructor alone leaves the PCA buffers
    at placeholders (zeros / ones) for load_state_dict to fill."""

    def __init__(self, channels: int, dim: int, arch: str = "linear", hidden: int = 1024, depth: int = 2,
                 num_tokens: int = 256, heads: int = 4, stats_momentum: float = 0.01):
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"SRC arch must be one of {ARCHS}, got {arch!r}")
        if not 0 < dim <= channels:
            raise ValueError(f"SRC dim must be in [1, channels={channels}], got {dim}")
        self.config = {"channels": channels, "dim": dim, "arch": arch, "hidden": hidden, "depth": depth,
                       "num_tokens": num_tokens, "heads": heads}
        self.arch, self.stats_momentum = arch, stats_momentum
        self.batch_moments = batch_moments  # training's batch statistics (a DDP run passes a global one)
        self.register_buffer("mean", torch.zeros(channels))  # PCA mean of the features
        self.register_buffer("components", torch.zeros(dim, channels))  # P_d, rows = top-d eigenvectors
        self.register_buffer("code_mean", torch.zeros(dim))
        self.register_buffer("code_scale", torch.ones(dim))  # sqrt(eigenvalue_d) at init
        if arch != "linear":
            self.encoder = ResidualBranch(channels, dim, arch, hidden, depth, num_tokens, heads)
            self.decoder = ResidualBranch(dim, channels, arch, hidden, depth, num_tokens, heads)

    @classmethod
    def from_pca(cls, pca: PCAResult, *, dim: int, **arch) -> "SRC":
        """An SRC whose linear path is the PCA projection onto the top `dim` components, whitened."""
        eigenvalues = pca.eigenvalues[:dim]
        positive = pca.eigenvalues > 1e-10 * pca.eigenvalues[0]  # above float64 round-off of the covariance
        if not bool(positive[:dim].all()):
            raise ValueError(f"SRC dim={dim} exceeds the {int(positive.sum())} positive PCA "
                             f"eigenvalues of these features; use a smaller dim")
        model = cls(channels=pca.mean.shape[0], dim=dim, **arch)
        model.mean.copy_(pca.mean)
        model.components.copy_(pca.components[:dim])
        model.code_scale.copy_(eigenvalues.sqrt())
        return model

    def encode(self, f: torch.Tensor) -> torch.Tensor:
        """f (B, T, C) -> c (B, T, d), float32, unit variance per channel."""
        with torch.autocast(f.device.type, enabled=False):  # the PCA path in fp32 even under autocast
            raw = (f.float() - self.mean) @ self.components.T  # PCA projection P_d (f - mean)
        if self.arch == "linear":
            return (raw - self.code_mean) / self.code_scale
        raw = raw + self.encoder(f).float()
        if not self.training:
            return (raw - self.code_mean) / self.code_scale
        # Training: normalise with this batch's statistics (BatchNorm-style) and track them.
        flat = raw.reshape(-1, raw.shape[-1])
        mean, var = self.batch_moments(flat)
        with torch.no_grad():
            self.code_mean.lerp_(mean.detach(), self.stats_momentum)
            self.code_scale.lerp_(var.detach().sqrt(), self.stats_momentum)
        return (raw - mean) / (var + 1e-6).sqrt()

    def decode(self, c: torch.Tensor) -> torch.Tensor:
        """c (B, T, d) -> f_hat (B, T, C), float32."""
        # Copies: training-mode encode() updates the buffers in place, which must not touch tensors an
        # earlier forward saved for backward (e.g. under gradient accumulation).
        scale, shift = self.code_scale.clone(), self.code_mean.clone()
        with torch.autocast(c.device.type, enabled=False):
            f_hat = (c.float() * scale + shift) @ self.components + self.mean  # PCA inverse
        if self.arch != "linear":
            f_hat = f_hat + self.decoder(c).float()
        return f_hat

    def forward(self, f: torch.Tensor, sigma: float = 0.0, generator: torch.Generator | None = None,
                eps: torch.Tensor | None = None):
        """Training pass: (c, decode(c + sigma * eps)), eps drawn from `generator` unless given (a data-parallel
        rank passes its rows of the global batch's draw). One call through forward keeps DDP's hooks working."""
        c = self.encode(f)
        return c, self.decode(add_code_noise(c, sigma, generator, eps))


class ResidualBranch(nn.Module):
    """The learned correction: Linear(in -> hidden) [+ 2-D sin-cos positions], `depth` pre-norm blocks
    (timm Mlp per token for "mlp", timm ViT Block over the token grid for "transformer"), LayerNorm,
    Linear(hidden -> out) initialised to zero so the branch starts as exactly 0."""

    def __init__(self, in_features: int, out_features: int, arch: str, hidden: int, depth: int, num_tokens: int,
                 heads: int):
        super().__init__()
        self.proj_in = nn.Linear(in_features, hidden)
        if arch == "transformer":
            grid = round(num_tokens ** 0.5)
            if grid * grid != num_tokens or hidden % 4:
                raise ValueError(f"transformer SRC needs a square token grid and hidden % 4 == 0, got "
                                 f"num_tokens={num_tokens}, hidden={hidden}")
            # MAE 2-D sin-cos position embedding (as the RAE decoder), without its CLS row.
            self.register_buffer("pos_embed", sincos_pos_embed_2d(hidden, grid)[1:][None], persistent=False)
            self.blocks = nn.ModuleList([Block(hidden, heads, qkv_bias=True) for _ in range(depth)])
        else:
            self.pos_embed = None
            self.blocks = nn.ModuleList([MlpBlock(hidden) for _ in range(depth)])
        self.norm = nn.LayerNorm(hidden)
        self.proj_out = nn.Linear(hidden, out_features)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj_in(x)
        if self.pos_embed is not None:
            if h.shape[1] != self.pos_embed.shape[1]:
                raise ValueError(f"transformer SRC was built for {self.pos_embed.shape[1]} tokens, got {h.shape[1]}")
            h = h + self.pos_embed
        for block in self.blocks:
            h = block(h)
        return self.proj_out(self.norm(h))


class MlpBlock(nn.Module):
    """Pre-norm residual per-token MLP: x + Mlp(LayerNorm(x)), 4x hidden (the ViT block without attention)."""

    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.mlp = Mlp(width, 4 * width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.norm(x))


# ----------------------------------------------------------------------------------------------
# Loss and noise.


def src_loss(f: torch.Tensor, f_hat: torch.Tensor, cosine_weight: float):
    """Feature reconstruction (SRC-FLOW.md, "Learned SRC"): MSE + w * (1 - mean per-token cosine)."""
    f, f_hat = f.float(), f_hat.float()
    mse = (f_hat - f).square().mean()
    cosine = F.cosine_similarity(f_hat, f, dim=-1).mean()
    return mse + cosine_weight * (1.0 - cosine), {"mse": mse.detach(), "cosine": cosine.detach()}


def add_code_noise(c: torch.Tensor, sigma: float, generator: torch.Generator | None = None,
                   eps: torch.Tensor | None = None) -> torch.Tensor:
    """Constant-noise regularization (SRC-FLOW.md): c + sigma * eps, eps ~ N(0, I) (drawn from `generator`
    unless given), one fixed sigma on unit-variance codes (a flow has no noise-level input, so it sees one
    noise level)."""
    if sigma == 0:
        return c
    if eps is None:
        eps = torch.randn(c.shape, generator=generator, device=c.device, dtype=c.dtype)
    return c + sigma * eps
