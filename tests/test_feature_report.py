"""The paper's protocol end to end on tiny:gpt2 with the fake judge, and its report: per-feature records for both
signs and several KL targets, labels for every feature, S_CD per feature; the per-target table, the example labels,
two-sample comparisons between methods (their features differ) and the figures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bench.cli import main
from bench.report import paired, permutation_p_independent
from bench.results import load, read_jsonl
from tests.conftest import FIXTURE_CONCEPTS

METHODS = ("snmf", "sae", "dim")
TARGETS = (0.002, 0.005)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("paper") / "run"
    assert main(["run", "--models", "tiny:gpt2", "--layers", "0", "--methods", ",".join(METHODS), "--tasks",
                 "feature_labels,feature_steering,feature_detection", "-M", "snmf.n_features=6",
                 "-M", "snmf.max_iter=20", "-M", "sae.d_sae=8", "-M", "sae.k=2", "-M", "sae.n_steps=20",
                 "-T", "feature_labels.max_features=3", "-T", "feature_steering.max_features=3",
                 "-T", "feature_detection.max_features=3", "-T", "feature_detection.n_sentences=2",
                 "-T", "feature_steering.kl_targets=" + ",".join(map(str, TARGETS)),
                 "-T", "feature_steering.kl_tolerance=0.001", "-T", "feature_steering.n_samples=1",
                 "-T", "feature_steering.max_new_tokens=4", "--concepts", str(FIXTURE_CONCEPTS),
                 "--judge", "fake", "--out", str(out)]) == 0
    return out


def test_every_task_records_each_feature(run: Path) -> None:
    recs = read_jsonl(run / "records.jsonl")
    for m in METHODS:
        mine = [r for r in recs if r["method"] == m]
        labelled = {r["feature"] for r in mine if r["task"] == "feature_labels" and r["metric"] == "labelled"}
        assert len(labelled) == 3, (m, labelled)
        cells = {(r["feature"], r["sign"], r["kl_target"]) for r in mine
                 if r["task"] == "feature_steering" and r["metric"] == "reached"}
        assert cells == {(f, s, t) for f in labelled for s in (1, -1) for t in TARGETS}, m
        scd = {r["feature"] for r in mine if r["task"] == "feature_detection" and r["metric"] == "s_cd"}
        assert scd == labelled, "the three feature tasks share the seeded sample of features"


def test_report_writes_the_papers_tables_and_figures(run: Path, tmp_path: Path) -> None:
    figs = tmp_path / "figs"
    assert main(["report", str(run), "--out", str(tmp_path), "--figures", str(figs)]) == 0
    by_kl = pd.read_csv(tmp_path / "feature_steering_by_kl.csv")
    assert set(by_kl["label"]) == set(METHODS) and set(by_kl["kl_target"]) == set(TARGETS)
    assert set(by_kl["metric"]) == {"input_score", "output_score"} and (by_kl["n"] <= 3).all()
    labels = pd.read_csv(tmp_path / "feature_labels.csv")
    assert len(labels) == 9 and set(labels["method"]) == set(METHODS)
    assert "KL 0.002" in (tmp_path / "feature_steering_by_kl.md").read_text()
    comp = pd.read_csv(tmp_path / "paired.csv")
    fs = comp[(comp["task"] == "feature_steering") & (comp["metric"] == "score")]
    assert len(fs) == 3 and set(fs["design"]) == {"independent"}, "each pair of methods, two-sample"
    assert "features of a vs b" in (tmp_path / "paired.md").read_text()
    for name in ("feature_steering_by_kl", "feature_detection_scd"):
        assert (figs / f"{name}.png").stat().st_size > 10_000, name


def test_by_kl_target_averages_signs_within_a_feature_then_features(run: Path) -> None:
    from bench.feature_report import by_kl_target

    frame = load([run])
    table = by_kl_target(frame)
    f = frame[(frame["task"] == "feature_steering") & (frame["metric"] == "input_score")
              & (frame["method"] == "dim") & (frame["kl_target"] == TARGETS[0])]
    per_feature = f.groupby("feature")["value"].mean().dropna()
    row = table[(table["label"] == "dim") & (table["metric"] == "input_score") & (table["kl_target"] == TARGETS[0])]
    assert row["mean"].iloc[0] == pytest.approx(per_feature.mean()) and row["n"].iloc[0] == len(per_feature)


def _features(values: dict[str, list[float]]) -> pd.DataFrame:
    rows = [{"model": "m", "layer": 1, "site": "mlp@1", "method": m, "params": {}, "task": "feature_steering",
             "task_params": {}, "metric": "score", "value": v, "split": "test", "seed": 0, "feature": i}
            for m, vs in values.items() for i, v in enumerate(vs)]
    return pd.DataFrame(rows)


def test_independent_comparison_separates_shifted_samples_and_not_equal_ones() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.normal(1.0, 0.3, 20), rng.normal(0.5, 0.3, 25)
    row = paired(_features({"a": list(a), "b": list(b)})).iloc[0]
    assert row["design"] == "independent" and (row["n"], row["n_b"]) == (20, 25)
    assert row["diff"] == pytest.approx(a.mean() - b.mean()) and row["ci_low"] > 0 and row["p_value"] < 0.01
    assert row["win_rate"] == pytest.approx(np.mean([(x > y) + 0.5 * (x == y) for x in a for y in b]))
    same = paired(_features({"a": [0.0, 1.0, 2.0, 1.0], "b": [1.0, 2.0, 0.0, 1.0]})).iloc[0]
    assert same["diff"] == 0 and same["p_value"] == 1 and same["win_rate"] == 0.5
    assert same["ci_low"] < 0 < same["ci_high"]


def test_label_permutation_p_matches_scipy() -> None:
    from scipy.stats import permutation_test

    x, y = np.array([0.1, 0.5, 0.9, 1.3, 1.1]), np.array([0.0, 0.2, 0.4, 0.3])
    ours = permutation_p_independent(x, y, n_perm=20000, seed=1)
    ref = permutation_test((x, y), lambda u, v: np.mean(u) - np.mean(v), permutation_type="independent",
                           n_resamples=np.inf, alternative="two-sided").pvalue  # exact: 126 relabellings
    assert ours == pytest.approx(ref, abs=0.01)
