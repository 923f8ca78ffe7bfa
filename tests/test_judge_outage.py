"""A judge outage stops the run: the base URL and the judge spec are checked up front, `preflight` probes the
endpoint with one cached call, a run of failed calls raises `JudgeUnavailable` within a bounded time, records
so far are kept and `bench run --resume` finishes the run once the endpoint is back. Everything against a
local fake server (127.0.0.1, bounded loops, short timeouts)."""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from pathlib import Path

import pytest

from bench.activations import cache_root
from bench.cli import main
from bench.judge import JudgeUnavailable, OpenAIJudge, make_judge, preflight
from bench.judges.openai_compat import ENV_SETTINGS
from bench.results import read_jsonl
from tests.conftest import FIXTURE_CONCEPTS
from tests.fake_openai_server import FakeOpenAIServer

FAST = {"FEATBENCH_JUDGE_RETRIES": "1", "FEATBENCH_JUDGE_BACKOFF": "0.01", "FEATBENCH_JUDGE_TIMEOUT": "2",
        "FEATBENCH_JUDGE_MAX_FAILURES": "3", "FEATBENCH_JUDGE_CONCURRENCY": "2"}
KEY = "sk-featbench-OUTAGE-CANARY-31337"


@pytest.fixture
def fast_judge(monkeypatch: pytest.MonkeyPatch) -> None:
    """Short retries and timeouts, a local key that must never be written anywhere."""
    for k, v in FAST.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("FEATBENCH_JUDGE_API_KEY", KEY)


# ----------------------------------------------------------------------------------------------- input checks
@pytest.mark.parametrize("url", ["notaurl", "ftp://127.0.0.1/v1", "http://", "127.0.0.1:8000/v1",
                                 "http://127.0.0.1:port/v1", "https:///v1"])
def test_a_bad_base_url_is_one_clear_error_before_any_call(url: str) -> None:
    t0 = time.perf_counter()
    for check in (lambda: make_judge("openai:m", base_url=url), lambda: preflight("openai:m", url),
                  lambda: OpenAIJudge("m", url)):
        with pytest.raises(ValueError, match=rf"--judge-base-url {url!r} is not an http\(s\) URL with a host; "
                                             r"e\.g\. http://127\.0\.0\.1:8000/v1"):
            check()
    assert time.perf_counter() - t0 < 2, "no retries of a URL that can never work"


@pytest.mark.parametrize("spec", ["gpt4", "openai", "openai:", "hf", "fake:x", "offline:y", "", "OpenAI:gpt"])
def test_a_bad_judge_spec_is_one_clear_error(spec: str) -> None:
    valid = r"valid: offline \| fake \| openai:<model> \| hf:<path or id>"
    with pytest.raises(ValueError, match=rf"unknown judge {spec!r}; {valid}"):
        preflight(spec, None)


def test_preflight_names_the_install_command_when_openai_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "openai", None)  # import openai now raises ImportError
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'featbench\[judge\]'"):
        preflight("openai:m", "http://127.0.0.1:9/v1")
    preflight("fake", None)  # the other judges do not need it


def test_preflight_probes_once_and_a_rerun_pays_nothing(fast_judge: None) -> None:
    with FakeOpenAIServer() as srv:
        preflight("openai:probe-model", srv.base_url)
        assert len(srv.log) == 1 and srv.log[0]["model"] == "probe-model"
        preflight("openai:probe-model", srv.base_url)
        assert len(srv.log) == 1, "the probe's answer is cached like any other"


@pytest.mark.parametrize("fault", ["500", "hang", "refused"])
def test_preflight_fails_fast_when_the_endpoint_does_not_answer(fast_judge: None, fault: str) -> None:
    with FakeOpenAIServer(lambda p, a: "500" if fault == "500" else "hang", deadline_s=30) as srv:
        url = srv.base_url
        if fault == "refused":
            srv.stop()  # nothing listens on the port any more
        t0 = time.perf_counter()
        with pytest.raises(JudgeUnavailable, match=rf"judge endpoint {url} did not answer a probe call for model "
                                                   r"'m' \((HTTP 500|connection error|timeout).*after 2 attempts\)"):
            preflight("openai:m", url)
    assert time.perf_counter() - t0 < 10  # 2 attempts, each bounded by the 2 s timeout
    assert isinstance(JudgeUnavailable("x"), ValueError), "the CLI turns it into one line and exit 2"


# ----------------------------------------------------------------------------------------------- the breaker
def test_consecutive_failures_stop_the_batch_within_bounded_time_and_requests() -> None:
    with FakeOpenAIServer(lambda p, a: "500") as srv:
        judge = OpenAIJudge("m", srv.base_url, concurrency=4, max_retries=2, backoff=0.05, max_failures=3)
        t0 = time.perf_counter()
        with pytest.raises(JudgeUnavailable, match=rf"judge endpoint {srv.base_url} is unavailable: [3-9] prompts "
                                                   r"in a row got no answer \(last: HTTP 500 after 3 attempts\).*"
                                                   r"bench run --resume"):
            judge.complete([f"<response>p{i}</response>" for i in range(40)])
        elapsed = time.perf_counter() - t0
    assert elapsed < 3, elapsed
    assert len(srv.log) <= (3 + 4) * 3, "the in-flight prompts stop; the queued ones are never sent"


def test_a_hanging_endpoint_trips_the_breaker_after_its_timeouts() -> None:
    with FakeOpenAIServer(lambda p, a: "hang", deadline_s=30) as srv:
        judge = OpenAIJudge("m", srv.base_url, concurrency=2, max_retries=0, timeout=0.3, max_failures=2)
        t0 = time.perf_counter()
        with pytest.raises(JudgeUnavailable, match=r"\(last: timeout of 0\.3 s after 1 attempt\)"):
            judge.complete([f"<response>p{i}</response>" for i in range(20)])
    assert time.perf_counter() - t0 < 3 and len(srv.log) <= 4


def test_isolated_failures_stay_unscored_and_do_not_stop_the_run() -> None:
    """Every other prompt fails for good: 10 failures, never `max_failures` in a row, so nothing is raised."""
    with FakeOpenAIServer(lambda p, a: "500" if "fail" in p else "ok") as srv:
        judge = OpenAIJudge("m", srv.base_url, concurrency=1, max_retries=0, max_failures=2)
        prompts = [f"<response>{'fail' if i % 2 else 'fine'} {i} a b</response>" for i in range(20)]
        answers = judge.complete(prompts)
    assert [a is None for a in answers] == [i % 2 == 1 for i in range(20)]


def test_the_defaults_bound_an_outage(monkeypatch: pytest.MonkeyPatch) -> None:
    """With no environment overrides, an always-500 endpoint costs at most ~10 s of backoff before the run
    stops, and a hanging one about 2 minutes (the old defaults: 6 retries, 60 s; 231 s for 9 prompts)."""
    for var in ENV_SETTINGS:
        monkeypatch.delenv(var, raising=False)
    judge = OpenAIJudge.from_env("m", "http://127.0.0.1:9/v1")
    worst_backoff = sum(min(judge.max_backoff, judge.backoff * 2**a) * 1.5 for a in range(judge.max_retries))
    assert worst_backoff <= 12 and (judge.max_retries + 1) * judge.timeout + worst_backoff <= 150
    assert 1 <= judge.max_failures <= 10
    monkeypatch.setenv("FEATBENCH_JUDGE_MAX_FAILURES", "2.5")
    with pytest.raises(ValueError, match=r"\$FEATBENCH_JUDGE_MAX_FAILURES='2.5' is not a whole number"):
        OpenAIJudge.from_env("m", "http://127.0.0.1:9/v1")


# ----------------------------------------------------------------------------------------------- whole runs
ARGS = ["run", "--models", "tiny:gpt2", "--layers", "1", "--methods", "dim", "--tasks", "steering",
        "--judge", "openai:fake", "--concepts", str(FIXTURE_CONCEPTS), "-T", "steering.max_new_tokens=5",
        "-T", "steering.n_dev=1", "-T", "steering.n_test=2", "-T", "steering.factors=1,4"]


class Switch:
    """A fault for the fake server: `ok` for the first `healthy_for` requests, then `mode`."""

    def __init__(self, healthy_for: int, mode: str = "500") -> None:
        self.healthy_for, self.mode, self.seen = healthy_for, mode, 0
        self._lock = threading.Lock()

    def __call__(self, _prompt: str, _attempt: int) -> str:
        with self._lock:
            self.seen += 1
            return "ok" if self.seen <= self.healthy_for else self.mode


def _comparable(out: Path) -> list[str]:
    """The run's records without run_id, and without the fit's wall time."""
    rows = []
    for r in read_jsonl(out / "records.jsonl"):
        r = {k: v for k, v in r.items() if k != "run_id"}
        if r["metric"] == "fit_seconds":
            r["value"] = None
        rows.append(json.dumps(r, sort_keys=True))
    return sorted(rows)


def _stored_answers() -> int:
    import sqlite3

    with sqlite3.connect(cache_root() / "judge.sqlite") as conn:
        return conn.execute("SELECT COUNT(*) FROM answers").fetchone()[0]


def test_an_always_500_judge_stops_the_run_fast_with_one_clear_line(
        tmp_path: Path, fast_judge: None, caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "run"
    with FakeOpenAIServer(lambda p, a: "500") as srv:
        code = main([*ARGS, "--judge-base-url", srv.base_url, "--out", str(out)])
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert code != 0 and len(errors) == 1 and "\n" not in errors[0].getMessage()
    assert srv.base_url in errors[0].getMessage() and "HTTP 500" in errors[0].getMessage()
    assert "Traceback" not in caplog.text
    # 3 prompts in a row fail (2 attempts each), the others in flight stop: never the whole run's 54 prompts
    assert 1 <= len(srv.log) <= (3 + 2) * 2, len(srv.log)
    assert srv.log[-1]["t"] - srv.log[0]["t"] < 5, "the judge gave up within seconds"


def test_an_outage_mid_run_keeps_records_and_resume_finishes_it_like_an_uninterrupted_run(
        tmp_path: Path, fast_judge: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    switch = Switch(healthy_for=10**9)
    with FakeOpenAIServer(switch, deadline_s=300) as srv:
        whole = tmp_path / "whole"  # the reference: an uninterrupted run against the healthy server
        assert main([*ARGS, "--judge-base-url", srv.base_url, "--out", str(whole)]) == 0
        needed = len(srv.log)  # every distinct judge prompt of the run (plus the probe, if any), once each
        assert needed > 10

        monkeypatch.setenv("FEATBENCH_CACHE", str(tmp_path / "cache2"))  # pay the judge again from scratch
        switch.seen, switch.healthy_for = 0, 4  # the endpoint dies after 4 answers
        out = tmp_path / "run"
        caplog.clear()
        code = main([*ARGS, "--judge-base-url", srv.base_url, "--out", str(out)])
        assert code != 0 and "is unavailable" in caplog.text and "--resume" in caplog.text
        units = [u["unit"] for u in read_jsonl(out / "units.jsonl")]
        assert units == ["tiny:gpt2|1|dim|fit"], "the fit unit is kept, the steering unit is not done"
        assert {r["task"] for r in read_jsonl(out / "records.jsonl")} == {"fit"}
        paid = _stored_answers()
        assert paid == 4, "the answers that arrived before the outage are cached"

        switch.healthy_for = 10**9  # the endpoint is back
        before = len(srv.log)
        assert main(["run", "--resume", str(out)]) == 0
        assert len(srv.log) - before == needed - paid, "the resumed run asks only for the missing answers"
    assert _comparable(out) == _comparable(whole)
    files = [p for p in [*tmp_path.rglob("*"), *cache_root().rglob("*")] if p.is_file()]
    assert any(p.name == "judge.sqlite" for p in files)
    for p in files:
        assert KEY.encode() not in p.read_bytes(), f"the API key leaked into {p}"
    assert KEY not in caplog.text
    assert {r["authorization"] for r in srv.log} == {f"Bearer {KEY}"}
