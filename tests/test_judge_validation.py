"""The offline judge's validation: the committed agreement table is what the committed signals and labels give,
kappa and the majority baseline are honest, thresholds are fitted on training folds only, and the committed
signals are what the real models measure (slow)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from bench.data import package_data
from bench.judge import ASPECTS, OfflineThresholds, _step, fluency_rating
from bench.judge_validation import (
    EXPECTED_FILE,
    SIGNALS,
    agreement_table,
    cross_validate,
    fit_thresholds,
    judge_ratings,
    kappa,
    kappa_grid,
    load_labels,
    load_signals,
)


def test_agreement_table_matches_the_committed_table() -> None:
    """Drift check: the table recomputed from the committed labels and signals equals the committed one."""
    expected = pd.read_csv(package_data(EXPECTED_FILE))
    pd.testing.assert_frame_equal(agreement_table(), expected, check_dtype=False, atol=1e-4)


def test_validation_sets_are_large_enough_and_labelled_by_hand() -> None:
    labels = load_labels()
    counts = labels["set"].value_counts()
    assert counts["steered"] >= 150 and counts["written"] + counts["generated"] == 112, counts.to_dict()
    steered = labels[labels["set"] == "steered"]
    assert steered["rater"].notna().all() and (steered["model"] == "gemma-3-270m-gguf").all()
    assert (steered["alpha"] == 0).any() and steered["layer"].nunique() >= 2 and steered["concept"].nunique() >= 8
    for aspect in ASPECTS:
        assert set(steered[f"{aspect}_rating"]) == {0, 1, 2}, aspect
    assert set(labels["uid"]) <= set(load_signals()["uid"])


def test_vectorised_ratings_equal_the_graders_rules() -> None:
    """`judge_ratings` is the grader's `_step` / `fluency_rating`, row by row, for shipped and other thresholds."""
    signals = load_signals()
    for th in (OfflineThresholds(), OfflineThresholds(concept=(0.1, 0.5), excess=(0.5, 4.0), distinct=(0.3, 0.9))):
        got = judge_ratings(signals, th)
        for i, row in signals.iterrows():
            rep = {k: row[k] for k in ("content", "compression", "distinct")}
            want = (0, 0, 0) if row["empty"] else (_step(row["concept_cos"], *th.concept),
                                                   _step(row["instruction_cos"], *th.instruction),
                                                   fluency_rating(row["excess"], rep, th))
            assert tuple(got.loc[i, list(ASPECTS)]) == want, (i, th)


def test_kappa_of_a_constant_judge_is_zero_and_of_a_perfect_one_is_one() -> None:
    gold = np.array([0, 1, 2, 2, 1, 0, 2, 2])
    for c in (0, 1, 2):
        assert kappa(gold, np.full_like(gold, c)) == 0.0
    assert kappa(gold, gold) == pytest.approx(1.0)
    assert kappa(gold, 2 - gold) < 0


def _planted(gold: list[int]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One set of rows whose concept labels are `gold` (instruction and fluency all 2), with constant signals."""
    n = len(gold)
    labels = pd.DataFrame({"uid": [f"r{i}" for i in range(n)], "set": "steered", "concept_rating": gold,
                           "instruction_rating": 2, "fluency_rating": 2})
    signals = pd.DataFrame({"uid": labels["uid"], "empty": False, **{k: 0.5 for k in SIGNALS}})
    return labels, signals


def test_majority_baseline_is_computed_on_the_training_folds_only() -> None:
    """Five 0s and five 2s, one row per fold: the training majority is always the *other* label, so the honest
    baseline agrees with no held-out row, whatever the shuffle; one computed on all rows would score 0.5."""
    labels, signals = _planted([0, 2] * 5)
    cv, _ = cross_validate(labels, signals, folds=10, seed=0)
    assert (cv["concept_majority"] == 2 - labels["concept_rating"]).all()
    table = agreement_table(labels, signals, folds=10, seed=0).set_index(["aspect", "set"])
    assert table.loc[("concept", "all"), "majority_exact"] == 0.0
    assert table.loc[("instruction", "all"), "majority_exact"] == 1.0  # a constant label is predicted exactly


def test_thresholds_are_fitted_on_the_training_folds_only(monkeypatch: pytest.MonkeyPatch) -> None:
    import bench.judge_validation as jv

    labels, signals = _planted([0, 1, 2] * 5)
    seen: list[set[str]] = []
    real = jv.fit_thresholds

    def spy(sig: pd.DataFrame, gold: pd.DataFrame, *args: object, **kwargs: object) -> OfflineThresholds:
        seen.append(set(sig["uid"]))
        return real(sig, gold, *args, **kwargs)

    monkeypatch.setattr(jv, "fit_thresholds", spy)
    cross_validate(labels, signals, folds=5, seed=0)
    assert len(seen) == 5 and all(len(s) == 12 for s in seen)
    held_out = [set(labels["uid"]) - s for s in seen]
    assert all(len(h) == 3 for h in held_out) and set().union(*held_out) == set(labels["uid"])


def test_fit_thresholds_recovers_planted_cutoffs() -> None:
    rng = np.random.default_rng(0)
    cos = rng.uniform(-0.1, 0.8, 200)
    labels = pd.DataFrame({"uid": [f"r{i}" for i in range(200)], "concept_rating": np.digitize(cos, [0.3, 0.5]),
                           "instruction_rating": 2, "fluency_rating": 2})
    signals = pd.DataFrame({"uid": labels["uid"], "empty": False, **{k: 0.5 for k in SIGNALS}, "concept_cos": cos})
    th = fit_thresholds(signals, labels)
    assert th.concept[0] == pytest.approx(0.3, abs=0.021) and th.concept[1] == pytest.approx(0.5, abs=0.021)
    assert (judge_ratings(signals, th)["concept"] == labels["concept_rating"]).mean() >= 0.98


def test_fitted_thresholds_never_do_worse_than_the_shipped_ones_on_their_training_rows() -> None:
    labels, signals = load_labels(), load_signals()
    sig = signals.set_index("uid").loc[labels["uid"]].reset_index()
    fitted = fit_thresholds(sig, labels)
    for aspect in ASPECTS:
        gold = labels[f"{aspect}_rating"].to_numpy()
        before = kappa(gold, judge_ratings(sig, OfflineThresholds())[aspect].to_numpy())
        after = kappa(gold, judge_ratings(sig, fitted)[aspect].to_numpy())
        assert after >= before - 1e-9, aspect


def test_vectorised_kappa_equals_sklearn() -> None:
    from sklearn.metrics import cohen_kappa_score

    rng = np.random.default_rng(0)
    gold = rng.integers(0, 3, 50)
    preds = np.vstack([rng.integers(0, 3, 50), gold, np.full(50, 1), np.minimum(gold, 1)])
    want = [cohen_kappa_score(gold, p, labels=[0, 1, 2], weights="quadratic") for p in preds]
    np.testing.assert_allclose(kappa_grid(preds, gold), want, atol=1e-12)


@pytest.mark.slow
def test_committed_signals_are_what_the_real_models_measure() -> None:
    """Recompute a few rows' signals with MiniLM and the default model; they match the committed file, and the
    grader's own ratings equal the ratings derived from the signals under the shipped thresholds."""
    from types import SimpleNamespace

    from bench.data import ConceptData
    from bench.judge import Item, OfflineGrader, parse_rating
    from bench.judge_validation import SCORER, compute_signals
    from bench.models import load

    labels = load_labels()
    rows = labels.groupby("set").sample(4, random_state=0).reset_index(drop=True)
    got = compute_signals(rows)
    want = load_signals().set_index("uid").loc[rows["uid"]].reset_index()
    for k in (*SIGNALS, "nll"):
        np.testing.assert_allclose(got[k].to_numpy(float), want[k].to_numpy(float), atol=2e-3, err_msg=k)
    model, tok, _ = load(SCORER)
    train = ConceptData.load().split("train").frame
    items = [Item(r.instruction, r.description, r.output, tuple(train.loc[train["concept"] == r.concept, "text"]))
             for r in rows.itertuples()]
    ctx = SimpleNamespace(model=model, tokenizer=tok, model_id=SCORER)
    grader = OfflineGrader()
    rated = {a: [parse_rating(x) for x in grader._measure(a, items, ctx)] for a in ASPECTS}
    derived = judge_ratings(want, OfflineThresholds())
    for a in ASPECTS:
        assert rated[a] == derived[a].tolist(), a
