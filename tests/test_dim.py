from __future__ import annotations

import pytest
import torch

from methods.dim import DiffInMeans
from tests.conftest import planted_acts


def test_dim_recovers_planted_directions() -> None:
    acts = planted_acts(n=800, d=32, n_concepts=4)
    dim = DiffInMeans(site=acts.site).fit(acts)
    planted = acts.planted  # [4, 32]
    # mean(concept) - mean(rest) = planted_c - mean of the other planted directions: project that out
    expected = torch.nn.functional.normalize(planted - (planted.sum(0) - planted) / 3, dim=-1)
    cos = (dim.directions_ * expected).sum(-1)
    assert cos.min() > 0.95, cos
    assert dim.concepts_ == acts.concepts


def test_dim_needs_labels() -> None:
    acts = planted_acts()
    acts.labels = None
    with pytest.raises(ValueError, match="needs concept labels"):
        DiffInMeans().fit(acts)


def test_contrast_labels_take_each_concepts_own_negatives_and_chunks_do_not_change_the_means() -> None:
    """int labels: +1 rows against the -1 rows of the same column (0 rows ignored), as the paper's DiM per feature."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 8, generator=g)
    labels = torch.zeros(48, 2, dtype=torch.int8)
    labels[:10, 0], labels[10:25, 0] = 1, -1
    labels[20:30, 1], labels[40:, 1] = 1, -1
    acts = planted_acts(n=48, d=8)
    acts.x, acts.labels, acts.concepts = x, labels, ["a", "b"]
    whole = DiffInMeans(site=acts.site, normalize=False).fit(acts)
    expected = torch.stack([x[:10].mean(0) - x[10:25].mean(0), x[20:30].mean(0) - x[40:].mean(0)])
    torch.testing.assert_close(whole.directions_, expected, rtol=1e-5, atol=1e-5)
    chunked = DiffInMeans(site=acts.site, normalize=False, chunk_tokens=7).fit(acts)
    torch.testing.assert_close(chunked.directions_, whole.directions_, rtol=1e-5, atol=1e-5)


def test_boolean_labels_contrast_with_every_other_row() -> None:
    acts = planted_acts(n=60, d=6, n_concepts=3)
    dim = DiffInMeans(site=acts.site, normalize=False, chunk_tokens=11).fit(acts)
    y = acts.labels.bool()
    expected = torch.stack([acts.x[y[:, c]].mean(0) - acts.x[~y[:, c]].mean(0) for c in range(3)])
    torch.testing.assert_close(dim.directions_, expected, rtol=1e-5, atol=1e-5)
