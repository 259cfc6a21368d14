"""Class-conditional TARFlow / STARFlow over compact code tokens: SRC-Flow's generative model.

A stack of affine autoregressive flow blocks (TARFlow, Zhai et al. 2024; STARFlow, Gu et al.
2025) maps code tokens x (B, T, D) to Gaussian noise z of the same shape. Each block is a
causal transformer over the token sequence that predicts (mu_t, a_t) from x_<t; the token order
is flipped between blocks. Sampling inverts the blocks last to first; within a block it solves the
triangular system x_t = mu_t(x_<t) + sigma_t(x_<t) z_t with one of two solvers:
- sequential: one token per step, with a KV cache of the tokens already sampled (dynamic: the
  written prefix; static: the whole preallocated sequence under a mask, fixed shapes for CUDA graphs);
- jacobi: chunks of tokens, each the fixed point of x <- mu(x_<) + sigma(x_<) z iterated with full
  causal passes over the chunk from a guess until the relative change is small (GS-Jacobi, Liu & Qin
  2025; STARFlow's block-wise Jacobi), a KV cache for the chunks already solved.
Both CFG branches run as one doubled batch with one KV cache (two_pass_cfg: the reference).

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
import torch.utils.checkpoint
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
    def reverse(self, z, y, *, cfg_scale=0.0, cfg_mode="tarflow", cfg_anneal=False, use_cache=True,
                solver="sequential", cache="dynamic", two_pass_cfg=False, jacobi_chunk=64, jacobi_tol=1e-3,
                jacobi_max_iters=64, stats=None):
        """z -> x: blocks in reverse order, each inverted by `solver`, math in fp32.

        cfg_scale w guides the conditioned blocks (cfg_mode "tarflow" or "starflow"); with
        cfg_anneal, w ramps linearly as w*(step+1)/steps over a block's token steps (TARFlow).
        solver "sequential": one token per step; use_cache=False recomputes the whole prefix at every
        step (the reference sampler); cache "dynamic" | "static" (see KVCache) | "graph" (static, each step
        replayed as a CUDA graph: GraphedStep).
        solver "jacobi": chunks of jacobi_chunk tokens, each iterated at most jacobi_max_iters times until
        the relative change max_b ||x_new - x||_2 / ||x_new||_2 over the chunk is below jacobi_tol; its passes
        run in fp32 even under autocast (FlowBlock.reverse_jacobi).
        two_pass_cfg=True runs the two CFG branches as two passes with a cache each (the reference for
        the doubled batch). stats: a list that gets one dict per block (its index, the iterations used; for
        jacobi also its chunks, the most passes of one chunk and the chunks capped at jacobi_max_iters).
        """
        if cfg_mode not in ("tarflow", "starflow"):
            raise ValueError(f"TARFlow.reverse: cfg_mode must be 'tarflow' or 'starflow', got {cfg_mode!r}")
        if solver not in ("sequential", "jacobi"):
            raise ValueError(f"TARFlow.reverse: solver must be 'sequential' or 'jacobi', got {solver!r}")
        if cache not in ("dynamic", "static", "graph"):
            raise ValueError(f"TARFlow.reverse: cache must be 'dynamic', 'static' or 'graph', got {cache!r}")
        if cache == "graph" and z.device.type != "cuda":
            raise ValueError(f"TARFlow.reverse: cache 'graph' (CUDA graphs) needs a CUDA device, got {z.device}")
        if solver == "jacobi" and not (jacobi_chunk >= 1 and jacobi_max_iters >= 1 and jacobi_tol >= 0):
            raise ValueError(f"TARFlow.reverse: jacobi needs chunk >= 1, max_iters >= 1, tol >= 0; got "
                             f"{jacobi_chunk}, {jacobi_max_iters}, {jacobi_tol}")
        guide = Guide(cfg_scale, cfg_mode, cfg_anneal)
        x = _fp32(z)
        for i in reversed(range(len(self.blocks))):
            block = self.blocks[i]
            u = _order(x, block.flip)
            if solver == "jacobi":
                u, iters = block.reverse_jacobi(u, y, guide, cache, two_pass_cfg, jacobi_chunk, jacobi_tol,
                                                jacobi_max_iters)
            else:
                u, iters = block.reverse_sequential(u, y, guide, use_cache, cache, two_pass_cfg)
            if stats is not None:
                stats.append({"block": i, **iters})
            x = _order(u, block.flip)
        return x

    def checkpoint_activations(self, on=True):
        """Activation checkpointing per transformer layer: training keeps each layer's input only and
        recomputes the layer in the backward pass (less memory, one more forward of compute)."""
        for block in self.blocks:
            block.checkpointing = on
        return self

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
        self.checkpointing = False  # TARFlow.checkpoint_activations

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

    def reverse_sequential(self, z, y, guide, use_cache=True, cache="dynamic", two_pass_cfg=False):
        """z -> x in this block's order, token after token: x_t = mu_t(x_<t) + sigma_t(x_<t) z_t."""
        x, z, net = self._sampling(z, y, guide, cache if use_cache else None, two_pass_cfg)
        first = 0 if self.start is not None else 1  # first transformed token
        steps = x.shape[1] - first
        for j in range(steps):
            t = j + first
            if use_cache:  # feed the one new input token u_j; keys/values of u_<j are cached
                mu, a = net(self.step_inputs(x, j, j + 1), j)
            else:  # reference: recompute the whole prefix u_0..u_j
                mu, a = net(self.step_inputs(x, 0, j + 1), None)
                mu, a = mu[:, -1:], a[:, -1:]
            mu, sigma = self.affine(mu, a, guide, guide.scale_at(j, steps))
            x[:, t : t + 1] = mu + sigma * z[:, t : t + 1]
        return x[: len(y)], {"iterations": steps}

    def reverse_jacobi(self, z, y, guide, cache="dynamic", two_pass_cfg=False, chunk=64, tol=1e-3, max_iters=64):
        """z -> x in this block's order, chunk after chunk of token steps [s, e): the fixed point of
        x_[s,e) <- mu(x_<t) + sigma(x_<t) z_[s,e) (GS-Jacobi), iterated with full causal passes over the
        chunk from the guess x = z. Pass k makes the chunk's first k tokens exact (triangular), so e - s
        passes solve it exactly; it stops earlier once the relative change is below tol. The passes rewrite
        the chunk's cache slots; the chunks before it are read from the cache.

        The passes run in fp32 even under autocast: the stopping rule compares two passes, and bf16's rounding
        of the network (~4e-3 relative) keeps the change above a 1e-3 tolerance, so every chunk ran to max_iters.
        A chunk that stops at max_iters < e - s without meeting tol leaves its last tokens unsolved: counted in
        `capped_chunks`."""
        with torch.autocast(z.device.type, enabled=False):
            x, z, net = self._sampling(z, y, guide, cache, two_pass_cfg)
            first = 0 if self.start is not None else 1
            steps = x.shape[1] - first
            scale = guide.scale_at(torch.arange(steps, device=x.device).view(1, -1, 1), steps)
            total, worst, capped = 0, 0, 0
            for s in range(0, steps, chunk):
                e = min(s + chunk, steps)
                w = scale if not torch.is_tensor(scale) else scale[:, s:e]
                for k in range(1, min(max_iters, e - s) + 1):
                    mu, a = net(self.step_inputs(x, s, e), s)
                    mu, sigma = self.affine(mu, a, guide, w)
                    new = mu + sigma * z[:, s + first : e + first]
                    old = x[: len(y), s + first : e + first]
                    change = ((new[: len(y)] - old).flatten(1).norm(dim=1) / new[: len(y)].flatten(1).norm(dim=1)
                              .clamp_min(1e-30)).max().item()
                    x[:, s + first : e + first] = new
                    if k < e - s and change < tol:  # after e - s passes the chunk is exact: no check
                        break
                total, worst = total + k, max(worst, k)
                capped += k == max_iters < e - s and change >= tol
        return x[: len(y)], {"iterations": total, "chunks": -(-steps // chunk), "max_chunk_iterations": worst,
                             "capped_chunks": capped}

    def _sampling(self, z, y, guide, cache, two_pass_cfg):
        """(x, z, net) for an inverse: x an fp32 copy of z (tokens not yet sampled are never read), both
        doubled into (cond, uncond) halves when CFG guides this block, and net(u, offset) -> (mu, a) for the
        input tokens u at positions offset.. (offset None: no cache, u starts at position 0), the two CFG
        branches stacked, through KV caches of kind `cache` (None: no cache): "dynamic", "static", or
        "graph": static caches and each input length's step captured once as a CUDA graph, then replayed."""
        x = _fp32(z).clone()
        guided = self.cond is not None and guide.scale != 0
        if guided:  # both branches read the same guided x_<t
            x, z = torch.cat([x, x]), torch.cat([z, z])
            y = torch.cat([y, torch.full_like(y, self.num_classes)])
        branches = y.chunk(2) if guided and two_pass_cfg else (y,)
        caches, graphs = None, [{} for _ in branches]  # graphs: per branch, one CUDA graph per input length
        if cache:
            attn = self.layers[0].attn
            shape = (len(branches[0]), attn.heads, x.shape[1] + (self.cond == "prefix"), attn.head_dim)
            caches = [[KVCache(shape, _compute_dtype(self.proj_in.weight), x.device, static=cache != "dynamic")
                       for _ in self.layers] for _ in branches]
        if caches and self.cond == "prefix":
            for yb, cb in zip(branches, caches, strict=True):
                self.prefill(yb, cb)

        def run(u, yb, cb, offset, graphs):
            if cache == "dynamic":
                return self.predict(u, yb, cb, offset)
            if cache == "static":  # a tensor position, contiguous inputs: the same graph at every step
                return self.predict(u.contiguous(), yb, cb, torch.tensor(offset, device=u.device))
            if u.shape[1] not in graphs:
                graphs[u.shape[1]] = GraphedStep(self, u, yb, cb, offset)
            return graphs[u.shape[1]](u, offset)

        def net(u, offset):
            if offset is None:
                return self.predict(u, y)
            if len(branches) == 1:
                return run(u, y, caches[0], offset, graphs[0])
            out = [run(*args, offset, g) for *args, g in zip(u.chunk(2), branches, caches, graphs, strict=True)]
            return torch.cat([o[0] for o in out]), torch.cat([o[1] for o in out])

        return x, z, net

    def affine(self, mu, a, guide, w):
        """(mu, sigma) of x = mu + sigma z: the CFG mix of the two halves (doubled again) when the batch
        holds both branches, else sigma(a)."""
        if self.cond is None or guide.scale == 0:
            return mu, self.sigma(a)
        mu, sigma = self.guide(mu, a, w, guide.mode)
        return torch.cat([mu, mu]), torch.cat([sigma, sigma])

    def step_inputs(self, x, s, e):
        """Input tokens s..e-1 of TARFlow's shifted sequence [start?, x_0, x_1, ..]: input j predicts the
        token transformed at step j, and sees only x before it."""
        if self.start is None:
            return x[:, s:e]
        if s > 0:
            return x[:, s - 1 : e - 1]
        return torch.cat([self.start.expand(len(x), 1, -1).to(x.dtype), x[:, : e - 1]], 1)

    def inputs(self, x):
        """TARFlow's shift by one: the transformer reads [start?, x_0..x_{T-2}], so output t sees x_<t."""
        return self.step_inputs(x, 0, x.shape[1] - (self.start is None))

    def predict(self, u, y, caches=None, offset=0):
        """(mu, a) in fp32 for input tokens u at positions offset.. (an int; a 0-d tensor with a static
        cache), causal. With caches, u's keys and values are written at their slots (the position, + 1
        after a prefix label token) and attention reads every earlier slot from the caches."""
        n = u.shape[1]
        pos = (self.pos_embed[offset : offset + n] if isinstance(offset, int)
               else self.pos_embed.index_select(0, offset + torch.arange(n, device=u.device)))
        h = self.proj_in(u) + pos
        uncached_prefix = self.cond == "prefix" and caches is None
        if self.cond == "additive":  # TARFlow: class embedding added to every token
            h = h + self.label_embedding(y)[:, None]
        elif uncached_prefix:  # STARFlow: label token prepended in causal attention
            h = torch.cat([self.label_embedding(y)[:, None], h], 1)
        slot = offset + (self.cond == "prefix")
        for layer, cache in zip(self.layers, caches or [None] * len(self.layers), strict=True):
            if self.checkpointing and cache is None and torch.is_grad_enabled():  # recomputed in backward
                h = torch.utils.checkpoint.checkpoint(layer, h, use_reentrant=False)
            else:
                h = layer(h, cache, slot)
        if uncached_prefix:
            h = h[:, 1:]
        mu, a = _fp32(self.proj_out(self.norm(h))).chunk(2, dim=-1)
        if self.soft_clip:  # STARFlow soft clip: a -> c * tanh(a / c)
            a = self.soft_clip * torch.tanh(a / self.soft_clip)
        return mu, a

    def prefill(self, y, caches):
        """Prefix conditioning with a KV cache: the label token's keys and values into slot 0 of every layer."""
        h = self.label_embedding(y)[:, None]
        for layer, cache in zip(self.layers, caches, strict=True):
            h = layer(h, cache, 0)

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


class Guide:
    """Classifier-free guidance of the conditioned blocks: scale w, rule ("tarflow" | "starflow"), and
    TARFlow's linear ramp w * (step + 1) / steps over a block's token steps when `anneal`."""

    def __init__(self, scale, mode, anneal):
        self.scale, self.mode, self.anneal = scale, mode, anneal

    def scale_at(self, step, steps):
        """w at token step `step` (an int, or a tensor of steps for a chunk)."""
        return self.scale * (step + 1) / steps if self.anneal else self.scale


class TransformerLayer(nn.Module):
    """Pre-LN transformer layer: h + Attn(LN(h)), then h + MLP(LN(h))."""

    def __init__(self, width, heads, mlp_ratio):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = Mlp(width, int(width * mlp_ratio))

    def forward(self, h, cache=None, slot=0):
        h = h + self.attn(self.norm1(h), cache, slot)
        return h + self.mlp(self.norm2(h))


class CausalSelfAttention(nn.Module):
    """Causal multi-head self-attention via F.scaled_dot_product_attention (is_causal: flash attention on
    CUDA in bf16). Our own module (not timm's Attention) only because sampling needs a KV cache."""

    def __init__(self, width, heads):
        super().__init__()
        self.heads, self.head_dim = heads, width // heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, h, cache=None, slot=0):
        batch, length, width = h.shape
        q, k, v = self.qkv(h).view(batch, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        if cache is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # queries at slots slot.., keys and values of every slot up to each query
            k, v, mask = cache.update(k, v, slot)
            if mask is None and k.shape[2] == length:
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            elif mask is None and length == 1:  # one new query sees every cached key
                out = F.scaled_dot_product_attention(q, k, v)
            else:  # several new queries after a cached prefix: bottom-right aligned causal mask
                if mask is None:
                    mask = torch.ones(length, k.shape[2], dtype=torch.bool, device=h.device).tril(k.shape[2] - length)
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(out.transpose(1, 2).reshape(batch, length, width))


class KVCache:
    """Keys and values of one attention layer, preallocated for the whole sequence (max_len slots, zeros)
    and written in place: update(k, v, slot) writes slots [slot, slot + n) and returns what attention reads.

    dynamic: the slots [0, slot + n) (no mask: the shapes grow step by step);
    static:  all max_len slots and the mask `key slot <= query slot`: fixed shapes and addresses whatever
             the step, and `slot` may be a 0-d tensor, so a step can be captured as a CUDA graph (GraphedStep)
             or by torch.compile(fullgraph=True) once for all steps. Slots not yet written are masked out; they
             hold zeros or the finite values of an earlier Jacobi pass, never NaN, so 0 * v stays 0."""

    def __init__(self, shape, dtype, device, static=False):
        self.max_len, self.static = shape[2], static  # shape: (batch, heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)

    def update(self, k, v, slot):
        n = k.shape[2]
        if not self.static:
            self.k[:, :, slot : slot + n], self.v[:, :, slot : slot + n] = k, v
            return self.k[:, :, : slot + n], self.v[:, :, : slot + n], None
        queries = slot + torch.arange(n, device=k.device)
        self.k.index_copy_(2, queries, k.to(self.k.dtype))
        self.v.index_copy_(2, queries, v.to(self.v.dtype))
        mask = torch.arange(self.max_len, device=k.device) <= queries[:, None]
        return self.k, self.v, mask


class GraphedStep:
    """A block's network step (predict) for inputs of one length over static KV caches, captured once as a
    CUDA graph and replayed at every step: one launch instead of one per kernel, which is what bounds the
    token-by-token sampler on a GPU. Inputs are copied into the graph's fixed buffers, mu and a come back in
    its fixed outputs (valid until the next replay)."""

    def __init__(self, block, u, y, caches, offset, warmup=2):
        self.u, self.offset = u.clone(), torch.full((), offset, dtype=torch.long, device=u.device)
        device = u.device.type
        # autocast's weight-cast cache must stay off while capturing (torch.cuda.graphs notes)
        precision = torch.autocast(device, dtype=torch.get_autocast_dtype(device),
                                   enabled=torch.is_autocast_enabled(device), cache_enabled=False)
        side = torch.cuda.Stream()  # warm-up on a side stream, as capture requires: it writes the very slots
        side.wait_stream(torch.cuda.current_stream())  # (from the very inputs) that the first replay writes
        with torch.cuda.stream(side), precision:
            for _ in range(warmup):
                block.predict(self.u, y, caches, self.offset)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), precision:
            self.mu, self.a = block.predict(self.u, y, caches, self.offset)

    def __call__(self, u, offset):
        self.u.copy_(u)
        self.offset.fill_(offset)
        self.graph.replay()
        return self.mu, self.a


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


def _compute_dtype(weight):
    # the dtype a linear layer's output has here: autocast's when it is on, else the weight's
    device = weight.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype


def _fp32(t):
    # affine, log-det and sampling math in fp32 (float64 is kept, for tests)
    return t if t.dtype == torch.float64 else t.float()
