"""The paper's DiM baseline end to end: a run method alias (`[method.dim-snmf] method = "dim"`) with
`features_of = "snmf"` gets one direction per labelled SNMF feature, the mean difference between the sentences
feature_detection wrote for that feature's label and its neutral sentences, and is scored like any method."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from bench.activations import collect
from bench.cli import main
from bench.config import RunConfig
from bench.fits import FitCache
from bench.models import load
from bench.results import read_jsonl
from bench.runner import make_method
from bench.sites import Site
from tests.conftest import FIXTURE_CONCEPTS

ARGS = ["--models", "tiny:gpt2", "--layers", "0", "--methods", "snmf,dim-snmf",
        "--tasks", "feature_labels,feature_steering,feature_detection", "-M", "snmf.n_features=6",
        "-M", "snmf.max_iter=20", "-M", "dim-snmf.method=dim", "-M", "dim-snmf.features_of=snmf",
        "-T", "feature_labels.max_features=3", "-T", "feature_steering.max_features=3",
        "-T", "feature_detection.max_features=3", "-T", "feature_detection.n_sentences=2",
        "-T", "feature_steering.kl_targets=0.002", "-T", "feature_steering.kl_tolerance=0.001",
        "-T", "feature_steering.n_samples=1", "-T", "feature_steering.max_new_tokens=4",
        "--concepts", str(FIXTURE_CONCEPTS), "--judge", "fake"]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dim-feature") / "run"
    with pytest.MonkeyPatch.context() as mp:  # its own cache, which the first test reads the fit from
        mp.setenv("FEATBENCH_CACHE", str(out.parent / "cache"))
        assert main(["run", *ARGS, "--out", str(out)]) == 0
    return out


def test_one_direction_per_labelled_feature_equals_the_sentence_mean_difference(run: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEATBENCH_CACHE", str(run.parent / "cache"))
    records, samples = read_jsonl(run / "records.jsonl"), read_jsonl(run / "samples.jsonl")
    detection = {s["feature"]: s for s in samples if s["method"] == "snmf" and s.get("kind") == "feature_detection"
                 and s["label"] and s["activating_sentences"] and s["neutral_sentences"]}
    assert detection, "the fake judge labels the SNMF features and writes sentences for them"
    fit = next(r for r in records if r["method"] == "dim-snmf" and r["task"] == "fit")
    cfg = RunConfig.load(None, {"models": ["tiny:gpt2"], "method": {"dim-snmf": {"method": "dim",
                                                                                  "features_of": "snmf"}}})
    dim = make_method("dim-snmf", cfg, 0)
    assert FitCache().load(fit["fit_key"], dim) is not None
    features = sorted(detection)
    assert dim.concepts_ == [f"snmf {f}: {detection[f]['label']}" for f in features]

    model, tok, _ = load("tiny:gpt2")
    site = Site(0, "mlp")
    for j, f in enumerate(features):
        means = []
        for mode in ("activating", "neutral"):
            got = collect(model, tok, detection[f][f"{mode}_sentences"], [site], 16, 64)[site]
            means.append(got["x"].float().mean(0))
        expected = F.normalize(means[0] - means[1], dim=0)
        assert torch.allclose(dim.directions_[j], expected, atol=1e-4), f


def test_the_alias_is_scored_like_any_method(run: Path) -> None:
    records = read_jsonl(run / "records.jsonl")
    mine = [r for r in records if r["method"] == "dim-snmf"]
    assert {r["params"]["features_of"] for r in mine} == {"snmf"}
    n = len([r for r in mine if r["task"] == "feature_labels" and r["metric"] == "labelled"])
    cells = {(r["feature"], r["sign"]) for r in mine if r["task"] == "feature_steering" and r["metric"] == "reached"}
    assert n >= 1 and cells == {(f, s) for f in range(n) for s in (1, -1)}
    assert {r["feature"] for r in mine if r["task"] == "feature_detection" and r["metric"] == "s_cd"} == set(range(n))


@pytest.mark.parametrize(("flags", "message"), [
    (["-M", "dim-snmf.method=dmi"], "dim-snmf.method names unknown method 'dmi'"),
    (["-M", "dim-snmf.features_of=snfm"], "dim-snmf.features_of names unknown method 'snfm'"),
    (["-M", "dim-snmf.nromalize=false"], "unknown method parameter(s) dim-snmf.nromalize; valid for dim-snmf"),
])
def test_bad_aliases_fail_before_any_work(flags: list[str], message: str, tmp_path: Path,
                                          caplog: pytest.LogCaptureFixture) -> None:
    assert main(["run", "--dry-run", *ARGS, *flags, "--out", str(tmp_path / "x")]) == 2
    assert message in caplog.text


def test_a_source_outside_the_run_is_fitted_at_its_own_site(tmp_path: Path) -> None:
    """dim-snmf reads the residual stream while its source snmf, not a run method, reads the MLP hidden state."""
    args = [a for a in ARGS]
    args[args.index("snmf,dim-snmf")] = "dim-snmf"
    assert main(["run", *args, "-M", "dim-snmf.site=resid", "--out", str(tmp_path / "run")]) == 0
    records = read_jsonl(tmp_path / "run" / "records.jsonl")
    assert {r["method"] for r in records} == {"dim-snmf"} and {r["site"] for r in records} == {"resid@0"}
