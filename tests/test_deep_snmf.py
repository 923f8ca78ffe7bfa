"""Recursive SNMF (`snmf_deep`): a planted two-level hierarchy is recovered (parents by level-2 features, tree edges to
their planted children), joint fine-tuning lowers the stacked loss and keeps Y >= 0 and Z_L's support, and every
level is an ordinary feature method."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bench.activations import Activations
from bench.feature_tree import edges
from bench.fits import FitCache
from bench.sites import Site
from methods.snmf_deep import DeepSNMF

N_PARENTS, N_CHILDREN, D = 4, 3, 200


def planted(seed: int = 0, n: int = 3000) -> tuple[Activations, torch.Tensor, torch.Tensor]:
    """Tokens each made of one child (times a random code) plus noise; child = its parent's 4 neurons (values 2-3)
    plus 8 neurons of its own (values 1-1.5). Returns acts, parents [4, D], children [12, D] (child i of parent i//3).
    Own sets larger than the parent's make the children identifiable: a sibling difference has 16 > 12 neurons."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(D, generator=g)
    parents, children = torch.zeros(N_PARENTS, D), torch.zeros(N_PARENTS * N_CHILDREN, D)
    k = 0
    for p in range(N_PARENTS):
        parents[p, perm[k : k + 4]] = 2 + torch.rand(4, generator=g)
        k += 4
        for c in range(N_CHILDREN):
            i = p * N_CHILDREN + c
            children[i] = parents[p]
            children[i, perm[k : k + 8]] = 1 + 0.5 * torch.rand(8, generator=g)
            k += 8
    pick = torch.randint(0, len(children), (n,), generator=g)
    x = (0.5 + torch.rand(n, 1, generator=g)) * children[pick] + 0.01 * torch.randn(n, D, generator=g)
    idx = torch.arange(n)
    acts = Activations(x=x, site=Site(0, "mlp"), model_id="planted", prompt_idx=idx // 4, position=idx % 4,
                       token_ids=idx * 0, texts=[""] * (n // 4))
    return acts, parents, children


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.normalize(a, dim=1) @ F.normalize(b, dim=1).T


@pytest.fixture(scope="module")
def fitted() -> tuple[DeepSNMF, torch.Tensor, torch.Tensor, Activations]:
    acts, parents, children = planted()
    method = DeepSNMF(ranks=(12, 4), sparsity=0.06, max_iter=300, fine_tune_steps=50, device="cpu").fit(acts)
    return method, parents, children, acts


def test_planted_hierarchy_is_recovered(fitted) -> None:  # noqa: ANN001
    method, parents, children, _ = fitted
    c1, c2 = _cos(method.level_directions_[0], children), _cos(method.level_directions_[1], parents)
    assert (c1.max(0).values > 0.99).all(), c1.max(0).values  # every planted child is a level-1 feature
    assert (c2.max(0).values > 0.9).all(), c2.max(0).values  # every planted parent is a level-2 feature
    child_of_feature = c1.argmax(1).tolist()
    tree = edges(method.coefficients_[0])
    for p in range(N_PARENTS):
        j = int(c2[:, p].argmax())
        got = sorted(child_of_feature[i] for i in tree[j])
        assert got == [p * N_CHILDREN + c for c in range(N_CHILDREN)], (p, j, got)


def test_fine_tuning_lowers_the_stacked_loss_and_keeps_the_constraints() -> None:
    acts, _, _ = planted(seed=1, n=1200)
    base = dict(ranks=(12, 8), sparsity=0.06, max_iter=60, device="cpu", fine_tune_lr=1e-2)
    none = DeepSNMF(**base, fine_tune_steps=0).fit(acts)
    tuned = DeepSNMF(**base, fine_tune_steps=60).fit(acts)
    m0, m1 = none.fit_metrics_, tuned.fit_metrics_
    assert m0["stack_mse_before"] == m0["stack_mse_after"] == pytest.approx(m1["stack_mse_before"])
    assert m1["stack_mse_after"] < 0.9 * m1["stack_mse_before"], m1
    for y in tuned.tuned_coefficients_:
        assert (y >= 0).all()
    top = tuned.tuned_directions_[-1]
    assert ((top != 0) <= (tuned.level_directions_[-1] != 0)).all(), "Z_L stays on its winner-take-all support"
    z1 = tuned.tuned_directions_[0]  # level 1 of the stack: Z_L Y_L ... Y_2
    torch.testing.assert_close(z1, (tuned.tuned_directions_[-1].T @ tuned.tuned_coefficients_[0]).T)
    assert z1.shape == (12, D) and tuned.encode(acts.x).min() >= 0
    # the reference's learning rate lowers it too, less in as many steps
    ref = DeepSNMF(**{**base, "fine_tune_lr": 1e-3}, fine_tune_steps=60).fit(acts)
    assert m1["stack_mse_after"] < ref.fit_metrics_["stack_mse_after"] < 0.97 * ref.fit_metrics_["stack_mse_before"]


def test_every_level_is_a_feature_method(fitted) -> None:  # noqa: ANN001
    method, _, _, acts = fitted
    x = acts.x[:50]
    assert method.directions_.shape == (4, D) and method.encode(x).shape == (50, 4)  # default: the coarsest
    level1 = DeepSNMF(ranks=(12, 4), level=1)
    for attr in ("level_directions_", "coefficients_", "tuned_directions_", "tuned_coefficients_"):
        setattr(level1, attr, getattr(method, attr))
    torch.testing.assert_close(level1.codes(x, 1) @ method.coefficients_[0].T, method.codes(x, 2))
    assert method.codes(x, 2, fine_tuned=True).shape == (50, 4)
    assert (method.top_codes_[:, :-1] >= method.top_codes_[:, 1:]).all()


def test_validation_names_the_fix() -> None:
    acts, _, _ = planted(n=40)
    with pytest.raises(ValueError, match="level=3; valid: 1..2"):
        DeepSNMF(ranks=(4, 2), level=3).fit(acts)
    with pytest.raises(ValueError, match="ranks="):
        DeepSNMF(ranks=()).fit(acts)


def test_fit_cache_round_trip(tmp_path) -> None:  # noqa: ANN001
    acts, _, _ = planted(n=400)
    fitted = DeepSNMF(ranks=(6, 3), sparsity=0.06, max_iter=20, fine_tune_steps=5, device="cpu")
    FitCache(tmp_path).fit("snmf_deep", fitted, acts)
    fresh = DeepSNMF(ranks=(6, 3), sparsity=0.06, max_iter=20, fine_tune_steps=5, device="cpu")
    assert FitCache(tmp_path).fit("snmf_deep", fresh, acts).cached
    for a, b in zip(fresh.coefficients_, fitted.coefficients_, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(fresh.encode(acts.x), fitted.encode(acts.x), rtol=0, atol=0)
