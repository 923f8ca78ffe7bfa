from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bench.cli import main
from bench.figures import method_color, write_figures
from bench.report import (
    bootstrap_ci,
    headline,
    leaderboard,
    paired,
    permutation_p,
    summary,
    write_latex,
    write_leaderboard,
)
from bench.results import load


def _frame() -> pd.DataFrame:
    rows = []
    rng = np.random.default_rng(0)
    for method in ("dim", "snmf", "mine"):
        for layer in (0, 1):
            for c in range(5):
                rows.append({"task": "detection", "metric": "auroc", "method": method, "model": "m",
                             "layer": layer, "split": "test", "concept": f"c{c}", "value": rng.uniform(0.5, 1)})
            rows.append({"task": "detection", "metric": "auroc", "method": method, "model": "m", "layer": layer,
                         "split": "train", "concept": "c0", "value": 1.0})
    for method in ("dim", "snmf"):
        for c in range(3):
            rows.append({"task": "steering", "metric": "score", "method": method, "model": "m", "layer": 1,
                         "split": "test", "concept": f"c{c}", "value": rng.uniform(0, 2)})
            rows.append({"task": "steering", "metric": "concept_base", "method": method, "model": "m", "layer": 1,
                         "split": "test", "concept": f"c{c}", "value": 0.0})
            rows.append({"task": "steering", "metric": "fluency_base", "method": method, "model": "m", "layer": 1,
                         "split": "test", "concept": f"c{c}", "value": 2.0})
            for factor in (1.0, 4.0):
                for aspect in ("concept", "fluency"):
                    rows.append({"task": "steering", "metric": f"sweep_{aspect}", "method": method, "model": "m",
                                 "layer": 1, "split": "dev", "concept": f"c{c}", "factor": factor,
                                 "value": rng.uniform(0, 2)})
        for feature in range(6):
            for metric in ("label_accuracy", "label_f1"):
                rows.append({"task": "labeling", "metric": metric, "method": method, "model": "m", "layer": 1,
                             "split": "test", "concept": None, "feature": feature, "value": rng.uniform(0, 1)})
    rows.append({"task": "steering", "metric": "score", "method": "dim", "model": "m", "layer": 0,
                 "split": "test", "concept": "c0", "value": None})  # unscored
    rows.append({"task": "steering", "metric": "score", "method": "dim", "model": "m", "layer": 0,
                 "split": "test", "concept": "c1", "value": 1.5})
    return pd.DataFrame(rows)


def test_summary_uses_test_split_and_counts_unscored() -> None:
    s = summary(_frame())
    det = s[(s["task"] == "detection") & (s["method"] == "dim") & (s["layer"] == 0)].iloc[0]
    assert det["n_scored"] == 5 and det["coverage"] == 1 and det["ci_low"] <= det["mean"] <= det["ci_high"]
    st = s[(s["task"] == "steering") & (s["metric"] == "score") & (s["layer"] == 0)].iloc[0]
    assert st["n_scored"] == 1 and st["coverage"] == 0.5 and st["mean"] == 1.5
    table = leaderboard(_frame())[("steering", "score")]
    assert "50% scored" in table.loc["dim"].iloc[0]


def test_win_rates_are_complementary() -> None:
    from bench.figures import win_rates

    w = win_rates(_frame())
    assert abs(w.loc["dim", "snmf"] + w.loc["snmf", "dim"] - 1) < 1e-9


def test_bootstrap_ci_brackets_the_mean() -> None:
    values = np.random.default_rng(1).normal(size=200)
    lo, hi = bootstrap_ci(values)
    assert lo < values.mean() < hi and hi - lo < 0.5
    assert np.isnan(bootstrap_ci(np.array([1.0]))[0])


def test_figures_and_latex_are_written(tmp_path) -> None:  # noqa: ANN001
    paths = write_figures(_frame(), tmp_path)
    names = {p.name for p in paths}
    for fig in ("detection_auroc_by_layer", "steering_score_by_layer", "steering_tradeoff", "steering_win_rate",
                "steering_concept_heatmap", "labeling_scores"):
        assert {f"{fig}.png", f"{fig}.pdf"} <= names, fig
    assert "\\begin{tabular}" in write_latex(_frame(), tmp_path).read_text()
    assert method_color("snmf") == method_color("snmf") and method_color("mine").startswith("#")


# ---------------------------------------------------------------------------------------------- configurations

def _rec(method: str, concept: str | None, value: float | None, **kw) -> dict:  # noqa: ANN003
    """A test-split detection record of tiny:gpt2 layer 1 (fields as `bench run` writes them)."""
    site = kw.pop("site", "mlp@1")
    params = {"normalize": True, "site": {"kind": site.split("@")[0], "layer": 1}, **kw.pop("params", {})}
    rec = {"run_id": "r", "model": "tiny:gpt2", "model_source": "tiny:gpt2@x", "layer": 1, "site": site,
           "method": method, "params": params, "task": "detection", "task_params": {"pool": "max"}, "judge": None,
           "fit_key": "k", "metric": "auroc", "value": value, "concept": concept, "split": "test", "seed": 0,
           "feature": 0, "factor": None}
    rec.update(kw)
    return rec


def test_configurations_get_their_own_rows_and_short_labels() -> None:
    rows = []
    for c, v in zip("abc", (0.6, 0.7, 0.8), strict=True):
        rows.append(_rec("dim", c, v))
        rows.append(_rec("dim", c, v - 0.1, site="resid@1"))
        rows.append(_rec("snmf", c, v, params={"n_features": 100, "sparsity": 0.01, "seed": 0}))
        rows.append(_rec("snmf", c, v - 0.2, params={"n_features": 50, "sparsity": 0.01, "seed": 0}))
        rows.append(_rec("sae", c, v))
    s = summary(pd.DataFrame(rows)).set_index("label")
    assert sorted(s.index) == ["dim@mlp", "dim@resid", "sae", "snmf(k=100)", "snmf(k=50)"]
    assert (s["n_scored"] == 3).all() and (s["n_seeds"] == 1).all()
    assert abs(s.loc["dim@resid", "mean"] - 0.6) < 1e-9 and abs(s.loc["snmf(k=50)", "mean"] - 0.5) < 1e-9
    assert json.loads(s.loc["snmf(k=50)", "params"])["n_features"] == 50  # full params in the CSV
    assert json.loads(s.loc["dim@mlp", "task_params"]) == {"pool": "max"}
    table = leaderboard(pd.DataFrame(rows))[("detection", "auroc")]
    assert list(table.index) == ["dim@mlp", "dim@resid", "sae", "snmf(k=100)", "snmf(k=50)"]
    # task parameters and the judge are part of a configuration too
    other = [_rec("dim", c, 0.5, task_params={"pool": "mean"}) for c in "abc"]
    other += [_rec("dim", c, 0.5, judge="fake") for c in "abc"]
    labels = set(summary(pd.DataFrame(rows + other))["label"])
    assert {"dim@mlp(pool=max, judge=none)", "dim@mlp(pool=mean, judge=none)",
            "dim@mlp(pool=max, judge=fake)"} <= labels


def test_seeds_of_one_configuration_are_averaged_per_concept() -> None:
    rows = []
    for seed in (0, 1, 2):
        for c, v in zip("abcd", (0.5, 0.6, 0.7, 0.8), strict=True):
            # the method's own seed field follows the run seed and is not part of the configuration
            rows.append(_rec("snmf", c, v + 0.01 * seed, seed=seed, params={"n_features": 8, "seed": seed}))
    s = summary(pd.DataFrame(rows))
    assert len(s) == 1 and s.loc[0, "label"] == "snmf"
    assert s.loc[0, "n_scored"] == 4 and s.loc[0, "n_seeds"] == 2 + 1 and s.loc[0, "seeds"] == "0,1,2"
    assert abs(s.loc[0, "mean"] - 0.66) < 1e-9
    # a concept that only one seed scored still counts once; an unscored record lowers coverage, not n
    rows.append(_rec("snmf", "e", None, seed=0, params={"n_features": 8, "seed": 0}))
    rows.append(_rec("snmf", "e", 0.9, seed=1, params={"n_features": 8, "seed": 1}))
    s = summary(pd.DataFrame(rows))
    assert s.loc[0, "n_scored"] == 5 and s.loc[0, "coverage"] == 13 / 14


def test_old_records_without_the_new_fields_load_and_group(tmp_path: Path) -> None:
    old = []
    for method in ("dim", "snmf"):
        for c in "abc":
            r = _rec(method, c, 0.7)
            for field in ("task_params", "fit_key", "judge", "model_source"):
                del r[field]
            old.append(r)
    old.append({k: v for k, v in _rec("dim", None, 0.1, task="fit", metric="fit_seconds", split="train").items()
                if k not in ("task_params", "fit_key", "judge", "model_source")})
    (tmp_path / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in old))
    frame = load([tmp_path])
    assert frame["task_params"].map(lambda p: p == {}).all() and frame["judge"].isna().all()
    s = summary(frame)
    assert sorted(s["label"]) == ["dim", "snmf"] and (s["n_scored"] == 3).all()


# ---------------------------------------------------------------------------------------------- paired

def _two(values_a: list[float], values_b: list[float]) -> pd.DataFrame:
    rows = [_rec("dim", f"c{i}", a) for i, a in enumerate(values_a)]
    rows += [_rec("dim", f"c{i}", b, site="resid@1") for i, b in enumerate(values_b)]
    return pd.DataFrame(rows)


def test_paired_comparison_separates_a_consistent_difference_from_none() -> None:
    rng = np.random.default_rng(0)
    b = rng.uniform(0.5, 0.9, size=20)
    a = b + rng.uniform(0.01, 0.05, size=20)  # a beats b on every concept, by a little
    row = paired(_two(list(a), list(b))).iloc[0]
    assert (row["a"], row["b"], row["n"]) == ("dim@mlp", "dim@resid", 20)
    assert abs(row["diff"] - (a - b).mean()) < 1e-12 and 0 < row["ci_low"] <= row["diff"] <= row["ci_high"]
    assert row["p_value"] < 0.05 and row["win_rate"] == 1.0
    # unpaired, the same two sets of numbers overlap: the CIs of the leaderboard cannot tell them apart
    s = summary(_two(list(a), list(b))).set_index("label")
    assert s.loc["dim@mlp", "ci_low"] < s.loc["dim@resid", "ci_high"]
    same = paired(_two(list(b), list(b))).iloc[0]
    assert same["diff"] == 0 and same["p_value"] == 1 and same["win_rate"] == 0.5
    assert same["ci_low"] == same["ci_high"] == 0
    # only shared concepts are paired; records without a concept are not
    partial = _two(list(a), list(b[:12])).pipe(lambda f: pd.concat([f, pd.DataFrame([_rec("dim", None, 1.0)])]))
    assert paired(partial).iloc[0]["n"] == 12


def test_permutation_p_is_seeded_and_has_the_plus_one_form() -> None:
    d = np.random.default_rng(3).normal(0.2, 1, size=30)
    p1, p2 = permutation_p(d, np.zeros(30), n_perm=999), permutation_p(d, np.zeros(30), n_perm=999)
    assert p1 == p2 and round(p1 * 1000) == p1 * 1000  # (1 + count) / (1 + n_perm)
    assert permutation_p(np.ones(12), np.zeros(12), n_perm=999) <= 3 / 1000
    assert np.isnan(permutation_p(np.ones(1), np.zeros(1)))


def test_write_leaderboard_writes_the_paired_tables(tmp_path: Path) -> None:
    write_leaderboard(_two([0.9, 0.8, 0.7], [0.5, 0.5, 0.5]), tmp_path)
    table = pd.read_csv(tmp_path / "paired.csv")
    assert table[["a", "b", "n"]].values.tolist() == [["dim@mlp", "dim@resid", 3]]
    row = next(line for line in (tmp_path / "paired.md").read_text().splitlines() if "dim@mlp" in line)
    assert [c.strip() for c in row.split("|")[3:7]] == ["dim@mlp", "dim@resid", "3", "+0.300 [+0.20, +0.40]"]


# ---------------------------------------------------------------------------------------------- headline

def test_headline_shows_each_tasks_main_metric(monkeypatch: pytest.MonkeyPatch) -> None:
    from bench import registry

    frame = _frame()
    extra = [{"task": "mytask", "metric": m, "method": "dim", "model": "m", "layer": 1, "split": "test",
              "concept": f"c{c}", "value": v} for m, v in (("zeta", 0.25), ("alpha", 0.75)) for c in range(3)]
    frame = pd.concat([frame, pd.DataFrame(extra)], ignore_index=True)
    text = headline(frame)
    lines = text.splitlines()
    assert lines[0].startswith("| task") and "| m L0" in lines[0] and "| m L1" in lines[0]
    firsts = {line.split("|")[1].strip() for line in lines[2:]}
    assert firsts == {"detection: auroc", "steering: score", "labeling: label_f1", "mytask: zeta"}
    det = next(line for line in lines if "detection: auroc" in line and "| dim " in line)
    assert det.count("[") == 2 and "n=" not in det  # "mean [lo, hi]" for both layers
    monkeypatch.setitem(registry.TASKS, "mytask", type("MyTask", (), {"main_metric": "alpha"}))
    assert "mytask: alpha" in headline(frame) and "mytask: zeta" not in headline(frame)


def test_figures_use_configuration_labels() -> None:
    from bench.figures import fig_detection, fig_paired, method_color

    frame = _two([0.9, 0.8, 0.7, 0.6], [0.5, 0.55, 0.5, 0.45])
    fig = fig_detection(frame)
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert legend == ["dim@mlp", "dim@resid"]
    colors = {line.get_color() for line in fig.axes[0].get_lines()}
    assert colors == {method_color("dim")}  # colour per method; configurations differ by marker and line
    assert len({line.get_marker() for line in fig.axes[0].get_lines()}) == 2
    forest = fig_paired(frame)
    assert "dim@mlp - dim@resid" in forest.axes[0].get_yticklabels()[0].get_text()


# ---------------------------------------------------------------------------------------------- robustness

def _write(path: Path, lines: list[str]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "records.jsonl").write_text("".join(line + "\n" for line in lines))
    return path


def test_report_of_a_run_with_only_fit_records(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = _write(tmp_path / "run", [json.dumps(_rec("dim", None, 0.01, task="fit", metric="fit_seconds",
                                                    split="train"))])
    assert main(["report", str(run)]) == 0
    assert "no test-split records" in capsys.readouterr().out
    assert (run / "leaderboard.csv").exists() and (run / "paired.csv").exists()


def test_report_skips_and_counts_malformed_lines(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    good = [json.dumps(_rec("dim", c, 0.5)) for c in "abc"]
    run = _write(tmp_path / "run", [good[0], "null", "[1, 2]", "{not json", '{"metric": "auroc"}', good[1],
                                    json.dumps(_rec("dim", "x", "high")), good[2], '{"torn": '])
    with caplog.at_level(logging.WARNING):
        frame = load([run])
    assert len(frame) == 3
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "6 malformed line(s)" in warnings[0], warnings
    assert main(["report", str(run)]) == 0


def test_report_reads_a_directory_named_twice_once(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                   caplog: pytest.LogCaptureFixture) -> None:
    run = _write(tmp_path / "run", [json.dumps(_rec("dim", c, v)) for c, v in zip("abc", (0.4, 0.5, 0.9),
                                                                                   strict=True)])
    with caplog.at_level(logging.WARNING):
        assert main(["report", str(run), str(tmp_path / "run" / "."), str(run)]) == 0
    assert "n=3" in capsys.readouterr().out
    assert "2 repeated run directory name(s)" in caplog.text
    assert len(load([run, run])) == 3


def test_report_skips_a_directory_without_records_unless_none_has_any(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    run = _write(tmp_path / "run", [json.dumps(_rec("dim", c, 0.5)) for c in "abc"])
    empty = tmp_path / "empty"
    empty.mkdir()
    with caplog.at_level(logging.WARNING):
        assert main(["report", str(empty), str(run)]) == 0
    assert "n=3" in capsys.readouterr().out and f"no records.jsonl in {empty}" in caplog.text
    assert (run / "leaderboard.md").exists() and not (empty / "leaderboard.md").exists()
    caplog.clear()
    assert main(["report", str(empty), str(tmp_path / "typo")]) == 2
    assert "no records.jsonl in" in caplog.text and "typo" in caplog.text
