"""Class-conditional TARFlow / STARFlow over compact code tokens: SRC-Flow's generative model.

A stack of affine autoregressive flow blocks (TARFlow, Zhai et al. 2024; STARFlow, Gu et al.
2025) maps code tokens x (B, T, D) to Gaussian noise z of the same shape. Each block is a
causal transformer over the token sequence that predicts (mu_t, a_t) from x_<t; the token order
is flipped between blocks. Sampling inverts the blocks one token at a time, with a KV cache.

Choices where the papers leave room (see SRC-FLOW.md, "TARFlow / STARFlow"):
- blocks are numbered data -> noise; block i reads tokens in reverse order when i is odd;
- deep-shallow layout: `num_blocks` counts all blocks; the last one (nearest the Gaussian) has
  `deep_layers` layers and is the only conditioned block (STARFlow); otherwise every block is
  conditioned (TARFlow);
- CFG is applied in the conditioned blocks only: every block for TARFlow's layout, the deep
  block for STARFlow's; both branches read the same guided prefix x_<t;
- `soft_clip` bounds the log-scale head a only (STARFlow's code clips both heads);
- the prefix condition is one label token; the null label has its own learned embedding.
"""

import math

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from torch import nn

INV_SOFTPLUS_1 = math.log(math.expm1(1.0))  # softplus^-1(1) = log(e - 1), so a = 0 gives sigma = 1


def bits_per_dim(nll_per_dim_nats):
    """Convert an NLL per dimension from nats to bits (divide by ln 2).

    Convention: the codes are continuous, so there is no dequantization offset (no uniform noise,
    no + log 256 term); this is the density of the (noise-regularized) codes per dimension,
    expressed in bits as TARFlow reports its NLL.
    """
    return nll_per_dim_nats / math.log(2.0)


# TARFlow CFG, linear on both heads: mu <- mu_c + w(mu_c - mu_u), a <- a_c + w(a_c - a_u).
def cfg_tarflow(mu_c, a_c, mu_u, a_u, w):
    return mu_c + w * (mu_c - mu_u), a_c + w * (a_c - a_u)


# STARFlow CFG, the Gaussian of p_c^(1+w) / p_u^w: s = min(sig_c/sig_u, 1)^2,
# sig = sig_c / sqrt(1 + w - w s), mu = ((1+w) mu_c - w s mu_u) / (1 + w - w s).
def cfg_starflow(mu_c, sig_c, mu_u, sig_u, w):
    s = (sig_c / sig_u).clamp(max=1.0).square()
    d = 1 + w - w * s
    return ((1 + w) * mu_c - w * s * mu_u) / d, sig_c / d.sqrt()


def tweedie_denoise(model, x, y, sigma):
    """Tweedie's formula, one score step: E[x_clean | x] = x + sigma^2 * grad_x log p(x | y)."""
    with torch.enable_grad():
        x = _fp32(x).detach().requires_grad_(True)
        (score,) = torch.autograd.grad(model.log_prob(x, y).sum(), x)
    return (x + sigma**2 * score).detach()


class TARFlow(nn.Module):
    """Normalizing flow x (B, T, D) <-> z (B, T, D), conditioned on class labels y (B,).

    Label `num_classes` is the null (unconditional) label.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        num_tokens: int,
        num_classes: int,
        width: int,
        heads: int,
        num_blocks: int,
        layers_per_block: int,
        deep_layers: int | None = None,
        mlp_ratio: float = 4.0,
        cond: str = "additive",
        scale: str = "exp",
        start_token: bool = False,
        soft_clip: float | None = None,
        label_drop: float = 0.1,
    ):
        super().__init__()
        if cond not in ("additive", "prefix"):
            raise ValueError(f"TARFlow: cond must be 'additive' or 'prefix', got {cond!r}")
        if scale not in ("exp", "softplus"):
            raise ValueError(f"TARFlow: scale must be 'exp' or 'softplus', got {scale!r}")
        if width % heads:
            raise ValueError(f"TARFlow: width {width} must be divisible by heads {heads}")
        if num_blocks < 1:
            raise ValueError(f"TARFlow: num_blocks must be >= 1, got {num_blocks}")
        self.num_classes = num_classes
        self.label_drop = label_drop
        layers = [layers_per_block] * num_blocks
        conditioned = [True] * num_blocks
        if deep_layers is not None:  # STARFlow deep-shallow: conditioned deep block nearest z
            layers[-1] = deep_layers
            conditioned = [False] * (num_blocks - 1) + [True]
        self.blocks = nn.ModuleList(
            FlowBlock(
                in_channels=in_channels, num_tokens=num_tokens, num_classes=num_classes,
                width=width, heads=heads, layers=layers[i], mlp_ratio=mlp_ratio,
                cond=cond if conditioned[i] else None, scale=scale, start_token=start_token,
                soft_clip=soft_clip, flip=i % 2 == 1,
            )
            for i in range(num_blocks)
        )

    def forward(self, x, y):
        """x -> (z, logdet): blocks in order, logdet (B,) summed in fp32."""
        return _through(self.blocks, x, y, 0.0)

    @torch.no_grad()
    def reverse(self, z, y, *, cfg_scale=0.0, cfg_mode="tarflow", cfg_anneal=False, use_cache=True):
        """z -> x: blocks in reverse order, tokens one at a time within a block, math in fp32.

        cfg_scale w guides the conditioned blocks (cfg_mode "tarflow" or "starflow"); with
        cfg_anneal, w ramps linearly as w*(step+1)/steps over a block's token steps (TARFlow).
        use_cache=False recomputes the whole prefix at every step: the reference sampler.
        """
        if cfg_mode not in ("tarflow", "starflow"):
            raise ValueError(f"TARFlow.reverse: cfg_mode must be 'tarflow' or 'starflow', got {cfg_mode!r}")
        x = _fp32(z)
        for block in reversed(self.blocks):
            x = block.reverse(_order(x, block.flip), y, cfg_scale, cfg_mode, cfg_anneal, use_cache)
            x = _order(x, block.flip)
        return x

    def log_prob(self, x, y):
        """log p(x | y) = -0.5 ||z||^2 - 0.5 N log(2 pi) + logdet, per sample (B,)."""
        z, logdet = self(x, y)
        n = z[0].numel()
        return -0.5 * z.square().sum((1, 2)) - 0.5 * n * math.log(2 * math.pi) + logdet

    @torch.no_grad()
    def log_prob_classes(self, x, labels, max_batch=1024):
        """log p(x_b | labels_k) for every sample and every label, (B, K) in fp32, in chunks of labels so that
        at most max(max_batch, B) flow evaluations run at once (1,000 classes fit in memory). The blocks before the
        first conditioned one do not see the label (STARFlow's shallow blocks): they run once per sample."""
        first = next(i for i, b in enumerate(self.blocks) if b.cond is not None)
        h, logdet = _through(self.blocks[:first], _fp32(x), None, torch.zeros(len(x), device=x.device))
        n, per = x[0].numel(), max(1, max_batch // len(x))
        out = []
        for k in range(0, len(labels), per):
            ys = labels[k:k + per]
            hk = h[:, None].expand(-1, len(ys), *h.shape[1:]).reshape(-1, *h.shape[1:])  # row b * len(ys) + j
            z, ld = _through(self.blocks[first:], hk, ys.repeat(len(x)), logdet.repeat_interleave(len(ys)))
            lp = -0.5 * z.square().sum((1, 2)) - 0.5 * n * math.log(2 * math.pi) + ld
            out.append(lp.view(len(x), len(ys)))
        return torch.cat(out, 1)

    def nll_per_dim(self, x, y):
        """Training loss: mean NLL per dimension in nats."""
        return -self.log_prob(x, y).mean() / x[0].numel()

    def drop_labels(self, y, p=None, generator=None):
        """Replace each label by the null label with probability p (default: label_drop).

        The draw happens on the generator's device (CPU when none is given), then moves to y's.
        """
        p = self.label_drop if p is None else p
        device = generator.device if generator is not None else "cpu"
        drop = torch.rand(y.shape, generator=generator, device=device).to(y.device) < p
        return torch.where(drop, torch.full_like(y, self.num_classes), y)


class FlowBlock(nn.Module):
    """One TARFlow block over tokens in its own order: a causal transformer predicts (mu_t, a_t)
    from x_<t and the affine map z_t = (x_t - mu_t) / sigma_t is applied to every token."""

    def __init__(self, *, in_channels, num_tokens, num_classes, width, heads, layers, mlp_ratio,
                 cond, scale, start_token, soft_clip, flip):
        super().__init__()
        self.num_classes, self.cond, self.scale = num_classes, cond, scale
        self.soft_clip, self.flip = soft_clip, flip
        self.proj_in = nn.Linear(in_channels, width)
        self.pos_embed = nn.Parameter(torch.randn(num_tokens, width) * 0.02)
        # learned start token: the transformer reads [start, x_0..x_{T-2}] so token 0 is transformed too
        self.start = nn.Parameter(torch.randn(1, 1, in_channels)) if start_token else None
        # additive (TARFlow): one embedding per class; prefix (STARFlow): plus one for the null label
        num_embeddings = {None: 0, "additive": num_classes, "prefix": num_classes + 1}[cond]
        self.class_embed = nn.Parameter(torch.randn(num_embeddings, width) * 0.02) if cond else None
        self.layers = nn.ModuleList(TransformerLayer(width, heads, mlp_ratio) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.proj_out = nn.Linear(width, 2 * in_channels)
        nn.init.zeros_(self.proj_out.weight)  # zero outputs: mu = 0, a = 0, the block starts as identity
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x, y):
        """x -> (z, logdet) in this block's order."""
        mu, a = self.predict(self.inputs(x), y)
        if self.start is None:  # token 0 passes through: mu_0 = 0, a_0 = 0
            mu, a = F.pad(mu, (0, 0, 1, 0)), F.pad(a, (0, 0, 1, 0))
        x = _fp32(x)
        if self.scale == "exp":  # TARFlow eq.: z = (x - mu) * exp(-a), logdet = -sum(a)
            return (x - mu) * torch.exp(-a), -a.sum((1, 2))
        sigma = self.sigma(a)  # STARFlow: z = (x - mu) / sigma, logdet = -sum(log sigma)
        return (x - mu) / sigma, -sigma.log().sum((1, 2))

    def reverse(self, z, y, cfg_scale, cfg_mode, cfg_anneal, use_cache):
        """z -> x in this block's order: x_t = mu_t + sigma_t * z_t, token after token."""
        batch, num_tokens, _ = z.shape
        guided = self.cond is not None and cfg_scale != 0
        x = _fp32(z).clone()  # tokens not yet sampled are never read (causal)
        if guided:  # cond and uncond branches as one doubled batch, sharing the guided x_<t
            x, z = torch.cat([x, x]), torch.cat([z, z])
            y = torch.cat([y, torch.full_like(y, self.num_classes)])
        first = 0 if self.start is not None else 1  # first transformed token
        steps = num_tokens - first
        caches = [KVCache(steps + (self.cond == "prefix")) for _ in self.layers] if use_cache else None
        for j in range(steps):
            t = j + first
            if use_cache:  # feed the one new input token u_j; keys/values of u_<j are cached
                u = x[:, t - 1 : t] if t > 0 else self.start.expand(len(x), 1, -1).to(x.dtype)
                mu, a = self.predict(u, y, caches, offset=j)
            else:  # reference: recompute the whole prefix u_0..u_j
                mu, a = self.predict(self.inputs(x)[:, : j + 1], y)
                mu, a = mu[:, -1:], a[:, -1:]
            if guided:
                w = cfg_scale * (j + 1) / steps if cfg_anneal else cfg_scale
                mu, sigma = self.guide(mu, a, w, cfg_mode)
                mu, sigma = torch.cat([mu, mu]), torch.cat([sigma, sigma])
            else:
                sigma = self.sigma(a)
            x[:, t : t + 1] = mu + sigma * _fp32(z[:, t : t + 1])
        return x[:batch]

    def inputs(self, x):
        """TARFlow's shift by one: the transformer reads [start?, x_0..x_{T-2}], so output t sees x_<t."""
        u = x[:, :-1]
        if self.start is not None:
            u = torch.cat([self.start.expand(len(x), 1, -1).to(x.dtype), u], 1)
        return u

    def predict(self, u, y, caches=None, offset=0):
        """(mu, a) in fp32 for input tokens u at positions offset.., causal; caches extend a prefix."""
        h = self.proj_in(u) + self.pos_embed[offset : offset + u.shape[1]]
        prefix = self.cond == "prefix" and offset == 0
        if self.cond == "additive":  # TARFlow: class embedding added to every token
            h = h + self.label_embedding(y)[:, None]
        elif prefix:  # STARFlow: label token prepended in causal attention
            h = torch.cat([self.label_embedding(y)[:, None], h], 1)
        for layer, cache in zip(self.layers, caches or [None] * len(self.layers)):
            h = layer(h, cache)
        if prefix:
            h = h[:, 1:]
        mu, a = _fp32(self.proj_out(self.norm(h))).chunk(2, dim=-1)
        if self.soft_clip:  # STARFlow soft clip: a -> c * tanh(a / c)
            a = self.soft_clip * torch.tanh(a / self.soft_clip)
        return mu, a

    def label_embedding(self, y):
        if self.cond == "additive":  # TARFlow: the null label uses the mean class embedding
            return torch.cat([self.class_embed, self.class_embed.mean(0, keepdim=True)])[y]
        return self.class_embed[y]

    def sigma(self, a):
        # TARFlow: sigma = exp(a); STARFlow: sigma = softplus(a + softplus^-1(1)), in fp32
        return torch.exp(a) if self.scale == "exp" else F.softplus(a + INV_SOFTPLUS_1)

    def guide(self, mu, a, w, cfg_mode):
        """Combine the (cond, uncond) halves of the doubled batch into one guided (mu, sigma)."""
        (mu_c, mu_u), (a_c, a_u) = mu.chunk(2), a.chunk(2)
        if cfg_mode == "tarflow":
            mu, a = cfg_tarflow(mu_c, a_c, mu_u, a_u, w)
            return mu, self.sigma(a)
        return cfg_starflow(mu_c, self.sigma(a_c), mu_u, self.sigma(a_u), w)


class TransformerLayer(nn.Module):
    """Pre-LN transformer layer: h + Attn(LN(h)), then h + MLP(LN(h))."""

    def __init__(self, width, heads, mlp_ratio):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = Mlp(width, int(width * mlp_ratio))

    def forward(self, h, cache=None):
        h = h + self.attn(self.norm1(h), cache)
        return h + self.mlp(self.norm2(h))


class CausalSelfAttention(nn.Module):
    """Causal multi-head self-attention via F.scaled_dot_product_attention. Our own module (not
    timm's Attention) only because token-by-token sampling needs a KV cache."""

    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, h, cache=None):
        batch, length, width = h.shape
        q, k, v = self.qkv(h).view(batch, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        if cache is not None:
            k, v = cache.append(k, v)
        keys = k.shape[2]
        if keys == length:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif length == 1:  # one new query sees every cached key
            out = F.scaled_dot_product_attention(q, k, v)
        else:  # several new queries after a cached prefix: bottom-right aligned causal mask
            mask = torch.ones(length, keys, dtype=torch.bool, device=h.device).tril(keys - length)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(out.transpose(1, 2).reshape(batch, length, width))


class KVCache:
    """Keys and values of one attention layer, written left to right while sampling."""

    def __init__(self, max_len):
        self.max_len, self.length, self.k, self.v = max_len, 0, None, None

    def append(self, k, v):
        if self.k is None:
            self.k = k.new_empty(*k.shape[:2], self.max_len, k.shape[3])
            self.v = torch.empty_like(self.k)
        end = self.length + k.shape[2]
        self.k[:, :, self.length : end], self.v[:, :, self.length : end] = k, v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


def class_posterior(log_probs, log_prob_uncond, dims):
    """The flow as a classifier, from log p(x | y) (B, K) over K classes and log p(x | null) (B,):
    the Bayes-rule class argmax_y log p(x | y) under a uniform prior, its posterior p(y | x), the marginal
    log p(x) = logsumexp_y log p(x | y) - log K, and bits/dim (of `dims` dimensions) of the conditional at the
    predicted class, of the marginal and of the unconditional branch."""
    log_probs = log_probs.double()
    lse = torch.logsumexp(log_probs, 1)
    best, predicted = log_probs.max(1)
    marginal = lse - math.log(log_probs.shape[1])
    to_bits = lambda lp: -lp / dims / math.log(2.0)  # noqa: E731
    return {"predicted": predicted, "posterior": torch.exp(best - lse), "log_prob": best, "log_prob_marginal": marginal,
            "log_prob_uncond": log_prob_uncond.double(), "bits_per_dim": to_bits(best),
            "bits_per_dim_marginal": to_bits(marginal), "bits_per_dim_uncond": to_bits(log_prob_uncond.double())}


def slerp(a, b, t):
    """Spherical interpolation of latents a, b (same shape) at t in [0, 1], over the angle of their flattenings;
    exactly a at t = 0 and b at t = 1. Nearly parallel latents are interpolated linearly."""
    a64, b64 = a.double().flatten(), b.double().flatten()
    theta = torch.arccos((a64 @ b64 / (a64.norm() * b64.norm())).clamp(-1, 1)).item()
    if theta < 1e-6:
        wa, wb = 1.0 - t, float(t)
    else:  # at t = 0: wa = sin(theta) / sin(theta) = 1.0 and wb = 0.0 exactly (and the reverse at t = 1)
        wa, wb = math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)
    return wa * a + wb * b


def _through(blocks, x, y, logdet):
    """x through `blocks` in order (each in its own token order): (z, logdet + their log-dets)."""
    for block in blocks:
        z, block_logdet = block(_order(x, block.flip), y)
        x = _order(z, block.flip)
        logdet = logdet + block_logdet
    return x, logdet


def _order(x, flip):
    # permutation between blocks: identity or reverse (its own inverse)
    return x.flip(1) if flip else x


def _fp32(t):
    # affine, log-det and sampling math in fp32 (float64 is kept, for tests)
    return t if t.dtype == torch.float64 else t.float()
