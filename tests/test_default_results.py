"""The committed records of the default run (`bench run`: the paper's feature-centric protocol on the default model)
regenerate its figures and tables, and what they show is what the records say: the points are recomputed here
from records.jsonl with pandas alone (not through bench.report)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bench.cli import main
from bench.results import load

DEFAULT = Path(__file__).parent.parent / "results" / "default"
TASKS = {"feature_labels", "feature_steering", "feature_detection"}


@pytest.fixture(scope="module")
def records() -> pd.DataFrame:
    assert (DEFAULT / "records.jsonl").exists(), "results/default/records.jsonl is committed"
    f = pd.read_json(DEFAULT / "records.jsonl", lines=True, dtype=False)
    f["value"] = pd.to_numeric(f["value"], errors="coerce")
    return f


def test_the_default_run_is_the_feature_centric_protocol_on_every_method(records: pd.DataFrame) -> None:
    assert set(records["task"]) - {"fit"} == TASKS
    assert set(records["method"]) == {"dim-snmf", "sae", "snmf"} and set(records["layer"]) == {9}  # the middle
    per_method = records[records["task"] == "feature_steering"].groupby("method")["feature"].nunique()
    assert (per_method[["snmf", "sae"]] == 24).all(), "24 per method (the runs before: 3 layers x 6, 1 x 12, 1 x 20)"
    assert per_method["dim-snmf"] >= 22, "one DiM direction per labelled SNMF feature of the sample"
    steer = records[(records["task"] == "feature_steering") & (records["metric"] == "reached")]
    assert set(steer["sign"]) == {1, -1} and steer["kl_target"].nunique() >= 3
    scored = records[(records["task"] == "feature_steering") & (records["metric"] == "score")]
    assert scored["value"].notna().mean() > 0.5, "most features and signs are scored"


def test_the_kl_figure_plots_the_mean_over_features_of_each_features_mean_over_signs(records: pd.DataFrame) -> None:
    import matplotlib.pyplot as plt

    from bench.figures import FIGURES

    f = records[(records["task"] == "feature_steering") & records["metric"].isin(["input_score", "output_score"])
                & records["kl_target"].notna()]
    per_feature = f.groupby(["method", "layer", "metric", "kl_target", "feature"])["value"].mean()
    means = per_feature.groupby(level=["method", "layer", "metric", "kl_target"]).mean().dropna()
    expected = sorted((float(t), float(v)) for (*_, t), v in means.items())
    fig = FIGURES["feature_steering_by_kl"](load([DEFAULT]))
    try:
        got = sorted((float(x), float(y)) for ax in fig.axes for line in ax.get_lines()
                     for x, y in zip(line.get_xdata(), line.get_ydata(), strict=True) if not np.isnan(y))
    finally:
        plt.close(fig)
    assert len(got) == len(expected) > 0
    np.testing.assert_allclose(np.array(got), np.array(expected), rtol=1e-9)


def test_report_writes_the_papers_tables_from_the_committed_run(tmp_path: Path) -> None:
    figs = tmp_path / "figs"
    assert main(["report", str(DEFAULT), "--out", str(tmp_path), "--figures", str(figs)]) == 0
    assert {"feature_steering_by_kl", "feature_detection_scd", "paired_differences"} <= {
        p.stem for p in figs.glob("*.png")}
    labels = pd.read_csv(tmp_path / "feature_labels.csv")
    assert set(labels["method"]) == {"dim-snmf", "sae", "snmf"}, "the committed samples carry every feature's labels"
    comp = pd.read_csv(tmp_path / "paired.csv")
    assert set(comp.loc[comp["task"] == "feature_steering", "design"]) == {"independent"}


def test_the_committed_default_run_is_the_shipped_default_config() -> None:
    """results/default was made by `bench run` with the shipped default.toml as it is now (rerun it when it changes)."""
    import json

    from bench.config import RunConfig

    stored = RunConfig.from_dict({k: v for k, v in json.loads((DEFAULT / "config.json").read_text()).items()
                                  if k != "run_id"})
    assert stored.to_dict() == RunConfig.load().to_dict()


def test_the_committed_records_hold_the_current_task_parameters(records: pd.DataFrame) -> None:
    """Each task's parameters in the committed records (every field, defaults included) are what the shipped
    default config gives the task now: a changed task default (a batch size, a prompt) means rerunning the
    default run."""
    from bench.config import RunConfig
    from bench.runner import make_task, task_params

    cfg = RunConfig.load()
    for task in sorted(set(records["task"]) - {"fit"}):
        stored = records.loc[records["task"] == task, "task_params"]
        assert all(p == stored.iloc[0] for p in stored), f"{task}: one set of parameters in the run"
        assert stored.iloc[0] == task_params(make_task(task, cfg)), task
