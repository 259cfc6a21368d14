"""Specification of the Semantic Representation Compressor (pipeline/models/src.py): PCA from streamed
moments, the PCA-initialised SRC, its loss and the constant code noise. Tiny sizes, CPU."""

import numpy as np
import pytest
import torch

from pipeline.models.src import (
    SRC,
    PCAResult,
    add_code_noise,
    feature_moments,
    pca_from_moments,
    src_loss,
)

C, T = 16, 16  # channels, tokens (a 4 x 4 grid)


def correlated_features(b=64, seed=0):
    """(b, T, C) tokens with a spread-out spectrum and a non-zero mean."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(C, C, generator=g, dtype=torch.float64) * torch.logspace(0, -2, C, dtype=torch.float64)
    offset = torch.linspace(-1, 1, C, dtype=torch.float64)
    x = torch.randn(b * T, C, generator=g, dtype=torch.float64) @ mixing.T + offset
    return x.reshape(b, T, C)


def fitted(f, dim, **arch):
    return SRC.from_pca(pca_from_moments(*feature_moments(f)), dim=dim, num_tokens=T, **arch).eval()


def test_pca_from_moments_matches_numpy_covariance_eigh():
    f = correlated_features()
    pca = pca_from_moments(*feature_moments(f))
    x = f.reshape(-1, C).numpy()
    values, vectors = np.linalg.eigh(np.cov(x, rowvar=False, bias=True))
    values, vectors = values[::-1], vectors[:, ::-1]
    assert isinstance(pca, PCAResult) and pca.components.dtype == torch.float64
    np.testing.assert_allclose(pca.mean.numpy(), x.mean(0), rtol=0, atol=1e-12)
    np.testing.assert_allclose(pca.eigenvalues.numpy(), values, rtol=1e-9, atol=1e-12)
    assert (pca.eigenvalues[:-1] >= pca.eigenvalues[1:]).all()
    # same directions up to sign; our sign puts each row's largest-magnitude entry positive
    np.testing.assert_allclose(np.abs(pca.components.numpy() @ vectors), np.eye(C), atol=1e-7)
    rows = pca.components
    assert (rows.gather(1, rows.abs().argmax(1, keepdim=True)) > 0).all()
    assert pca.explained_variance_ratio.sum().item() == pytest.approx(1.0, abs=1e-12)


def test_moments_accumulate_across_batches():
    f = correlated_features()
    parts = [feature_moments(f[:20]), feature_moments(f[20:])]
    whole = feature_moments(f)
    assert parts[0][0] + parts[1][0] == whole[0]
    torch.testing.assert_close(parts[0][1] + parts[1][1], whole[1])
    torch.testing.assert_close(parts[0][2] + parts[1][2], whole[2])


def test_from_pca_encodes_to_unit_variance_decorrelated_codes():
    f = correlated_features()
    src = fitted(f, dim=6)
    c = src.encode(f.float()).reshape(-1, 6).double()
    torch.testing.assert_close(c.mean(0), torch.zeros(6, dtype=torch.float64), atol=1e-5, rtol=0)
    cov = c.T @ c / c.shape[0]
    torch.testing.assert_close(cov, torch.eye(6, dtype=torch.float64), atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch", ["mlp", "transformer"])
def test_learned_archs_equal_the_pca_map_at_init(arch):
    f = correlated_features(b=8).float()
    linear = fitted(f, dim=6)
    learned = fitted(f, dim=6, arch=arch, hidden=32, depth=2)
    c = linear.encode(f)
    assert torch.equal(learned.encode(f), c)
    assert torch.equal(learned.decode(c), linear.decode(c))
    noisy = c + 0.3 * torch.randn_like(c)
    assert torch.equal(learned.decode(noisy), linear.decode(noisy))


def test_pca_round_trip_error_is_the_dropped_variance():
    f = correlated_features(b=128)
    for dim in (2, 8, 12):
        src = fitted(f, dim=dim)
        pca = pca_from_moments(*feature_moments(f))
        mse = (src.decode(src.encode(f.float())).double() - f).square().mean().item()
        assert mse == pytest.approx(pca.eigenvalues[dim:].sum().item() / C, rel=1e-3)


def test_from_pca_rejects_dim_beyond_the_data_rank():
    f = torch.randn(4, T, 3, dtype=torch.float64) @ torch.randn(3, C, dtype=torch.float64)  # rank 3
    with pytest.raises(ValueError, match="positive PCA eigenvalues"):
        fitted(f, dim=5)


def curved_features(n, seed):
    """Tokens on a 2-D non-linear surface in R^C: PCA needs far more than 2 components for it."""
    g = torch.Generator().manual_seed(seed)
    z = torch.rand(n, 2, generator=g) * 2 - 1
    basis = torch.stack([z[:, 0], z[:, 1], z[:, 0] ** 2, z[:, 1] ** 2, z[:, 0] * z[:, 1],
                         torch.sin(3 * z[:, 0]), torch.cos(3 * z[:, 1])], dim=1)
    mixing = torch.randn(7, C, generator=torch.Generator().manual_seed(99))
    return (basis @ mixing).reshape(-1, T, C)



def test_mlp_src_beats_pca_at_the_same_dim_after_training():
    torch.manual_seed(0)
    train, held_out = curved_features(256 * T, seed=1), curved_features(64 * T, seed=2)
    pca = pca_from_moments(*feature_moments(train))
    linear = SRC.from_pca(pca, dim=2).eval()
    learned = SRC.from_pca(pca, dim=2, arch="mlp", hidden=64, depth=2, stats_momentum=0.1)
    optimizer = torch.optim.Adam(learned.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(3)
    for _step in range(150):
        f = train[torch.randint(len(train), (32,), generator=g)]
        _, f_hat = learned(f)
        loss, _ = src_loss(f, f_hat, cosine_weight=0.1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    learned.eval()
    with torch.no_grad():
        mse_pca = (linear.decode(linear.encode(held_out)) - held_out).square().mean().item()
        mse_mlp = (learned.decode(learned.encode(held_out)) - held_out).square().mean().item()
        c = learned.encode(held_out).reshape(-1, 2)
    assert mse_mlp < 0.3 * mse_pca, (mse_mlp, mse_pca)
    # the tracked code statistics keep eval-mode codes near unit variance
    torch.testing.assert_close(c.std(0), torch.ones(2), atol=0.15, rtol=0)


def test_src_loss_is_mse_plus_weighted_cosine_distance():
    f = torch.randn(2, T, C)
    f_hat = f + 0.1 * torch.randn(2, T, C)
    loss, parts = src_loss(f, f_hat, cosine_weight=0.5)
    mse = ((f_hat - f) ** 2).mean()
    cosine = ((f_hat * f).sum(-1) / (f_hat.norm(dim=-1) * f.norm(dim=-1))).mean()
    torch.testing.assert_close(parts["mse"], mse)
    torch.testing.assert_close(parts["cosine"], cosine)
    torch.testing.assert_close(loss, mse + 0.5 * (1 - cosine))
    assert src_loss(f, f, cosine_weight=1.0)[0].item() == pytest.approx(0.0, abs=1e-6)


def test_add_code_noise_adds_sigma_times_standard_normal():
    c = torch.randn(64, T, 8)
    assert torch.equal(add_code_noise(c, 0.0), c)
    noise = add_code_noise(c, 0.3, generator=torch.Generator().manual_seed(0)) - c
    assert noise.std().item() == pytest.approx(0.3, rel=0.03)
    assert noise.mean().item() == pytest.approx(0.0, abs=0.01)
    again = add_code_noise(c, 0.3, generator=torch.Generator().manual_seed(0)) - c
    assert torch.equal(noise, again)


def test_forward_decodes_the_noisy_code():
    f = correlated_features(b=4).float()
    src = fitted(f, dim=6)
    c, f_hat = src(f, sigma=0.2, generator=torch.Generator().manual_seed(5))
    noisy = add_code_noise(c, 0.2, generator=torch.Generator().manual_seed(5))
    assert torch.equal(f_hat, src.decode(noisy))


def test_training_mode_tracks_code_statistics_and_allows_gradient_accumulation():
    f = correlated_features(b=8).float()
    src = fitted(f, dim=6, arch="mlp", hidden=16, depth=1, stats_momentum=0.5).train()
    before = src.code_scale.clone()
    losses = [src_loss(x, src(x, sigma=0.1)[1], cosine_weight=1.0)[0] for x in (f[:4] * 2, f[4:] * 2)]
    sum(losses).backward()  # two forwards, one backward: the in-place stat updates must not break autograd
    c = src.encode(f * 2).reshape(-1, 6)
    torch.testing.assert_close(c.std(0, unbiased=False), torch.ones(6), atol=1e-3, rtol=0)  # batch statistics
    assert (src.code_scale > 1.5 * before).all()  # the tracked scale follows the doubled features
