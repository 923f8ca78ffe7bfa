"""The committed records of the concept-centric run on the default model (`bench run --preset concepts`) regenerate
every figure, and what the figures plot is what
the records say: the points of each figure are recomputed here directly from records.jsonl with pandas (not
through bench.report), so a figure that drifts from its records fails, whatever the tables look like."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from bench.cli import main
from bench.results import load

PAPER = Path(__file__).parent.parent / "results" / "concepts"
CORE = ("detection_auroc_by_layer", "steering_score_by_layer", "steering_tradeoff")  # figures the records must feed


def _records() -> pd.DataFrame:
    """records.jsonl as read by pandas alone; `config` = the fields that change a number, layer aside."""
    f = pd.read_json(PAPER / "records.jsonl", lines=True, dtype=False)
    for col in ("task_params", "judge", "site", "model_source"):
        if col not in f:
            f[col] = None

    def key(r: Any) -> str:  # the layer lives in `layer`, and in `site` and params.site: leave it out here
        params = {k: v for k, v in (r.params if isinstance(r.params, dict) else {}).items() if k != "seed"}
        if isinstance(params.get("site"), dict):
            params["site"] = {k: v for k, v in params["site"].items() if k != "layer"}
        kind = str(r.site).split("@")[0]
        tp = r.task_params if isinstance(r.task_params, dict) else {}
        return json.dumps([r.model, r.model_source, kind, r.method, params, r.task, tp, r.judge], sort_keys=True,
                          default=str)

    f["config"] = [key(r) for r in f.itertuples()]
    f["value"] = pd.to_numeric(f["value"], errors="coerce")
    return f


def _points(fig: Any) -> list[tuple[float, float]]:
    """Every (x, y) point of every line of every panel of a matplotlib Figure, sorted."""
    pts = [(float(x), float(y)) for ax in fig.axes for line in ax.get_lines()
           for x, y in zip(line.get_xdata(), line.get_ydata(), strict=True)]
    return sorted(pts)


def _assert_same_points(got: list[tuple[float, float]], expected: list[tuple[float, float]], what: str) -> None:
    assert len(got) == len(expected) and len(got) > 0, (what, len(got), len(expected))
    np.testing.assert_allclose(np.array(got), np.array(sorted(expected)), rtol=1e-9, atol=1e-12, err_msg=what)


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    assert (PAPER / "records.jsonl").exists(), "results/concepts/records.jsonl is committed"
    return load([PAPER])


def test_committed_records_regenerate_every_figure(tmp_path: Path) -> None:
    from bench.report import FIGURES

    assert not (PAPER / "samples.jsonl").exists(), "results/concepts/ holds records only (no samples)"
    out = tmp_path / "figures"
    assert main(["report", str(PAPER), "--figures", str(out), "--out", str(tmp_path)]) == 0
    made = {p.stem for p in out.glob("*.png")}
    assert set(CORE) <= made <= set(FIGURES), f"the committed records must feed {CORE}; figures written: {made}"
    for name in made:
        for ext in ("png", "pdf"):
            assert (out / f"{name}.{ext}").stat().st_size > 1000, f"{name}.{ext}"


@pytest.mark.parametrize(("name", "task", "metric"), [("detection_auroc_by_layer", "detection", "auroc"),
                                                      ("steering_score_by_layer", "steering", "score")])
def test_by_layer_figures_plot_the_records_means(frame: pd.DataFrame, name: str, task: str, metric: str) -> None:
    """Each line point is (layer, mean over concepts of the concept's mean over seeds) of one configuration."""
    import matplotlib.pyplot as plt

    from bench.report import FIGURES

    f = _records()
    f = f[(f["task"] == task) & (f["metric"] == metric) & (f["split"] == "test")]
    per_concept = f.groupby(["config", "layer", "concept"])["value"].mean()
    means = per_concept.groupby(level=["config", "layer"]).mean().dropna()
    expected = [(float(layer), float(v)) for (_, layer), v in means.items()]
    fig = FIGURES[name](frame)
    try:
        _assert_same_points(_points(fig), expected, name)
    finally:
        plt.close(fig)


def test_tradeoff_figure_plots_the_dev_sweep(frame: pd.DataFrame) -> None:
    """Each point is (mean fluency, mean concept rating) over concepts and layers of one configuration at one
    steering factor, from the `sweep_*` records."""
    import matplotlib.pyplot as plt

    from bench.report import FIGURES

    f = _records()
    f = f[(f["task"] == "steering") & f["metric"].isin(["sweep_fluency", "sweep_concept"]) & f["factor"].notna()]
    table = f.pivot_table(index=["config", "factor"], columns="metric", values="value", aggfunc="mean")
    expected = [(float(r["sweep_fluency"]), float(r["sweep_concept"])) for _, r in table.iterrows()]
    assert len({factor for _, factor in table.index}) >= 2, "a sweep needs at least two factors"
    fig = FIGURES["steering_tradeoff"](frame)
    try:
        _assert_same_points(_points(fig), expected, "steering_tradeoff")
    finally:
        plt.close(fig)
