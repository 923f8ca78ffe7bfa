"""`bench run` / `bench report` end to end on tiny:gpt2: configurations get their own rows, seeds are averaged
per concept, the paired table lists the pair, and a run ends with its headline."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

from bench.cli import main
from tests.conftest import FIXTURE_CONCEPTS

N_CONCEPTS = 3  # in tests/data/concepts_fixture.jsonl


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    """Three runs of dim at layer 1 of tiny:gpt2: at the MLP site (seeds 0 and 1) and the residual stream."""
    root = tmp_path_factory.mktemp("runs")
    common = ["run", "--models", "tiny:gpt2", "--layers", "1", "--methods", "dim", "--tasks", "detection",
              "--concepts", str(FIXTURE_CONCEPTS)]
    out: dict[str, object] = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FEATBENCH_CACHE", str(root / "cache"))
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):
            assert main([*common, "--out", str(root / "mlp")]) == 0
        out["stdout"] = stdout.getvalue()
        with contextlib.redirect_stdout(io.StringIO()):
            assert main([*common, "-M", "dim.site=resid@1", "--out", str(root / "resid")]) == 0
            assert main([*common, "--seed", "1", "--out", str(root / "mlp_seed1")]) == 0
    out.update({name: root / name for name in ("mlp", "resid", "mlp_seed1")})
    yield out


def _rows(markdown: str) -> dict[str, str]:
    """First cell -> the rest of each body row of the Markdown tables in `markdown`."""
    rows = {}
    for line in markdown.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("|") and not set(cells[0]) <= set(":-") and cells[0] not in ("method", "task", "model"):
            rows[cells[0]] = " | ".join(cells[1:])
    return rows


def test_two_sites_give_two_rows_and_a_paired_comparison(runs: dict, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(runs["mlp"]), str(runs["resid"]), "--out", str(tmp_path)]) == 0
    rows = _rows(capsys.readouterr().out)
    assert set(rows) == {"dim@mlp", "dim@resid"}, rows
    assert all(f"n={N_CONCEPTS}" in cell for cell in rows.values())
    csv = pd.read_csv(tmp_path / "leaderboard.csv").set_index("label")
    assert csv.loc["dim@resid", "site"] == "resid@1" and '"kind":"resid"' in csv.loc["dim@resid", "params"]
    pairs = pd.read_csv(tmp_path / "paired.csv")
    assert pairs[["a", "b", "n"]].values.tolist() == [["dim@mlp", "dim@resid", N_CONCEPTS]]
    assert "dim@mlp" in (tmp_path / "paired.md").read_text()


def test_two_seeds_of_one_configuration_are_one_row_over_concepts(runs: dict, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(runs["mlp"]), str(runs["mlp_seed1"]), "--out", str(tmp_path)]) == 0
    rows = _rows(capsys.readouterr().out)
    assert list(rows) == ["dim"] and f"n={N_CONCEPTS}" in rows["dim"]
    csv = pd.read_csv(tmp_path / "leaderboard.csv")
    assert csv[["label", "n_scored", "n_seeds"]].values.tolist() == [["dim", N_CONCEPTS, 2]]


def test_figures_of_the_two_runs(runs: dict, tmp_path: Path) -> None:
    figures = tmp_path / "figures"
    assert main(["report", str(runs["mlp"]), str(runs["resid"]), "--out", str(tmp_path), "--figures",
                 str(figures)]) == 0
    for name in ("detection_auroc_by_layer", "paired_differences"):
        assert (figures / f"{name}.png").stat().st_size > 1000, name


def test_run_ends_with_the_headline_and_the_paths(runs: dict) -> None:
    text = str(runs["stdout"])
    assert "###" not in text, "bench run prints the headline, not the full leaderboard"
    rows = _rows(text)
    assert list(rows) == ["detection: auroc"] and rows["detection: auroc"].startswith("dim | ")
    assert "[" in rows["detection: auroc"] and "n=" not in rows["detection: auroc"]
    assert f"full leaderboard: {runs['mlp'] / 'leaderboard.md'}" in text
    assert (runs["mlp"] / "leaderboard.md").read_text().startswith("### detection: auroc")
    assert (runs["mlp"] / "paired.csv").exists()
