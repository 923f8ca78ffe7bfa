"""The labeler choice measurement (issue #14): its scores on hand-made cases, and the whole path (setup, labels of
every variant, CSV frame) on tiny:gpt2 with the local labeler tiny:llama and a bag-of-words embedder."""

from __future__ import annotations

import re
from typing import Any

import pytest
import torch

from bench.config import RunConfig
from bench.judge import OfflineGrader
from bench.labeler_choice import (
    COLUMNS,
    diversity,
    example_labels,
    measure,
    names_concept,
    ranking,
    setup,
    summary,
    variants,
)
from tests.conftest import FIXTURE_CONCEPTS

_WORD = re.compile(r"[a-z]+")


def _bag_of_words(texts: Any) -> torch.Tensor:
    out = torch.zeros(len(texts), 64)
    for i, t in enumerate(texts):
        for w in _WORD.findall(t.lower()):
            out[i, sum(map(ord, w)) % 64] += 1
    return torch.nn.functional.normalize(out + 1e-6, dim=-1)


class _BagOfWords(OfflineGrader):
    """An offline grader whose embedding is a hashed bag of words (no model download in tests)."""

    def embed(self, texts: Any, batch_size: int = 64) -> torch.Tensor:  # noqa: ARG002
        return _bag_of_words(texts)


def test_names_concept_rate_baseline_and_constant_on_a_hand_made_case() -> None:
    labels = ["Music", "stars", None, "music"]
    cos = torch.tensor([[0.9, 0.6, 0.1, 0.1],   # names its own concept and concept 1
                        [0.2, 0.8, 0.1, 0.1],   # names its own
                        [0.9, 0.9, 0.9, 0.9],   # unlabelled: names nothing whatever the cosine
                        [0.5, 0.1, 0.1, 0.2]])  # names concept 0, not its own
    s = names_concept(labels, cos, 0.5)
    assert s.n == 4 and s.rate == pytest.approx(2 / 4)
    assert s.baseline == pytest.approx(2 / 12)  # (0, 1) and (3, 0) of the 12 pairs c != c'
    assert s.constant_label == "Music" and s.constant == pytest.approx(2 / 4)  # "music" twice; row 0 names 0 and 1
    with pytest.raises(ValueError, match="cosine matrix"):
        names_concept(labels, cos[:3], 0.5)


def test_diversity_counts_distinct_labels_the_top_one_and_echoes() -> None:
    d = diversity(["Musical instruments", "musical instruments.", None, "colours", "Clothing", "clothing"],
                  examples=["musical instruments", "public transport"])
    assert (d.n, d.labelled, d.distinct) == (6, 5, 3)
    assert d.top == "Musical instruments" and d.top_count == 2 and d.echo == 2
    assert diversity([None, None]).top is None and diversity([None]).distinct == 0


def test_variants_name_their_examples() -> None:
    table = variants()
    assert set(table) == {"shipped", "far", "rotated", "zero"}
    assert "musical instruments" in table["shipped"].examples
    assert table["zero"].examples == () and len(table["rotated"].sets) == 3 and len(table["rotated"].examples) >= 9
    for v in table.values():
        for tin, tout in v.sets:
            assert "{examples}" in tin.body and "{tokens}" in tout.body
            assert len({tin.tag, tout.tag}) == 2
    assert example_labels(table["far"].sets[0][1]) == ["clothing", "suffixes", "hand tools"]


def test_measure_on_tiny_gpt2_with_a_local_labeler(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("bench.judge.make_judge", lambda spec, **_: _BagOfWords())
    cfg = RunConfig(models=("tiny:gpt2",), layers=(1,), methods=("dim", "snmf"), concepts=str(FIXTURE_CONCEPTS),
                    method={"snmf": {"n_features": 6, "max_iter": 10}}, device="cpu")
    ctx, methods, judge = setup(cfg, 1)
    assert set(methods) == {"dim", "snmf"} and ctx.layer == 1
    frame = measure(ctx, methods, ["tiny:llama"], ["shipped", "rotated"], judge.embed, 0.3, n_sample=4)
    assert list(frame.columns) == COLUMNS
    rows = frame[frame["method"] != ""]
    assert set(rows["method"]) == {"dim", "snmf"} and set(rows["variant"]) == {"shipped", "rotated"}
    n_concepts = len(ctx.concepts.concepts)
    by = rows.set_index(["variant", "method", "metric"])
    for v in ("shipped", "rotated"):
        for m in ("dim", "snmf"):
            for side in ("input", "output"):
                assert by.loc[(v, m, f"{side}_names_concept"), "n"] == n_concepts
                assert by.loc[(v, m, f"{side}_names_concept_baseline"), "n"] == n_concepts * (n_concepts - 1)
                assert 0 <= by.loc[(v, m, f"{side}_names_concept_baseline"), "value"] <= 1
                assert by.loc[(v, m, f"{side}_distinct"), "n"] == (3 if m == "dim" else 4)  # dim: 3 features
                assert by.loc[(v, m, f"{side}_distinct"), "value"] <= by.loc[(v, m, f"{side}_labelled"), "value"]
    assert len(summary(frame)) == 4 and len(ranking(frame)) == 2
    again = measure(ctx, methods, ["tiny:llama"], ["shipped"], judge.embed, 0.3, n_sample=4)
    assert judge.cache.hits > 0  # the second pass reads the judge cache
    assert again[again["metric"] != "seconds"].reset_index(drop=True).equals(
        frame[(frame["variant"] == "shipped") & (frame["metric"] != "seconds")].reset_index(drop=True))
    with pytest.raises(ValueError, match="unknown prompt variant"):
        measure(ctx, methods, ["tiny:llama"], ["nope"], judge.embed, 0.3)
