"""The feature-concept judge's validation: the committed agreement table is what the committed labels and signals
give, the labels file is well-formed and its draw reproducible, the agreement measures are right on planted data,
and the committed signals are what MiniLM measures (slow)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bench.data import package_data
from bench.judge import OfflineThresholds
from bench.judge_validation import kappa_grid
from bench.judge_validation_feature import (
    EXPECTED_FILE,
    PROVENANCE,
    agreement_table,
    cross_validate,
    draw_pairs,
    judge_ratings,
    kappa_grid_weighted,
    label_counts,
    load_labels,
    load_signals,
    weighted_kappa,
)

ROOT = Path(__file__).parent.parent


def test_agreement_table_matches_the_committed_table() -> None:
    """Drift check: the table recomputed from the committed labels and signals equals the committed one."""
    expected = pd.read_csv(package_data(EXPECTED_FILE))
    pd.testing.assert_frame_equal(agreement_table(), expected, check_dtype=False, atol=1e-4)


def test_labels_are_well_formed() -> None:
    labels = load_labels()
    assert len(labels) == 120 and labels["id"].is_unique
    assert set(labels["concept_rating"]) == {0, 1, 2}
    assert not {"judge", "cos"} & set(labels.columns), "the judge's output lives in the signals file"
    assert labels["rater"].str.contains("not a human annotator").all()
    for column in (*PROVENANCE, "label", "side", "text", "stratum", "weight"):
        assert labels[column].notna().all() and (labels[column].astype(str) != "").all(), column
    assert set(labels["side"]) == {"input", "output"}
    assert (labels["model"] == "gemma-3-270m-gguf").all() and (labels["site"] == "mlp@9").all()
    strata = labels.groupby("stratum")["weight"].agg(["size", "min", "max"])
    assert strata.loc["judge>=1"].tolist() == [39, 1.0, 1.0]
    assert strata.loc["judge=0", "size"] == 81
    assert strata.loc["judge=0", "min"] == strata.loc["judge=0", "max"] == pytest.approx(749 / 81)
    assert labels["weight"].sum() == pytest.approx(788)


def test_committed_signals_reproduce_the_runs_strata() -> None:
    """The committed cosines rate each pair as the run's judge did: >= 1 exactly on the stratum "judge>=1"."""
    labels, signals = load_labels(), load_signals()
    assert set(signals["id"]) == set(labels["id"]) and signals["id"].is_unique
    rating = judge_ratings(signals.set_index("id").loc[labels["id"]].reset_index())
    assert ((rating >= 1) == (labels["stratum"] == "judge>=1").to_numpy()).all()
    assert label_counts().to_numpy().sum() == 120
    assert label_counts(weighted=True).to_numpy().sum() == pytest.approx(788, abs=2)


def _samples(n: int = 40, seed: int = 1) -> list[dict]:
    """Synthetic `samples.jsonl` rows: `n` steered texts with random concept ratings per side (one output label
    missing), a label sample that carries the site, and a sample of another kind."""
    rng = np.random.default_rng(seed)
    rows: list[dict] = [{"kind": "feature_label", "fit_key": "k", "site": "mlp@3"}, {"kind": "feature_detection"}]
    for i in range(n):
        rows.append({"kind": "feature_steering", "fit_key": "k", "model": "m", "layer": 3, "method": "snmf",
                     "feature": i % 7, "sign": 1 if i % 2 else -1, "kl_target": 0.5, "text": f"text {i}",
                     "labels": {"input": f"in {i}", "output": None if i == 0 else f"out {i}"},
                     "ratings": {"input_concept": float(rng.choice([0, 0, 0, 1, 2])),
                                 "output_concept": float(rng.choice([0, 0, 0, 0, 1]))}})
    return rows


def test_draw_keeps_every_positive_pair_and_samples_the_zeros_reproducibly() -> None:
    samples = _samples()
    pairs = [(s["labels"][side], s["ratings"][f"{side}_concept"]) for s in samples
             if s["kind"] == "feature_steering" for side in ("input", "output") if s["labels"][side] is not None]
    n_pos, n_zeros = sum(r >= 1 for _, r in pairs), sum(r < 1 for _, r in pairs)
    drawn = draw_pairs(samples, n_zero=10, seed=0)
    assert drawn == draw_pairs(samples, n_zero=10, seed=0)
    assert [p["id"] for p in drawn] == list(range(n_pos + 10))
    assert {p["label"] for p in drawn if p["stratum"] == "judge>=1"} == {label for label, r in pairs if r >= 1}
    assert sum(p["stratum"] == "judge=0" for p in drawn) == 10 and all(p["judge"] == 0 for p in drawn
                                                                       if p["stratum"] == "judge=0")
    assert sum(p["weight"] for p in drawn) == pytest.approx(len(pairs))
    assert {p["weight"] for p in drawn if p["stratum"] == "judge=0"} == {n_zeros / 10}
    assert all(p["site"] == "mlp@3" and p["text"] == "text " + p["label"].split()[1] for p in drawn)
    assert "out 0" not in {p["label"] for p in drawn}  # a side without a label is not a pair
    assert [p["label"] for p in draw_pairs(samples, 10, seed=1)] != [p["label"] for p in drawn]
    with pytest.raises(ValueError, match="n_zero"):
        draw_pairs(samples, n_zero=n_zeros + 1, seed=0)


def test_draw_reproduces_the_committed_labels_from_the_run() -> None:
    """The committed 120 pairs are `draw_pairs(samples, 81, 0)` of the default run at commit 67c3c50."""
    try:
        text = subprocess.run(["git", "show", "67c3c50:results/default/samples.jsonl"], cwd=ROOT, check=True,
                              capture_output=True, text=True, encoding="utf-8").stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("the run's samples at 67c3c50 are not in this checkout's git history")
    drawn = pd.DataFrame(draw_pairs([json.loads(line) for line in text.splitlines() if line], 81, 0))
    labels = load_labels()
    columns = ["id", "label", "side", "text", *[c for c in PROVENANCE if c != "run"], "stratum", "weight"]
    pd.testing.assert_frame_equal(drawn[columns], labels[columns], check_dtype=False)


def test_weighted_kappa_grid_equals_sklearn_and_the_unweighted_grid() -> None:
    from sklearn.metrics import cohen_kappa_score

    rng = np.random.default_rng(0)
    gold, weight = rng.integers(0, 3, 50), rng.uniform(0.5, 9.0, 50)
    preds = np.vstack([rng.integers(0, 3, 50), gold, np.full(50, 1), np.minimum(gold, 1)])
    np.testing.assert_allclose(kappa_grid_weighted(preds, gold, np.ones(50)), kappa_grid(preds, gold), atol=1e-12)
    want = [cohen_kappa_score(gold, p, labels=[0, 1, 2], weights="quadratic", sample_weight=weight) for p in preds]
    np.testing.assert_allclose(kappa_grid_weighted(preds, gold, weight), want, atol=1e-12)
    assert weighted_kappa(gold, preds[0], weight) == pytest.approx(want[0])
    assert weighted_kappa(gold, preds[2], weight) == 0.0 and np.isnan(weighted_kappa(np.ones(5, int), gold[:5]))


def _planted(cos: list[float]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """15 pairs rated 0, 5 rated 1, 5 rated 2 (weights 1, 1, 10) with the given cosines per rating."""
    gold = [0] * 15 + [1] * 5 + [2] * 5
    labels = pd.DataFrame({"id": range(25), "concept_rating": gold, "weight": [1.0] * 20 + [10.0] * 5})
    signals = pd.DataFrame({"id": range(25), "empty": False, "cos": [cos[g] for g in gold]})
    return labels, signals


def test_agreement_on_planted_signals() -> None:
    """Cosines that separate the ratings at the shipped thresholds: kappa 1, shipped or refitted. A constant
    cosine: kappa 0 and exact agreement the share of 0s. The majority baseline is the training folds' most frequent
    rating: 0 unweighted (15 of 25 right), 2 weighted (the twos weigh 50 of 70)."""
    lo, hi = OfflineThresholds().concept
    labels, signals = _planted([lo - 0.15, (lo + hi) / 2, hi + 0.2])
    table = agreement_table(labels, signals).set_index("estimate")
    assert table["shipped_kappa"].tolist() == [1.0, 1.0] and table["cv_kappa"].tolist() == [1.0, 1.0]
    assert table["shipped_exact"].tolist() == [1.0, 1.0] and table["pairs"].tolist() == [25, 70]
    assert table["majority_exact"].tolist() == [0.6, round(50 / 70, 4)]
    _, fitted = cross_validate(labels, signals)
    assert fitted == [(lo, hi)] * 5  # every threshold pair in the gaps ties; ties go to the shipped ones
    labels, signals = _planted([0.05, 0.05, 0.05])
    table = agreement_table(labels, signals).set_index("estimate")
    assert table["shipped_kappa"].tolist() == [0.0, 0.0] and table["cv_kappa"].tolist() == [0.0, 0.0]
    assert table.loc["sample", "shipped_exact"] == 0.6 and table.loc["run", "shipped_exact"] == round(15 / 70, 4)
    assert label_counts(labels, signals).to_numpy().tolist() == [[15, 0, 0], [5, 0, 0], [5, 0, 0]]


def test_signals_missing_ids_fail_with_their_names() -> None:
    labels, signals = load_labels(), load_signals()
    with pytest.raises(ValueError, match=r"no signals for 2 labelled pair\(s\), ids \[3, 17\]"):
        agreement_table(labels, signals[~signals["id"].isin([3, 17])])


@pytest.mark.slow
def test_committed_signals_are_what_minilm_measures() -> None:
    """Remeasure every pair's cosine with the real MiniLM encoder: it matches the committed file."""
    from bench.judge_validation_feature import compute_signals

    labels = load_labels()
    got, want = compute_signals(labels), load_signals().set_index("id").loc[labels["id"]].reset_index()
    assert got["id"].tolist() == want["id"].tolist() and got["empty"].tolist() == want["empty"].tolist()
    np.testing.assert_allclose(got["cos"].to_numpy(float), want["cos"].to_numpy(float), atol=1e-4)
