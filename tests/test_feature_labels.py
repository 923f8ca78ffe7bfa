"""Labels of every feature (the paper's feature-centric protocol): evidence, labeler prompts, parsing, the store,
and `bench run --tasks feature_labels,feature_detection` end to end on tiny:gpt2 with the fake judge."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from bench.cli import main
from bench.feature_evidence import top_codes, vocab_lists
from bench.feature_labels import LabelSettings, LabelStore, label_features, parse_label, select_features
from bench.judge import FakeJudge, TemplateGrader, fake_answer
from bench.models import load
from bench.results import read_jsonl
from bench.sites import Site
from methods.snmf import SNMF
from tests.conftest import FIXTURE_CONCEPTS, planted_acts

SMALL = ["-M", "snmf.n_features=6", "-M", "snmf.max_iter=10", "-M", "sae.d_sae=16", "-M", "sae.k=4",
         "-M", "sae.n_steps=20"]


class CountingJudge(FakeJudge):
    """The fake judge, counting the label prompts it answers and keeping every prompt."""

    def __init__(self) -> None:
        super().__init__(fake_answer)
        self.prompts: list[str] = []

    def complete(self, prompts: list[str]) -> list[str | None]:
        self.prompts += prompts
        return super().complete(prompts)

    @property
    def label_prompts(self) -> list[str]:
        return [p for p in self.prompts if "Token: `" in p]


def _run(out: Path, monkeypatch: pytest.MonkeyPatch, *extra: str, methods: str = "snmf,sae,dim",
         tasks: str = "feature_labels,feature_detection") -> CountingJudge:
    judges: list[CountingJudge] = []

    def make(spec: str, **_: Any) -> TemplateGrader:
        judges.append(CountingJudge())
        return TemplateGrader(judges[-1])

    monkeypatch.setattr("bench.judge.make_judge", make)
    args = ["run", "--models", "tiny:gpt2", "--layers", "1", "--methods", methods, "--tasks", tasks,
            "--concepts", str(FIXTURE_CONCEPTS), "--judge", "fake", "--out", str(out), *SMALL, *extra]
    assert main(args) == 0
    return judges[0]


def test_every_feature_is_labelled_once_and_the_second_task_reads_the_store(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    judge = _run(tmp_path / "run", monkeypatch, "-T", "feature_labels.max_features=5",
                 "-T", "feature_detection.max_features=5", "-T", "feature_labels.n_show=3")
    records = read_jsonl(tmp_path / "run" / "records.jsonl")
    samples = [s for s in read_jsonl(tmp_path / "run" / "samples.jsonl") if s.get("kind") == "feature_label"]
    n_features = {"snmf": 6, "sae": 16, "dim": 3}
    expected_prompts = 0
    for method, n in n_features.items():
        chosen = select_features(n, 5, 0)
        rows = [r for r in records if r["method"] == method and r["task"] == "feature_labels"]
        for metric in ("input_labelled", "output_labelled_pos", "output_labelled_neg", "labelled"):
            got = sorted(r["feature"] for r in rows if r["metric"] == metric)
            assert got == chosen, (method, metric)
        assert all(r["value"] in (0.0, 1.0) for r in rows if r["metric"] != "labelled")
        mine = {s["feature"]: s for s in samples if s["method"] == method}
        assert sorted(mine) == chosen
        for f in chosen:
            s = mine[f]
            assert len(s["vocab_pos"]) == len(s["vocab_neg"]) == 75 and len(s["top_tokens"]) <= 25
            assert all(t["activation"] > 0 for t in s["top_tokens"])
            flags = {r["metric"]: r["value"] for r in rows if r["feature"] == f}
            assert flags["input_labelled"] == float(s["input_label"] is not None)
            assert flags["output_labelled_neg"] == float(s["output_label_neg"] is not None)
            expected_prompts += 2 + bool(s["top_tokens"])
        detection = [r for r in records if r["method"] == method and r["task"] == "feature_detection"]
        assert sorted(r["feature"] for r in detection if r["metric"] == "s_cd") == chosen
    assert len(judge.label_prompts) == expected_prompts, "feature_detection must read the labels from the store"
    shown = [p for p in judge.label_prompts if "Activation:" in p]
    assert shown and all(p.count("Token: `") <= 3 for p in shown), "-T feature_labels.n_show reaches ctx.labels"
    assert any(p.count("Token: `") == 3 for p in shown)


def test_a_rerun_labels_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = _run(tmp_path / "a", monkeypatch, methods="dim", tasks="feature_labels")
    assert first.label_prompts
    second = _run(tmp_path / "b", monkeypatch, methods="dim", tasks="feature_labels")
    assert second.calls == 0
    changed = _run(tmp_path / "c", monkeypatch, "-T", "feature_labels.n_vocab_show=5", methods="dim",
                   tasks="feature_labels")
    assert changed.label_prompts, "other settings are other labels"


def test_snmf_top_tokens_come_from_the_fitted_codes_of_a_capped_fit() -> None:
    acts = planted_acts(n=400, d=16)
    fitted = acts.cap(300, seed=1)
    snmf = SNMF(site=acts.site, n_features=4, max_iter=30, seed=0, device="cpu").fit(fitted)
    assert snmf.top_codes_.shape == snmf.top_prompt_.shape == (4, 100)
    assert (snmf.top_codes_[:, :-1] >= snmf.top_codes_[:, 1:]).all()

    def no_encoding(x: torch.Tensor) -> torch.Tensor:
        raise AssertionError("the SNMF labels must not re-encode")

    snmf.encode = no_encoding  # type: ignore[method-assign]
    vals, idx = top_codes(snmf, acts, [1, 3], 25)  # mapped into the uncapped activations
    torch.testing.assert_close(vals, snmf.top_codes_[[1, 3], :25])
    assert torch.equal(acts.prompt_idx[idx], snmf.top_prompt_[[1, 3], :25])
    assert torch.equal(acts.position[idx], snmf.top_position_[[1, 3], :25])


def test_other_methods_top_tokens_are_a_running_top_k_of_encode() -> None:
    acts = planted_acts(n=300, d=16)
    snmf = SNMF(site=acts.site, n_features=3, max_iter=5, seed=0, device="cpu").fit(acts)
    del snmf.top_codes_
    z = snmf.encode(acts.x)
    vals, idx = top_codes(snmf, dataclasses.replace(acts), [0, 2], 7)
    ref = z[:, [0, 2]].T.topk(7, dim=1)
    torch.testing.assert_close(vals, ref.values)
    torch.testing.assert_close(z[idx[0], 0], ref.values[0])


@pytest.mark.parametrize("arch", ["gpt2", "gemma2"])
def test_vocab_lists_follow_the_reference_projection(arch: str) -> None:
    model, _, _ = load(f"tiny:{arch}")
    z = torch.randn(2, 64, generator=torch.Generator().manual_seed(0))
    ids, scores = vocab_lists(model, Site(1, "mlp"), z, 6)
    u = F.normalize(z, dim=-1)
    with torch.no_grad():
        if arch == "gpt2":  # ln_f(z W_down) without b_out; ln_f keeps its bias; the unembedding
            block, norm = model.transformer.h[1], model.transformer.ln_f
            h = u @ block.mlp.c_proj.weight
        else:  # Gemma: post-feed-forward norm of W_down z, the sign applied after it
            block, norm = model.model.layers[1], model.model.norm
            h = block.post_feedforward_layernorm(block.mlp.down_proj(u))
        for k, sign in enumerate((1.0, -1.0)):
            logits = model.lm_head(norm(sign * h))
            if not getattr(model.config, "final_logit_softcapping", None):
                logits = logits - logits.mean(-1, keepdim=True)
            top = logits.topk(6, dim=-1)
            assert torch.equal(ids[:, k], top.indices)
            torch.testing.assert_close(scores[:, k], top.values)
    if arch == "gpt2":
        torch.nn.init.normal_(model.transformer.ln_f.bias, std=1.0)  # a real ln_f bias: -d is not the bottom of +d
        ids, _ = vocab_lists(model, Site(1, "mlp"), z, 6)
        with torch.no_grad():
            plain = model.lm_head(model.transformer.ln_f(u @ model.transformer.h[1].mlp.c_proj.weight))
        assert not torch.equal(ids[:, 1], (-plain).topk(6, dim=-1).indices)


@pytest.mark.parametrize(("answer", "style", "label"), [
    ("Analysis: the tokens are foods.\nResults: cooking and food", "", "cooking and food"),
    ("Analysis: x\nResults:\n- Connection: football terms", "", "football terms"),
    ("Analysis: nothing shared.\nResults: NO THEME", "", None),
    ("Analysis: nothing.\nResults: TRASH", "", None),
    ("Analysis: cut off before the results", "", None),
    (None, "", None),
    (" musical instruments\nTexts:", "_local", "musical instruments"),
    ("\nTexts: the model broke the line", "_local", None),
    (' - the word "sud', "_local", 'the word "sud'),
    ("none", "_local", None),
])
def test_parse_label(answer: str | None, style: str, label: str | None) -> None:
    assert parse_label(answer, style) == label


def test_the_store_keys_on_the_fit_settings_and_writer(tmp_path: Path) -> None:
    model, tok, _ = load("tiny:gpt2")
    acts = planted_acts(n=120, d=64, kind="mlp")
    acts = dataclasses.replace(acts, site=Site(1, "mlp"), token_ids=torch.arange(120) % 50 + 10)
    method = SNMF(site=Site(1, "mlp"), n_features=3, max_iter=5, device="cpu").fit(acts)
    judge = CountingJudge()
    ctx = SimpleNamespace(model=model, tokenizer=tok, acts=lambda split, site: acts, judge=TemplateGrader(judge),
                          device="cpu", fit_key="fit-a")
    first = label_features(method, [0, 2], ctx)
    n = judge.calls
    assert n > 0 and set(first) == {0, 2}
    assert label_features(method, [2, 0], ctx) == first and judge.calls == n, "served from the store"
    label_features(method, [1], ctx)
    assert judge.calls > n, "a new feature is labelled"
    n = judge.calls
    label_features(method, [0], ctx, LabelSettings(n_show=2))
    assert judge.calls == n + 1, "a new input prompt; the output prompts are the same (judge cache)"
    ctx.fit_key = "fit-b"
    label_features(method, [0], ctx)
    files = sorted(len(list(d.glob("*.json"))) for d in LabelStore().root.iterdir())
    assert files == [1, 1, 3], "one store entry per (fit, settings, writer), one file per feature"


def test_local_completion_prompts_end_at_the_label_line() -> None:
    from bench.feature_labels import _prompt
    from bench.judge import load_template

    assert _prompt(load_template("feature_label_output_local"), "_local", tokens="a, b").endswith("\nTopic:")
    assert _prompt(load_template("feature_label_input_local"), "_local", examples="- [[a]]").endswith("\nLabel:")
    assert _prompt(load_template("feature_label_output"), "", tokens="x").endswith("\n")


def test_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="n_show=30 must not exceed feature_labels.n_top=25"):
        LabelSettings(n_show=30)
    with pytest.raises(ValueError, match="window must be >= 0"):
        LabelSettings(window=-1)
