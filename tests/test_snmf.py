"""SNMF: planted recovery, exact WTA support, trace-form loss, the reference's iteration, chunked and streamed
fits equal to the in-memory fit, determinism, validation, encode, and the FeatureMethod contract."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from scipy.optimize import linear_sum_assignment

import methods.snmf
from bench import Activations, Site
from bench.checks import check_method
from methods.snmf import INITS, SNMF, _Chunks, _dense_at, _loss, _sweep


def make_acts(x: torch.Tensor, source: Path | None = None) -> Activations:
    n = len(x)
    return Activations(
        x=x, site=Site(0, "mlp"), model_id="synthetic", prompt_idx=torch.arange(n) // 10,
        position=torch.arange(n) % 10, token_ids=torch.zeros(n, dtype=torch.long),
        texts=[f"text {i}" for i in range((n + 9) // 10)], source=source,
    )


def planted(
    d: int = 200, k: int = 8, n: int = 2000, s: int = 10, noise: float = 0.01, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [n, d] = (Z* Y*)^T + noise with Z* [d, k] of s signed non-zeros per column, Y* [k, n] >= 0 sparse."""
    g = torch.Generator().manual_seed(seed)
    z = torch.zeros(d, k)
    for j in range(k):
        z[torch.randperm(d, generator=g)[:s], j] = torch.randn(s, generator=g)
    y = torch.rand(k, n, generator=g) * (torch.rand(k, n, generator=g) < 0.25)
    return (z @ y).T.contiguous() + noise * torch.randn(n, d, generator=g), z, y


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return planted()


def matched_cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosines of the Hungarian matching of rows of a [k, d] to rows of b [k, d]."""
    cos = F.normalize(a, dim=1) @ F.normalize(b, dim=1).T
    rows, cols = linear_sum_assignment(-cos.numpy())
    return cos[rows, cols]


SMALL = dict(n_features=8, sparsity=0.05, max_iter=200, patience=20, device="cpu")


def test_recovers_planted_features_and_loss_falls(data):
    x, z, _ = data
    acts = make_acts(x)
    one = SNMF(**SMALL | {"max_iter": 1, "init": "svd"}).fit(acts).fit_metrics_["loss"]
    m = SNMF(**SMALL | {"init": "svd"}).fit(acts)
    assert matched_cos(m.directions_, z.T).mean() > 0.95
    assert m.fit_metrics_["loss"] < 0.5 * one
    assert m.fit_metrics_["rel_error"] < 0.1
    # the paper's random init, best of three seeds by loss (like any NMF it can stop in a local minimum)
    fits = [SNMF(**SMALL | {"max_iter": 300, "seed": s}).fit(acts) for s in range(3)]
    best = min(fits, key=lambda f: f.fit_metrics_["loss"])
    assert matched_cos(best.directions_, z.T).mean() > 0.95


@pytest.mark.parametrize(("d", "sparsity"), [(200, 0.05), (64, 0.01), (64, 0.2)])
def test_each_feature_keeps_exactly_ceil_sparsity_d(d, sparsity):
    x = planted(d=d, n=400)[0]
    m = SNMF(n_features=6, sparsity=sparsity, max_iter=10, device="cpu").fit(make_acts(x))
    assert ((m.directions_ != 0).sum(1) == math.ceil(sparsity * d)).all()


def test_trace_form_loss_equals_explicit():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(50, 30, generator=g, dtype=torch.float64)
    data = _Chunks(make_acts(x), None, torch.device("cpu"), torch.float64)
    sq = data.stats()[2]
    y = torch.rand(4, 50, generator=g, dtype=torch.float64)
    z = torch.randn(30, 4, generator=g, dtype=torch.float64)
    idx = z.abs().topk(5, dim=0).indices
    z = torch.zeros_like(z).scatter_(0, idx, z.gather(0, idx))
    nrm = y.norm(dim=1)
    m, c = _sweep(data, y, z, idx, nrm)  # updates y in place
    explicit = float((x.T - z @ y).square().sum())
    assert _loss(sq, z, m, c) == pytest.approx(explicit, rel=1e-10)
    torch.testing.assert_close(m, x.T @ y.T)
    torch.testing.assert_close(c, y @ y.T)


def reference_loop(a: torch.Tensor, g: torch.Tensor, s: int, iters: int) -> tuple[torch.Tensor, float]:
    """The paper's iteration written plainly on A [d, n], G = Y^T [n, k]: (best Z, best loss)."""
    k, best, best_z = g.shape[1], math.inf, None
    for _ in range(iters):
        z = a @ g @ torch.linalg.inv(g.T @ g + 1e-6 * torch.eye(k, dtype=g.dtype))
        z = z * (z.abs() >= z.abs().topk(s, dim=0).values[-1])
        norms = g.norm(dim=0).clamp_min(1e-8)
        g, z = g / norms, z * norms
        p, q = a.T @ z, z.T @ z
        num, den = p.clamp_min(0) + g @ (-q).clamp_min(0), (-p).clamp_min(0) + g @ q.clamp_min(0)
        g = g * torch.sqrt(num / (den + 1e-6))
        loss = float((a - z @ g.T).square().sum())
        if loss < best - 1e-4:
            best, best_z = loss, z
    return best_z, best


def test_matches_the_reference_iteration(data):
    x = data[0][:600].double()
    g0 = torch.rand(600, 8, generator=torch.Generator().manual_seed(3)).clamp_min(1e-6).double()
    z_ref, loss_ref = reference_loop(x.T, g0, 10, 15)
    m = SNMF(**SMALL | {"max_iter": 15, "patience": 100, "seed": 3, "dtype": "float64"}).fit(make_acts(x))
    assert m.fit_metrics_["loss"] == pytest.approx(loss_ref, rel=1e-8)
    torch.testing.assert_close(m.directions_, z_ref.T.float(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("init", INITS)
def test_chunked_and_streamed_fits_equal_in_memory(data, tmp_path, init):
    x = data[0][:1000].double()
    cfg = SMALL | {"init": init, "max_iter": 30, "dtype": "float64"}
    whole = SNMF(**cfg).fit(make_acts(x))
    chunked = SNMF(**cfg | {"chunk_tokens": 128}).fit(make_acts(x))
    path = tmp_path / "acts.safetensors"
    save_file({"x": x}, str(path))
    streamed = SNMF(**cfg | {"chunk_tokens": 300}).fit(replace(make_acts(x, path), x=x[:0]))  # no x in memory
    for other in (chunked, streamed):
        torch.testing.assert_close(other.directions_, whole.directions_, atol=1e-5, rtol=1e-5)
        assert other.fit_metrics_["loss"] == pytest.approx(whole.fit_metrics_["loss"], rel=1e-8)
        assert other.fit_metrics_["n_iter"] == whole.fit_metrics_["n_iter"]


def test_dense_product_kernel_choice_changes_nothing(data, monkeypatch):
    a, y = torch.randn(200, 700), torch.rand(8, 700)
    for a_, y_ in [(a, y), (a[:, 100:400].contiguous(), y[:, 100:400]), (a[:, 100:400], y[:, 100:400])]:
        torch.testing.assert_close(_dense_at(a_, y_), a_ @ y_.T, atol=1e-4, rtol=1e-5)  # float32 rounding only
    acts = make_acts(data[0][:600])
    fast = SNMF(**SMALL | {"max_iter": 20}).fit(acts)
    monkeypatch.setattr(methods.snmf, "USE_ONEDNN", False)
    default = SNMF(**SMALL | {"max_iter": 20}).fit(acts)
    torch.testing.assert_close(fast.directions_, default.directions_, atol=1e-4, rtol=1e-4)


def test_float32_chunked_close_to_in_memory(data):
    acts = make_acts(data[0])
    whole = SNMF(**SMALL | {"max_iter": 30}).fit(acts)
    chunked = SNMF(**SMALL | {"max_iter": 30, "chunk_tokens": 256}).fit(acts)
    assert matched_cos(chunked.directions_, whole.directions_).min() > 0.999
    assert chunked.fit_metrics_["loss"] == pytest.approx(whole.fit_metrics_["loss"], rel=1e-3)


@pytest.mark.parametrize("init", INITS)
def test_same_seed_same_factors_and_every_init_runs(data, init):
    acts = make_acts(data[0][:500])
    a, b = (SNMF(**SMALL | {"init": init, "max_iter": 20, "seed": 7}).fit(acts) for _ in range(2))
    assert torch.equal(a.directions_, b.directions_)
    assert a.directions_.shape == (8, 200) and torch.isfinite(a.directions_).all()
    assert set(a.fit_metrics_) == {"loss", "rel_error", "n_iter", "fit_seconds"}
    assert all(isinstance(v, float) for v in a.fit_metrics_.values())
    if init != "svd":  # the svd init has no randomness
        c = SNMF(**SMALL | {"init": init, "max_iter": 20, "seed": 8}).fit(acts)
        assert not torch.equal(a.directions_, c.directions_)


def test_early_stop_after_patience(data):
    m = SNMF(**SMALL | {"max_iter": 500, "patience": 5, "tol": 1e9, "tol_mode": "absolute"}).fit(
        make_acts(data[0][:300]))
    assert m.fit_metrics_["n_iter"] == 6  # the first iteration improves on inf, the next five do not


def _losses(monkeypatch, x: torch.Tensor, **params) -> tuple[list[float], float]:
    """The loss of every iteration of a fit on x, and its n_iter."""
    seen: list[float] = []
    real = methods.snmf._loss

    def spy(*a):
        seen.append(real(*a))
        return seen[-1]

    monkeypatch.setattr(methods.snmf, "_loss", spy)
    m = SNMF(**SMALL | params).fit(make_acts(x))
    monkeypatch.setattr(methods.snmf, "_loss", real)
    return seen, m.fit_metrics_["n_iter"]


def test_stopping_is_scale_free(data, monkeypatch):
    """Scaling the data by 1000 scales every loss by 1e6 and stops at the same iteration (the old absolute tol
    stopped the small-scale fit early and ran the large-scale one to max_iter)."""
    x = data[0][:600].double()  # ||A - ZY||^2 ~ 12 at the end
    cfg = {"max_iter": 400, "patience": 5, "tol": 1e-4, "dtype": "float64"}
    small, n_small = _losses(monkeypatch, x, **cfg)
    large, n_large = _losses(monkeypatch, x * 1000, **cfg)
    assert n_small == n_large < 400, "patience must trigger, and at the same iteration"
    small_t, large_t = (torch.tensor(v, dtype=torch.float64) for v in (small, large))
    torch.testing.assert_close(large_t, small_t * 1e6, rtol=1e-4, atol=0)  # EPS terms differ at ~1e-6
    # the reference's absolute rule stays reachable, and there the stopping point moves with the scale
    cfg |= {"tol": 1e-3, "tol_mode": "absolute"}  # ~1e-4 of the loss at scale 1, ~1e-10 at scale 1000
    abs_small = _losses(monkeypatch, x, **cfg)[1]
    abs_large = _losses(monkeypatch, x * 1000, **cfg)[1]
    assert abs_small < abs_large


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"init": "svdd"}, "unknown init 'svdd'; valid: random, svd, kmeans"),
        ({"sparsity": 0.0}, "valid: 0 < sparsity <= 1"),
        ({"sparsity": 1.5}, "valid: 0 < sparsity <= 1"),
        ({"dtype": "float16"}, "valid: float32, float64"),
        ({"device": "gpu"}, "valid: auto, cpu, cuda"),
        ({"chunk_tokens": 0}, "chunk_tokens"),
        ({"n_features": 201, "init": "svd"}, "init='svd' needs n_features <= 200"),
        ({"n_features": 301, "init": "kmeans"}, "lower n_features or use init='random'"),
        ({"max_iter": 0}, "max_iter=0 must be >= 1"),
        ({"tol_mode": "abs"}, "unknown tol_mode 'abs'; valid: relative, absolute"),
        ({"tol": 1.0}, "valid: 0 <= tol < 1 with tol_mode='relative'"),
        ({"tol": -1.0, "tol_mode": "absolute"}, "tol >= 0 with tol_mode='absolute'"),
    ],
)
def test_bad_values_raise_naming_the_valid_ones(data, params, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        SNMF(**SMALL | params).fit(make_acts(data[0][:300]))


def test_streaming_needs_chunk_tokens(data, tmp_path):
    path = tmp_path / "acts.safetensors"
    save_file({"x": data[0][:100]}, str(path))
    with pytest.raises(ValueError, match="set chunk_tokens"):
        SNMF(**SMALL).fit(replace(make_acts(data[0][:100], path), x=data[0][:0]))


def test_encode_recovers_codes_on_held_out_tokens(data):
    x, z, y = data
    m = SNMF(**SMALL | {"init": "svd"}).fit(make_acts(x[:1500]))
    held_out, y_true = x[1500:], y[:, 1500:]  # [500, d], [k, 500]
    codes = m.encode(held_out)  # [500, k]
    assert codes.shape == (500, 8) and (codes >= 0).all()
    recon = codes @ m.directions_
    assert float((held_out - recon).norm() / held_out.norm()) < m.fit_metrics_["rel_error"] + 0.02
    cos = F.normalize(m.directions_, dim=1) @ F.normalize(z.T, dim=1).T
    rows, cols = linear_sum_assignment(-cos.numpy())
    corr = torch.corrcoef(torch.cat([codes[:, rows].T, y_true[cols]]))[:8, 8:].diagonal()
    assert corr.min() > 0.95


def test_defaults_pass_the_contract_on_tiny_activations():
    x = torch.randn(300, 64, generator=torch.Generator().manual_seed(0)).relu()  # k=100 > d=64 is fine for random
    check_method(SNMF(), make_acts(x))


@pytest.mark.parametrize("init", INITS)
def test_feature_method_contract(init):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 64, generator=g).relu()  # tiny d=64, n=300
    check_method(SNMF(n_features=16, max_iter=30, init=init, device="cpu"), make_acts(x))
    check_method(SNMF(n_features=16, max_iter=30, init=init, chunk_tokens=100, device="cpu"), make_acts(x))
