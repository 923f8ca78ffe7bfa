"""The paper's concept detection (S_CD): sentences from each feature's label, responses, the score."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from bench.cli import main
from bench.data import load_lines
from bench.feature_labels import FeatureLabel
from bench.judge import FakeJudge, JudgeCache, TemplateGrader
from bench.judges.local import FAKE_NEUTRAL
from bench.models import load
from bench.results import read_jsonl
from bench.sites import Site
from tasks.feature_detection import FeatureDetection, clean_sentence, s_cd_score, sentence_stats
from tests.conftest import FIXTURE_CONCEPTS


@pytest.mark.parametrize(("act", "neu", "want"), [
    (0.4, 0.2, math.log(2)), (0.1, 0.2, math.log(0.5)), (0.3, 0.0, None), (-0.1, 0.2, None), (None, 0.2, None),
])
def test_s_cd_is_the_log_ratio_of_positive_means(act: float | None, neu: float | None, want: float | None) -> None:
    got = s_cd_score(act, neu)
    assert got == pytest.approx(want) if want is not None else got is None


def test_sentence_stats_take_the_max_over_each_sentences_tokens() -> None:
    g = torch.Generator().manual_seed(0)
    x, d = torch.randn(7, 5, generator=g), F.normalize(torch.randn(5, generator=g), dim=0)
    prompt = torch.tensor([0, 0, 0, 1, 1, 2, 2])
    got = sentence_stats(d, x, prompt, [2, 0])
    cos = x @ d / x.norm(dim=-1)
    assert got["cosine"] == pytest.approx([float(cos[5:].max()), float(cos[:3].max())], abs=1e-6)
    mse = (x - d).pow(2).mean(-1)
    assert got["mse"] == pytest.approx([float(mse[5:].max()), float(mse[:3].max())], abs=1e-6)
    corr = [float(torch.corrcoef(torch.stack([x[i], d]))[0, 1]) for i in range(3)]
    assert got["corr"][1] == pytest.approx(max(corr), abs=1e-5)


@pytest.mark.parametrize(("answer", "want"), [
    ('"The cat sat on the mat."\nSecond line', "The cat sat on the mat."), ("Sentence: It rained.", "It rained."),
    ("  \n", None), (None, None),
])
def test_clean_sentence(answer: str | None, want: str | None) -> None:
    assert clean_sentence(answer) == want


def _ctx(judge: FakeJudge, cache: Path) -> SimpleNamespace:
    return SimpleNamespace(judge=TemplateGrader(judge, JudgeCache(cache)), device="cpu", seed=0)


def test_the_generator_sees_the_sentences_so_far_and_a_repeat_ends_the_list(tmp_path: Path) -> None:
    labels = {3: FeatureLabel(3, "ocean waves", {"+": None, "-": None})}
    out = FeatureDetection(n_sentences=5).sentences([3], labels, _ctx(FakeJudge(), tmp_path / "a.sqlite"))
    assert out[3]["activating"] == [f"Example {k} is about ocean waves." for k in range(1, 6)]
    assert out[3]["neutral"] == list(FAKE_NEUTRAL[:5])
    same = FeatureDetection(n_sentences=5).sentences([3], labels, _ctx(FakeJudge(lambda p: "The same sentence."),
                                                                         tmp_path / "b.sqlite"))
    assert same[3] == {"activating": ["The same sentence."], "neutral": ["The same sentence."]}


def test_offline_generator_completes_few_shot_prompts_ending_at_the_sentence_line(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from bench.judge import OfflineGrader

    sent: list[str] = []

    class Writer:
        def complete(self, prompts: list[str], version: str) -> list[str]:
            sent.extend(prompts)
            return [f" A sentence about waves number {len(sent)}.\nTopic: x" for _ in prompts]

    monkeypatch.setattr("tasks.feature_detection.writer", lambda *a, **k: Writer())
    labels = {0: FeatureLabel(0, "ocean waves", {"+": None, "-": None})}
    ctx = SimpleNamespace(judge=OfflineGrader(), device="cpu", seed=0)
    out = FeatureDetection(n_sentences=3).sentences([0], labels, ctx)  # type: ignore[arg-type]
    assert len(sent) == 3 and all(p.endswith("Topic: ocean waves\n" + "".join(
        f"Sentence: {s}\n" for s in out[0]["activating"][:k]) + "Sentence:") for k, p in enumerate(sent))
    assert out[0]["activating"] == [f"A sentence about waves number {k}." for k in (1, 2, 3)]
    assert len(out[0]["neutral"]) == 3


def test_responses_read_the_site_with_bos_and_without_it_in_the_max() -> None:
    model, tok, _ = load("tiny:gpt2")
    site = Site(1, "resid")
    method = SimpleNamespace(site=site, directions_=torch.randn(2, 32, generator=torch.Generator().manual_seed(2)))
    ctx = SimpleNamespace(model=model, tokenizer=tok)
    sentences = {1: {"activating": ["the cat sat on the mat"], "neutral": ["a bird"]}}
    got = FeatureDetection().responses(method, sentences, ctx)  # type: ignore[arg-type]
    ids = [tok.bos_token_id, *tok("the cat sat on the mat")["input_ids"]]
    from bench.hooks import read

    x = read(model, {"input_ids": torch.tensor([ids])}, [site])[site][0, 1:]  # BOS first, not in the max
    want = F.cosine_similarity(x, method.directions_[1][None], dim=-1).max()
    assert got[1]["activating"]["cosine"] == pytest.approx([float(want)], abs=1e-5)


def test_offline_run_writes_with_the_local_model_and_samples_neutral_text(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["run", "--models", "tiny:gpt2", "--layers", "1", "--methods", "dim", "--tasks", "feature_detection",
            "--concepts", str(FIXTURE_CONCEPTS), "--judge", "offline", "--out", str(out),
            "-T", "feature_labels.labeler=tiny:llama", "-T", "feature_labels.max_new_tokens=3",
            "-T", "feature_detection.generator=tiny:llama", "-T", "feature_detection.max_new_tokens=4",
            "-T", "feature_detection.n_sentences=2"]
    assert main(args) == 0
    records = read_jsonl(out / "records.jsonl")
    assert sorted(r["feature"] for r in records if r["metric"] == "s_cd") == [0, 1, 2]
    judges = {r["judge"] for r in records if r["task"] == "feature_detection"}
    assert judges == {"offline:all-MiniLM-L6-v2+nll/offline-v1"}
    corpus = set(load_lines(None, "neutral.jsonl")["text"])
    rows = [s for s in read_jsonl(out / "samples.jsonl") if s.get("kind") == "feature_detection"]
    scored = [s for s in rows if s["neutral_sentences"]]
    assert scored and all(len(s["neutral_sentences"]) == 2 and set(s["neutral_sentences"]) <= corpus for s in scored)
    assert all(len(s["activating_cosine"]) == len(s["activating_sentences"]) for s in scored)
