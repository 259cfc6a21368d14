"""Specification of the TARFlow / STARFlow model in pipeline/models/flow.py (tiny models, CPU)."""

import math

import pytest
import torch

from pipeline.models.flow import (
    TARFlow,
    bits_per_dim,
    cfg_starflow,
    cfg_tarflow,
    class_posterior,
    slerp,
    tweedie_denoise,
)

NUM_CLASSES = 3
VARIANTS = [  # (cond, scale, start_token, deep_layers)
    ("additive", "exp", False, None),
    ("additive", "softplus", True, None),
    ("prefix", "softplus", False, None),
    ("prefix", "exp", True, None),
    ("additive", "exp", True, 2),
    ("prefix", "softplus", True, 2),
    ("prefix", "exp", False, 2),
]
VARIANT_IDS = [f"{c}-{s}-{'start' if st else 'pass0'}-{'deep' if d else 'uniform'}" for c, s, st, d in VARIANTS]



def make_flow(cond="additive", scale="exp", start_token=False, deep_layers=None, *, tokens=6, channels=4,
              width=32, num_blocks=3, soft_clip=4.0, output_std=0.1, seed=0):
    """A tiny flow whose zero-initialized output heads are replaced by random ones (non-identity)."""
    torch.manual_seed(seed)
    model = TARFlow(
        in_channels=channels, num_tokens=tokens, num_classes=NUM_CLASSES, width=width, heads=4,
        num_blocks=num_blocks, layers_per_block=1, deep_layers=deep_layers, cond=cond, scale=scale,
        start_token=start_token, soft_clip=soft_clip,
    )
    if output_std:
        for block in model.blocks:
            torch.nn.init.normal_(block.proj_out.weight, std=output_std)
            torch.nn.init.normal_(block.proj_out.bias, std=output_std)
    return model.eval()


def batch(model, size=5, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    block = model.blocks[0]
    x = torch.randn(size, block.pos_embed.shape[0], block.proj_in.in_features, generator=g, dtype=dtype)
    y = torch.randint(0, NUM_CLASSES + 1, (size,), generator=g)  # includes the null label
    return x, y


@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
def test_reverse_inverts_forward(variant):
    model = make_flow(*variant)
    x, y = batch(model)
    z, _ = model(x, y)
    assert (z - x).abs().max() > 1e-2  # the flow is not the identity
    assert torch.allclose(model.reverse(z, y), x, atol=1e-5)
    assert torch.allclose(model.reverse(z, y, use_cache=False), x, atol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
def test_logdet_equals_log_abs_det_jacobian(variant):
    model = make_flow(*variant, tokens=4, channels=3, output_std=0.3).double()
    x, y = batch(model, size=1, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda v: model(v.view_as(x), y)[0].flatten(), x.flatten())
    sign, logabsdet = torch.linalg.slogdet(jac)
    _, logdet = model(x, y)
    assert sign.item() == 1.0  # sigma > 0: the flow preserves orientation
    assert torch.allclose(logdet, logabsdet.view(1), atol=1e-9)
    assert logdet.abs().item() > 0.1  # a non-trivial check


@pytest.mark.parametrize("variant", VARIANTS[:4], ids=VARIANT_IDS[:4])
def test_block_output_never_depends_on_later_tokens(variant):
    model = make_flow(*variant).double()
    x, y = batch(model, dtype=torch.float64)
    for block in model.blocks:
        z, _ = block(x, y)
        for j in range(x.shape[1]):
            x2 = x.clone()
            x2[:, j] += 1.0
            z2, _ = block(x2, y)
            assert torch.equal(z2[:, :j], z[:, :j]), f"token {j} leaked into earlier outputs"
            assert (z2[:, j] - z[:, j]).abs().min() > 0  # z_j depends on x_j


def test_token_zero_passes_through_without_start_token_and_is_transformed_with_it():
    for start_token in (False, True):
        model = make_flow(start_token=start_token)
        x, y = batch(model)
        z, _ = model.blocks[0](x, y)
        assert torch.equal(z[:, 0], x[:, 0]) != start_token


@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("cfg_mode", ["tarflow", "starflow"])
def test_kv_cache_reverse_equals_naive_reverse(variant, cfg_mode):
    model = make_flow(*variant)
    z, y = batch(model)
    y = y.clamp(max=NUM_CLASSES - 1)
    for w, anneal in [(0.0, False), (1.5, False), (3.0, True)]:
        kw = {"cfg_scale": w, "cfg_mode": cfg_mode, "cfg_anneal": anneal}
        cached, naive = model.reverse(z, y, **kw), model.reverse(z, y, use_cache=False, **kw)
        assert torch.allclose(cached, naive, atol=1e-5), (w, anneal)


def test_guidance_changes_samples_and_is_deterministic():
    model = make_flow("prefix", "softplus", True, 2)
    z, y = batch(model)
    y = y.clamp(max=NUM_CLASSES - 1)
    plain = model.reverse(z, y)
    for cfg_mode in ("tarflow", "starflow"):
        guided = model.reverse(z, y, cfg_scale=2.0, cfg_mode=cfg_mode)
        assert (guided - plain).abs().max() > 1e-3
        assert torch.equal(guided, model.reverse(z, y, cfg_scale=2.0, cfg_mode=cfg_mode))


def test_cfg_rules_at_zero_scale_return_the_conditional_head():
    g = torch.Generator().manual_seed(0)
    mu_c, mu_u, a_c, a_u = torch.randn(4, 10, generator=g)
    assert all(torch.equal(p, q) for p, q in zip(cfg_tarflow(mu_c, a_c, mu_u, a_u, 0.0), (mu_c, a_c), strict=True))
    mu, sig = cfg_starflow(mu_c, a_c.exp(), mu_u, a_u.exp(), 0.0)
    assert torch.allclose(mu, mu_c) and torch.allclose(sig, a_c.exp())


def test_starflow_cfg_is_the_gaussian_of_p_c_to_the_1_plus_w_over_p_u_to_the_w():
    w, grid = 1.5, torch.linspace(-6, 6, 2001, dtype=torch.float64)
    mu_c, sig_c, mu_u, sig_u = (torch.tensor(v, dtype=torch.float64) for v in (0.7, 0.5, -0.3, 0.8))

    def log_p(m, s):
        return -0.5 * ((grid - m) / s) ** 2 - s.log()

    mu, sig = cfg_starflow(mu_c, sig_c, mu_u, sig_u, w)
    diff = (1 + w) * log_p(mu_c, sig_c) - w * log_p(mu_u, sig_u) - log_p(mu, sig)
    assert torch.allclose(diff, diff[0].expand_as(diff), atol=1e-9)  # equal up to a constant


@pytest.mark.parametrize("cfg_mode", ["tarflow", "starflow"])
def test_cfg_with_zero_scale_equals_plain_conditional_sampling(cfg_mode):
    model = make_flow("additive", "softplus", False, None)
    z, y = batch(model)
    y = y.clamp(max=NUM_CLASSES - 1)
    plain = model.reverse(z, y)
    assert torch.equal(model.reverse(z, y, cfg_scale=0.0, cfg_mode=cfg_mode), plain)
    # a vanishing scale runs the doubled (cond, uncond) batch and must land on the same samples
    assert torch.allclose(model.reverse(z, y, cfg_scale=1e-9, cfg_mode=cfg_mode), plain, atol=1e-5)


@pytest.mark.parametrize("deep_layers", [None, 2])
def test_cfg_runs_only_in_conditioned_blocks_and_anneals_linearly(monkeypatch, deep_layers):
    from pipeline.models import flow

    scales = []
    monkeypatch.setattr(flow, "cfg_tarflow", lambda mu_c, a_c, mu_u, a_u, w: scales.append(w) or (mu_c, a_c))
    model = make_flow(deep_layers=deep_layers, tokens=5, num_blocks=3)  # no start token: 4 steps per block
    z, y = batch(model)
    model.reverse(z, y, cfg_scale=2.0, cfg_anneal=True)
    ramp = [2.0 * (j + 1) / 4 for j in range(4)]
    assert scales == ramp * (1 if deep_layers else 3)
    scales.clear()
    model.reverse(z, y, cfg_scale=2.0)
    assert scales == [2.0] * 4 * (1 if deep_layers else 3)


def test_deep_shallow_conditions_only_the_deep_block_nearest_the_gaussian():
    model = make_flow(deep_layers=3, num_blocks=4)
    assert [len(b.layers) for b in model.blocks] == [1, 1, 1, 3]
    assert [b.cond for b in model.blocks] == [None, None, None, "additive"]
    assert [b.flip for b in model.blocks] == [False, True, False, True]


def test_null_label_embedding():
    additive, prefix = make_flow("additive").blocks[0], make_flow("prefix").blocks[0]
    null = torch.tensor([NUM_CLASSES])
    assert torch.allclose(additive.label_embedding(null)[0], additive.class_embed.mean(0))  # TARFlow
    assert prefix.class_embed.shape[0] == NUM_CLASSES + 1  # STARFlow: its own learned embedding


def test_drop_labels_replaces_labels_with_the_null_label():
    model = make_flow()
    y = torch.randint(0, NUM_CLASSES, (4000,), generator=torch.Generator().manual_seed(0))
    assert torch.equal(model.drop_labels(y, 0.0), y)
    assert (model.drop_labels(y, 1.0) == NUM_CLASSES).all()
    dropped = model.drop_labels(y, generator=torch.Generator().manual_seed(1))  # p = label_drop = 0.1
    kept = dropped != NUM_CLASSES
    assert torch.equal(dropped[kept], y[kept])
    assert abs((~kept).float().mean().item() - model.label_drop) < 0.02
    assert torch.equal(dropped, model.drop_labels(y, generator=torch.Generator().manual_seed(1)))


@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
def test_zero_initialized_flow_is_a_standard_gaussian(variant):
    model = make_flow(*variant, output_std=0.0)
    x, y = batch(model)
    z, logdet = model(x, y)
    assert torch.equal(z, x) and torch.equal(logdet, torch.zeros(len(x)))
    expected = torch.distributions.Normal(0.0, 1.0).log_prob(x).sum((1, 2))
    assert torch.allclose(model.log_prob(x, y), expected, atol=1e-4)


def test_logdet_and_latents_stay_fp32_under_bf16_autocast():
    model = make_flow("prefix", "softplus", True, 2)
    x, y = batch(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z, logdet = model(x, y)
        sample = model.reverse(z, y, cfg_scale=1.0, cfg_mode="starflow")
    assert z.dtype == logdet.dtype == sample.dtype == torch.float32
    assert torch.allclose(logdet, model(x, y)[1], rtol=0.05, atol=0.05)


@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("max_batch", [1, 7, 1024])
def test_log_prob_classes_is_log_prob_of_every_label_in_any_chunking(variant, max_batch):
    model = make_flow(*variant)
    x, _ = batch(model, size=4)
    labels = torch.tensor([2, 0, NUM_CLASSES, 1])  # any order, the null label included
    table = model.log_prob_classes(x, labels, max_batch=max_batch)
    assert table.shape == (4, 4) and table.dtype == torch.float32
    for j, label in enumerate(labels):
        expected = model.log_prob(x, torch.full((4,), int(label)))
        torch.testing.assert_close(table[:, j], expected, rtol=1e-5, atol=1e-4)
    assert (table[:, 0] - table[:, 1]).abs().max() > 1e-3  # the label matters


def test_class_posterior_is_the_bayes_rule_under_a_uniform_prior():
    log_probs = torch.tensor([[-10.0, -12.0, -10.0 - math.log(3)], [-5.0, -1.0, -3.0]])
    post = class_posterior(log_probs, torch.tensor([-11.0, -2.0]), dims=4)
    assert post["predicted"].tolist() == [0, 1]
    p = torch.softmax(log_probs.double(), 1)
    torch.testing.assert_close(post["posterior"], p.max(1).values)
    marginal = torch.log(torch.exp(log_probs.double()).mean(1))
    torch.testing.assert_close(post["log_prob_marginal"], marginal)
    torch.testing.assert_close(post["bits_per_dim"], -log_probs.double().max(1).values / 4 / math.log(2))
    torch.testing.assert_close(post["bits_per_dim_uncond"], torch.tensor([11.0, 2.0], dtype=torch.float64) / 4
                               / math.log(2))


def test_slerp_ends_exactly_at_both_latents_and_keeps_the_norm_between():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    assert torch.equal(slerp(a, b, 0.0), a) and torch.equal(slerp(a, b, 1.0), b)
    b = b * a.norm() / b.norm()  # equal norms: the arc stays on their sphere
    for t in (0.25, 0.5, 0.75):
        assert slerp(a, b, t).norm() == pytest.approx(a.norm().item(), rel=1e-5)
    torch.testing.assert_close(slerp(a, a, 0.3), a)  # parallel latents: no division by sin(0)


def test_bits_per_dim_divides_nats_by_ln2():
    assert bits_per_dim(math.log(2.0)) == pytest.approx(1.0)
    assert bits_per_dim(torch.tensor(2.0)).item() == pytest.approx(2.0 / math.log(2.0))


def test_tweedie_step_follows_the_score_of_a_gaussian():
    # zero-initialized flow = N(0, I): the score is -x, so x + s^2 * score = (1 - s^2) x
    model = make_flow(output_std=0.0)
    x, y = batch(model)
    assert torch.allclose(tweedie_denoise(model, x, y, 0.3), (1 - 0.09) * x, atol=1e-6)


def test_short_training_fits_a_two_class_gaussian_mixture():
    torch.manual_seed(0)
    tokens, channels, std = 4, 2, 0.3
    model = TARFlow(in_channels=channels, num_tokens=tokens, num_classes=2, width=32, heads=2, num_blocks=2,
                    layers_per_block=1, cond="additive", scale="softplus", start_token=True, soft_clip=4.0)
    means = torch.tensor([1.5, -1.5]).view(2, 1, 1) * torch.tensor([[1.0, -1.0]] * tokens)  # class c: +-m

    def sample(n, g):
        y = torch.randint(0, 2, (n,), generator=g)
        return means[y] + std * torch.randn(n, tokens, channels, generator=g), y

    g = torch.Generator().manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(150):
        x, y = sample(64, g)
        loss = model.nll_per_dim(x, model.drop_labels(y, generator=g))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    x, y = sample(2000, torch.Generator().manual_seed(123))
    with torch.no_grad():
        nll = model.nll_per_dim(x, y).item()
    baseline = -torch.distributions.Normal(0.0, 1.0).log_prob(x).mean().item()  # ~2.09 nats/dim
    optimum = 0.5 * math.log(2 * math.pi * math.e * std**2)  # ~0.21 nats/dim
    assert nll < baseline - 1.5, (nll, baseline, optimum)  # well below N(0, 1), near the optimum


# --- samplers: batched CFG, static cache, Jacobi ----------------------------------------------------------

CFG_CASES = [(0.0, False), (1.5, False), (3.0, True)]  # (w, anneal)


@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("cfg_mode", ["tarflow", "starflow"])
def test_batched_cfg_equals_two_pass_cfg(variant, cfg_mode):
    """Both CFG branches as one doubled batch with one KV cache = a pass per branch with a cache each."""
    model = make_flow(*variant)
    z, y = batch(model)
    y = y.clamp(max=NUM_CLASSES - 1)
    for solver in ("sequential", "jacobi"):
        for w, anneal in CFG_CASES:
            kw = {"cfg_scale": w, "cfg_mode": cfg_mode, "cfg_anneal": anneal, "solver": solver, "jacobi_chunk": 3}
            batched, two_pass = model.reverse(z, y, **kw), model.reverse(z, y, two_pass_cfg=True, **kw)
            # float32 roundoff: a doubled batch takes other matmul kernels (~1e-6 relative on some CPUs, on
            # values up to ~40); the tolerance of the static cache and of Jacobi below
            torch.testing.assert_close(batched, two_pass, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
def test_static_kv_cache_equals_the_dynamic_one(variant):
    model = make_flow(*variant)
    z, y = batch(model)
    y = y.clamp(max=NUM_CLASSES - 1)
    for w, anneal in CFG_CASES:
        kw = {"cfg_scale": w, "cfg_mode": "starflow" if anneal else "tarflow", "cfg_anneal": anneal}
        torch.testing.assert_close(model.reverse(z, y, cache="static", **kw), model.reverse(z, y, **kw),
                                   rtol=1e-5, atol=1e-5)


def test_the_static_step_is_one_graph_for_every_token_and_the_dynamic_one_is_not():
    """Fixed shapes and a tensor position: torch.compile(fullgraph) captures the one-token step once for all
    steps (what CUDA graphs need); the dynamic cache's growing keys make it recompile."""
    import torch._dynamo

    model = make_flow("prefix", "softplus", True, 2)
    z, y = batch(model)
    y = y.clamp(max=NUM_CLASSES - 1)
    reference = model.reverse(z, y, cfg_scale=1.5, cache="static")
    deep = model.blocks[-1]  # the guided deep block; an instance attribute: its sampler calls the compiled step
    deep.predict = torch.compile(deep.predict, fullgraph=True, dynamic=False, backend="aot_eager")
    torch._dynamo.reset()
    try:
        with torch._dynamo.config.patch(error_on_recompile=True):
            compiled = model.reverse(z, y, cfg_scale=1.5, cache="static")
            torch.testing.assert_close(compiled, reference, rtol=1e-5, atol=1e-5)
            with pytest.raises(Exception, match=r"[Rr]ecompil"):
                model.reverse(z, y, cfg_scale=1.5, cache="dynamic")
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("cfg_mode", ["tarflow", "starflow"])
def test_jacobi_solves_each_chunk_exactly_in_as_many_passes_as_tokens(variant, cfg_mode):
    """Pass k makes the chunk's first k tokens exact: with tol 0 the chunk's length in passes is the inverse."""
    model = make_flow(*variant, tokens=7)
    z, y = batch(model)
    y = y.clamp(max=NUM_CLASSES - 1)
    for w, anneal in CFG_CASES:
        kw = {"cfg_scale": w, "cfg_mode": cfg_mode, "cfg_anneal": anneal}
        for cache in ("dynamic", "static"):
            stats = []
            x = model.reverse(z, y, solver="jacobi", cache=cache, jacobi_chunk=3, jacobi_tol=0.0,
                              jacobi_max_iters=99, stats=stats, **kw)
            torch.testing.assert_close(x, model.reverse(z, y, **kw), rtol=1e-5, atol=1e-5)
            steps = 7 - (not variant[2])  # token 0 passes through without a start token
            assert [s["iterations"] for s in stats] == [steps] * 3 and [s["block"] for s in stats] == [2, 1, 0]


@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("cfg_mode", ["tarflow", "starflow"])
def test_jacobi_equals_sequential_within_its_tolerance_and_stops_early(variant, cfg_mode):
    model = make_flow(*variant, tokens=24)
    z, y = batch(model)
    y = y.clamp(max=NUM_CLASSES - 1)
    tol, kw = 1e-3, {"cfg_scale": 1.5, "cfg_mode": cfg_mode}
    stats = []
    x = model.reverse(z, y, solver="jacobi", jacobi_chunk=12, jacobi_tol=tol, stats=stats, **kw)
    reference = model.reverse(z, y, **kw)
    relative = (x - reference).flatten(1).norm(dim=1) / reference.flatten(1).norm(dim=1)
    assert relative.max() < 2 * tol, relative
    steps = 24 - (not variant[2])
    assert all(s["iterations"] < steps and s["chunks"] == 2 and s["max_chunk_iterations"] <= 12 for s in stats)
    capped = []
    model.reverse(z, y, solver="jacobi", jacobi_chunk=12, jacobi_tol=0.0, jacobi_max_iters=4, stats=capped, **kw)
    assert [s["iterations"] for s in capped] == [8, 8, 8]  # max_iters passes per chunk at most
    assert [s["capped_chunks"] for s in capped] == [2, 2, 2]  # neither chunk of 12 is solved by 4 passes at tol 0
    assert all(s["capped_chunks"] == 0 for s in stats)


def test_jacobi_under_bf16_autocast_stops_where_fp32_stops_and_counts_only_unsolved_chunks():
    """The stopping rule compares two passes: with the network in bf16, its rounding (~4e-3 relative) keeps the
    change above tol 1e-3 and every chunk ran to max_iters (32 of 32 passes here, 10x the error). The passes run in
    fp32 under autocast, so the passes and the samples are those of fp32; a chunk is capped only when max_iters <
    its length and tol is not met."""
    model = make_flow("additive", "softplus", True, tokens=64, channels=8, width=64, num_blocks=2, output_std=0.05)
    z, y = batch(model, size=4)
    y = y.clamp(max=NUM_CLASSES - 1)
    kw = {"solver": "jacobi", "jacobi_chunk": 32, "jacobi_tol": 1e-3, "jacobi_max_iters": 16}
    fp32, bf16 = [], []
    x32 = model.reverse(z, y, stats=fp32, **kw)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x16 = model.reverse(z, y, stats=bf16, **kw)
    assert all(s["max_chunk_iterations"] < 16 for s in fp32), fp32  # fp32 meets the tolerance early
    assert bf16 == fp32 and torch.equal(x16, x32)
    assert all(s["capped_chunks"] == 0 for s in bf16)


def test_bad_solver_arguments_fail_in_one_line():
    model = make_flow()
    z, y = batch(model)
    for kw, word in (({"solver": "newton"}, "solver"), ({"cache": "paged"}, "cache"), ({"cache": "graph"}, "CUDA"),
                     ({"solver": "jacobi", "jacobi_chunk": 0}, "chunk")):
        with pytest.raises(ValueError, match=word) as e:
            model.reverse(z, y, **kw)
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("variant", VARIANTS[-3:], ids=VARIANT_IDS[-3:])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(variant):
    model = make_flow(*variant).train()
    x, y = batch(model)
    grads = []
    for on in (False, True):
        model.checkpoint_activations(on)
        model.zero_grad()
        loss = model.nll_per_dim(x, y)
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (l0, g0), (l1, g1) = grads
    assert torch.equal(l0, l1) and all(torch.allclose(a, b, rtol=0, atol=1e-7) for a, b in zip(g0, g1, strict=True))


def test_checkpointing_recomputes_the_layers_in_backward(monkeypatch):
    from pipeline.models import flow

    calls = []
    real = flow.TransformerLayer.forward
    monkeypatch.setattr(flow.TransformerLayer, "forward", lambda self, *a: calls.append(1) or real(self, *a))
    model = make_flow(num_blocks=2).train()
    x, y = batch(model)
    for on, expected in ((False, 2), (True, 4)):  # 2 layers: forward only, or forward + recompute
        calls.clear()
        model.checkpoint_activations(on).nll_per_dim(x, y).backward()
        assert len(calls) == expected
