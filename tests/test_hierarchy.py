"""The hierarchy analysis: Jaccard of neuron sets, the overlap statistic against a null of the same statistic
(random data stays inside it, planted nested supports leave it), permutation p-values that are never 0, and the
SNMF pipeline end to end."""

from __future__ import annotations

import numpy as np
import torch

from bench.hierarchy import analyze, jaccard, link_levels, overlap_test, write
from bench.sites import Site
from tests.conftest import planted_acts

D, N_PERM = 512, 199


def _random_supports(k: int, size: int, seed: int) -> torch.Tensor:
    """k random neuron sets of `size` out of D: masks [k, D]."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(k, D, dtype=torch.bool)
    for i in range(k):
        mask[i, torch.randperm(D, generator=g)[:size]] = True
    return mask


def _nested(parents: torch.Tensor, n_children: int, size: int, seed: int) -> torch.Tensor:
    """Children [n_children, D]: child i is a random subset of `size` neurons of parent i % len(parents)."""
    g = torch.Generator().manual_seed(seed)
    child = torch.zeros(n_children, D, dtype=torch.bool)
    for i in range(n_children):
        neurons = parents[i % len(parents)].nonzero().squeeze(1)
        child[i, neurons[torch.randperm(len(neurons), generator=g)[:size]]] = True
    return child


def test_jaccard_of_neuron_sets() -> None:
    a = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1]], dtype=torch.bool)
    b = torch.tensor([[1, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    torch.testing.assert_close(jaccard(a, b), torch.tensor([[0.5, 0.5], [0.0, 0.5]]))


def test_random_supports_stay_inside_the_null() -> None:
    for seed in range(4):  # independent random supports: no structure between the levels
        child, parent = _random_supports(40, 10, seed=10 + 2 * seed), _random_supports(20, 10, seed=11 + 2 * seed)
        t = overlap_test(child, parent, N_PERM, seed=seed)
        assert t["null_lo"] <= t["mean_jaccard"] <= t["null_hi"], t
        assert t["jaccard_p"] > 0.05 and 0.8 < t["jaccard_ratio"] < 1.25, t
        # the old "chance" (the expected Jaccard of one random pair) is far below a max over 20 parents
        density = 10 / D
        assert t["mean_jaccard"] > 3 * density / (2 - density)


def test_nested_supports_leave_the_null() -> None:
    parent = _random_supports(20, 20, seed=3)
    child = _nested(parent, 40, 8, seed=4)
    t = overlap_test(child, parent, N_PERM, seed=0)
    assert t["jaccard_p"] == 1 / (1 + N_PERM), t
    assert t["mean_jaccard"] > t["null_hi"] and t["jaccard_ratio"] > 5, t


def test_concept_links_p_values() -> None:
    """Children that inherit their parent's concept are coherent at the minimum p; shuffled concepts are not;
    no p-value is ever 0."""
    parent = _random_supports(20, 20, seed=5)
    child = _nested(parent, 40, 8, seed=6)
    parents = [f"c{j}" for j in range(20)]
    kinds = {f"c{j}": f"kind{j % 4}" for j in range(20)}
    inherited = [parents[i % 20] for i in range(40)]
    shuffled = [parents[(7 * i + 3) % 20] for i in range(40)]
    for children, coherent in ((inherited, True), (shuffled, False)):
        levels = {20: (parent, parents, torch.ones(20)), 40: (child, children, torch.ones(40))}
        (row,) = link_levels(levels, kinds, seed=0, n_perm=N_PERM).coherence.to_dict("records")
        for key in ("same_concept_p", "same_kind_p", "jaccard_p"):
            assert 1 / (1 + N_PERM) <= row[key] <= 1, (key, row[key])
        if coherent:
            assert row["same_concept"] == row["same_kind"] == 1.0
            assert row["same_concept_p"] == row["same_kind_p"] == 1 / (1 + N_PERM)
        else:
            assert row["same_concept"] < 0.2 and row["same_concept_p"] > 0.05


def test_hierarchy_links_levels_and_writes_figure(tmp_path) -> None:  # noqa: ANN001
    acts = planted_acts(n=400, d=64, n_concepts=4)
    acts.x = acts.x.abs()  # MLP-like non-negative-ish data
    acts.site = Site(0, "mlp")
    kinds = {"c0": "topic", "c1": "topic", "c2": "form", "c3": "form"}
    h = analyze(acts, kinds, ks=[2, 4, 8], max_iter=30, sparsity=0.1, n_perm=50)
    assert set(h.links["k"]) == {4, 8} and len(h.links) == 12
    assert (h.links["parent"] < h.links["parent_k"]).all()
    c = h.coherence
    assert list(c["k"]) == [4, 8] and (c["n_perm"] == 50).all()
    assert ((c["null_lo"] <= c["null_jaccard"]) & (c["null_jaccard"] <= c["null_hi"])).all()
    assert np.allclose(c["jaccard_ratio"], c["mean_jaccard"] / c["null_jaccard"])
    for key in ("jaccard_p", "same_concept_p", "same_kind_p"):
        assert c[key].between(1 / 51, 1).all()
    by_k = h.links.groupby("k")["jaccard"].mean()
    assert np.allclose(c.set_index("k")["mean_jaccard"], by_k), "the statistic is the mean of the links' max Jaccard"
    paths = write(h, tmp_path)
    assert {p.name for p in paths} == {"hierarchy_links.csv", "hierarchy_coherence.csv", "hierarchy.png",
                                       "hierarchy.pdf"}
    assert all(p.exists() and p.stat().st_size > 0 for p in paths)
