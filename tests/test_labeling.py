"""The labeling task: contexts, output tokens, labels, detection scoring, caching; on tiny models with fake judges."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch

from bench.cli import main
from bench.features import vocab_projection
from bench.judge import FakeJudge, HFJudge, JudgeCache, OfflineGrader, TemplateGrader, fake_answer
from bench.models import load
from bench.results import load as load_records
from bench.results import read_jsonl
from bench.sites import Site
from tasks.labeling import (
    Labeling,
    LocalLabeler,
    Snippet,
    _shared_head,
    clean_label,
    parse_active,
    parse_yes_no,
    pieces,
)
from tests.conftest import FIXTURE_CONCEPTS

_WORD = re.compile(r"[a-z]{3,}")


def labeling_answer(prompt: str) -> str:
    """A deterministic fake LLM for the labeling templates (and the steering ones, via `fake_answer`):
    a label names the most common marked word; a context is active when it contains the label's last word;
    a label names a concept when they share a word."""
    if "<response>" in prompt:
        return fake_answer(prompt)
    if "numbered text snippets" in prompt:
        word = re.search(r"<label>(.*?)</label>", prompt, re.DOTALL).group(1).split()[-1].lower()
        lines = re.findall(r"^(\d+)\. (.*)$", prompt, re.MULTILINE)
        hits = [n for n, text in lines if word in text.lower()]
        return f"Looked for {word!r}.\nActive: {', '.join(hits) or 'none'}"
    if "<concept>" in prompt:
        label = re.search(r"<label>(.*?)</label>", prompt, re.DOTALL).group(1)
        concept = re.search(r"<concept>(.*?)</concept>", prompt, re.DOTALL).group(1)
        shared = set(_WORD.findall(label.lower())) & set(_WORD.findall(concept.lower())) - {"the", "word"}
        return f"Shared: {sorted(shared)}\nAnswer: {'yes' if shared else 'no'}"
    if "<<" in prompt:
        marked = Counter(w.lower() for m in re.findall(r"<<(.*?)>>", prompt) for w in m.split())
        return f"Label: the word {marked.most_common(1)[0][0]}" if marked else "Label: nothing"
    if "more likely to write" in prompt:
        first = re.search(r'"(.*?)"', prompt)
        return f"tokens such as {first.group(1) if first else 'none'}"
    return "I cannot answer."


def fake_grader(cache: JudgeCache | None = None) -> TemplateGrader:
    return TemplateGrader(FakeJudge(labeling_answer), cache)


SMALL = ("-T", "labeling.sources=train,test")  # no neutral corpus: faster


def _run(out: Path, monkeypatch: pytest.MonkeyPatch, methods: str = "dim", *extra: str) -> TemplateGrader:
    graders: list[TemplateGrader] = []

    def make(spec: str, **_: Any) -> TemplateGrader:
        graders.append(fake_grader())
        return graders[-1]

    monkeypatch.setattr("bench.judge.make_judge", make)
    args = ["run", "--models", "tiny:llama", "--layers", "1", "--methods", methods, "--tasks", "labeling",
            "--concepts", str(FIXTURE_CONCEPTS), "--judge", "fake", "--out", str(out), *(extra or SMALL)]
    assert main(args) == 0
    return graders[0]


def test_labeling_records_and_samples(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    grader = _run(tmp_path / "run", monkeypatch, "dim,snmf", "-M", "snmf.n_features=12",
                  "-T", "labeling.max_features=3", "-T", "labeling.n_top=6", "-T", "labeling.n_label=3",
                  "-T", "labeling.n_score=2")
    frame = load_records([tmp_path / "run"])
    lab = frame[frame["task"] == "labeling"]
    assert set(lab["metric"]) == {"label_accuracy", "label_f1", "label_names_concept", "output_label_names_concept"}
    assert (lab["split"] == "test").all() and lab["feature"].notna().all()
    acc = lab[lab["metric"] == "label_accuracy"]
    assert acc["value"].notna().any(), "some features must be scored"
    assert acc["value"].dropna().between(0, 1).all()
    names = lab[lab["metric"] == "label_names_concept"]
    assert names["concept"].notna().all() and set(names["value"].dropna()) <= {0.0, 1.0}
    rows = [r for r in read_jsonl(tmp_path / "run" / "samples.jsonl") if r.get("kind") == "labeling"]
    dim_rows = [r for r in rows if r["method"] == "dim"]
    assert len(dim_rows) == 3, "dim: one feature per fixture concept, all matched"
    snmf = [r for r in rows if r["method"] == "snmf"]
    assert len({r["feature"] for r in snmf}) == len(snmf) >= 3
    for r in rows:
        assert len(r["top"]) <= 6 and len(r["scoring"]) <= 4
        assert len(r["promoted"]) == len(r["suppressed"]) == 10
        assert r["promoted"][0][1] >= r["promoted"][-1][1] and r["suppressed"][0][1] <= 0
        for s in r["top"]:
            assert len(s["tokens"]) == len(s["acts"]) <= 31 and 0 <= s["peak"] < len(s["tokens"])
            assert s["acts"][s["peak"]] == max(s["acts"])
        peaks = [s["acts"][s["peak"]] for s in r["top"]]
        assert peaks == sorted(peaks, reverse=True) and (not peaks or r["max_act"] == pytest.approx(peaks[0], rel=1e-3))
        if not r["dead"]:
            assert r["label"] and r["label"].startswith("the word ")
            assert r["output_label"].startswith("tokens such as")
    assert grader.calls > 0


def test_rerun_makes_no_judge_calls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = _run(tmp_path / "a", monkeypatch)
    assert first.calls > 0 and first.cache.misses > 0
    second = _run(tmp_path / "b", monkeypatch)
    assert second.calls == 0 and second.cache.hits > 0
    a = [r for r in read_jsonl(tmp_path / "a" / "records.jsonl") if r["task"] == "labeling"]
    b = [r for r in read_jsonl(tmp_path / "b" / "records.jsonl") if r["task"] == "labeling"]
    assert [(r["metric"], r["feature"], r["value"]) for r in a] == [(r["metric"], r["feature"], r["value"]) for r in b]


class _BagOfWords(OfflineGrader):
    """An offline grader whose embedding is a hashed bag of words (no model download in tests)."""

    def embed(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:  # noqa: ARG002
        out = torch.zeros(len(texts), 64)
        for i, t in enumerate(texts):
            for w in _WORD.findall(t.lower()):
                out[i, sum(map(ord, w)) % 64] += 1
        return torch.nn.functional.normalize(out + 1e-6, dim=-1)


def test_offline_judge_uses_the_local_labeler_and_embeddings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    graders: list[OfflineGrader] = []

    def make(spec: str, **_: Any) -> OfflineGrader:
        graders.append(_BagOfWords())
        return graders[-1]

    monkeypatch.setattr("bench.judge.make_judge", make)
    common = ["run", "--models", "tiny:gpt2", "--layers", "0", "--methods", "dim", "--tasks", "labeling",
              "--concepts", str(FIXTURE_CONCEPTS), "-T", "labeling.labeler=tiny:llama", "-T",
              "labeling.max_new_tokens=4", *SMALL]
    assert main([*common, "--out", str(tmp_path / "a")]) == 0
    rows = [r for r in read_jsonl(tmp_path / "a" / "samples.jsonl") if r.get("kind") == "labeling"]
    assert rows and all(r["labeler"] == "hf:tiny:llama/completion" and r["scorer"].endswith("/cosine") for r in rows)
    scored = [r for r in rows if r["accuracy"] is not None]
    assert scored and all(isinstance(c, float) for r in scored for c in r["answers"]["detection"])
    hits = graders[0].cache.hits
    assert main([*common, "--out", str(tmp_path / "b")]) == 0
    assert graders[1].cache.misses == 0 and graders[1].cache.hits > hits


def test_vocab_projection_matches_the_model_for_a_residual_direction(tiny) -> None:  # noqa: ANN001
    model, _, arch = tiny
    d = model.config.hidden_size if hasattr(model.config, "hidden_size") else model.config.n_embd
    direction = torch.randn(1, d, generator=torch.Generator().manual_seed(0))
    ids, vals = vocab_projection(model, Site(1, "resid"), direction, k=5)
    assert ids.shape == vals.shape == (1, 2, 5)
    logits = model.get_output_embeddings().weight @ _norm_direction(model, arch, direction[0])
    assert ids[0, 0].tolist() == logits.topk(5).indices.tolist()
    assert ids[0, 1].tolist() == (-logits).topk(5).indices.tolist()
    neg_ids, _ = vocab_projection(model, Site(1, "resid"), -direction, k=5)
    assert torch.equal(neg_ids[0, 0], ids[0, 1]), "the promoted tokens of -v are the suppressed tokens of v"


def _norm_direction(model: torch.nn.Module, arch: str, v: torch.Tensor) -> torch.Tensor:
    """The final norm's effect on a lone direction, written out per norm type."""
    from bench.sites import arch_of

    norm = model.get_submodule(arch_of(model).final_norm)
    if isinstance(norm, torch.nn.LayerNorm):
        c = v - v.mean()
        return c / c.pow(2).mean().add(norm.eps).sqrt() * norm.weight
    with torch.no_grad():
        return norm(v[None])[0]


def test_vocab_projection_of_the_mlp_site_goes_through_the_down_projection(tiny) -> None:  # noqa: ANN001
    model, _, _ = tiny
    from bench.sites import down_proj

    z = torch.randn(3, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        written = down_proj(model, 1)(z) - down_proj(model, 1)(torch.zeros(1, 64))
    arch = model.config.model_type
    if arch.startswith("gemma"):  # the post-feed-forward norm sits between the MLP and the residual stream
        with torch.no_grad():
            written = model.model.layers[1].post_feedforward_layernorm(written)
    expected, _ = vocab_projection(model, Site(1, "resid"), written, k=4)
    got, _ = vocab_projection(model, Site(1, "mlp"), z, k=4)
    assert torch.equal(got, expected)


def test_local_labeler_runs_the_shared_head_once_with_the_same_result(monkeypatch: pytest.MonkeyPatch) -> None:
    labeler = LocalLabeler("tiny:llama", max_new_tokens=3, batch_size=2)
    prompts = [f"the cat sat on the mat\n\nthe dog {w}\nLabel:" for w in ("sat", "ran to the house", "is")]
    assert _shared_head(prompts) == "the cat sat on the mat"
    with monkeypatch.context() as m:
        m.setattr(HFJudge, "complete", lambda *_: pytest.fail("the shared-head path fell back to the plain one"))
        cached = labeler.complete(prompts)
    assert labeler.calls == 3
    assert cached == HFJudge.complete(labeler, prompts), "prefix caching must not change the greedy output"
    assert _shared_head(prompts[:1]) == "" and _shared_head(["ab", "cd"]) == ""


def test_pieces_join_to_the_decoded_text() -> None:
    _, tok, _ = load("tiny:gpt2")
    ids = tok("the cat sat on the mat", add_special_tokens=False)["input_ids"]
    assert "".join(pieces(tok, ids)) == tok.decode(ids)


def test_snippet_text_marks_runs_near_the_peak() -> None:
    s = Snippet("train", 0, [" a", " big", " red", " dog", " ran"], [0.0, 0.6, 1.0, 0.1, 0.0], peak=2)
    assert s.text(5, mark=True) == "a <<big red>> dog ran"
    assert s.text(1) == "big red dog"


@pytest.mark.parametrize(("text", "n", "expected"), [
    ("Reasoning.\nActive: 1, 3", 3, [True, False, True]),
    ("Active: none", 2, [False, False]),
    ("**Active:** [2]", 2, [False, True]),
    ("Active: 7", 3, None),
    ("no idea", 3, None),
    (None, 3, None),
])
def test_parse_active(text: str | None, n: int, expected: list[bool] | None) -> None:
    assert parse_active(text, n) == expected


def test_parse_yes_no_and_clean_label() -> None:
    assert parse_yes_no("It matches.\nAnswer: yes") == 1.0
    assert parse_yes_no("Answer: **no**") == 0.0
    assert parse_yes_no("maybe") is None
    assert clean_label('\n**Label:** "Words about cooking."\nMore text') == "Words about cooking."
    assert clean_label("  \n") is None and clean_label(None) is None


@pytest.mark.parametrize(("field", "value", "message"), [
    ("n_label", 30, "must not exceed labeling.n_top"),
    ("threshold", 2.0, "valid: -1..1"),
    ("n_score", 0, "labeling.n_score must be at least 1"),
    ("sources", ("train", "nuetral"), "valid: train, dev, test, neutral"),
])
def test_bad_options_name_the_field(field: str, value: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Labeling(**{field: value})


def test_first_line_stops_a_row_once_a_non_blank_line_has_ended() -> None:
    from types import SimpleNamespace

    from bench.labeler import FirstLine

    texts = ["colours\n", "\n\n  colours", " \n", "colours and", "a\nb"]
    tok = SimpleNamespace(batch_decode=lambda ids, skip_special_tokens: [texts[int(r[0])] for r in ids])
    ids = torch.tensor([[9, 9, i] for i in range(len(texts))])  # two prompt tokens, then the row's text
    done = FirstLine(tok, prompt_len=2)(ids, torch.zeros(len(texts), 3))
    assert done.tolist() == [True, False, False, False, True]


@pytest.mark.parametrize(("answer", "want"), [
    ('the word "colour"', 'the word "colour"'),
    ('"colours"', "colours"),
    ("'numbers'", "numbers"),
    ('"days of the week', "days of the week"),
    ('days of the week"', "days of the week"),
    ("the players' names", "the players' names"),
    ('"yes" or "no"', '"yes" or "no"'),
])
def test_clean_label_keeps_inner_quotes(answer: str, want: str) -> None:
    assert clean_label(answer) == want
