"""The judge cache keeps what was paid for: each answer is stored the moment it arrives, so a batch killed
midway (SIGKILL of the process, or an exception) costs only the missing items on the rerun."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.judge import JudgeCache, OpenAIJudge, TemplateGrader
from tests.fake_openai_server import FakeOpenAIServer

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [f"<response>answer number {i} with some words</response>" for i in range(12)]
# One batch of PROMPTS through the OpenAI-compatible judge (concurrency 3, no retries) into the cache at argv[2].
BATCH = """
import sys
from pathlib import Path
from bench.judge import JudgeCache, OpenAIJudge, TemplateGrader
prompts = [f"<response>answer number {i} with some words</response>" for i in range(12)]
judge = OpenAIJudge("fake-model", sys.argv[1], concurrency=3, max_retries=0, timeout=60)
TemplateGrader(judge, JudgeCache(Path(sys.argv[2]))).complete(prompts, "v1")
"""


def _stored(path: Path) -> int:
    try:
        with sqlite3.connect(path, timeout=5) as conn:
            return conn.execute("SELECT COUNT(*) FROM answers").fetchone()[0]
    except sqlite3.OperationalError:  # not created yet
        return 0


def test_a_batch_killed_midway_keeps_its_answers_and_the_rerun_asks_only_for_the_rest(tmp_path: Path) -> None:
    n_answered = 5
    state = {"healthy": False, "seen": 0}
    lock = threading.Lock()

    def fault(_prompt: str, _attempt: int) -> str:
        """The first `n_answered` requests are answered, later ones hang until the batch is killed."""
        with lock:
            state["seen"] += 1
            return "ok" if state["healthy"] or state["seen"] <= n_answered else "hang"

    db = tmp_path / "judge.sqlite"
    with FakeOpenAIServer(fault, deadline_s=90) as srv:
        proc = subprocess.Popen([sys.executable, "-c", BATCH, srv.base_url, str(db)], cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 60
            while (len(srv.log) <= n_answered or _stored(db) < n_answered) and time.monotonic() < deadline:
                assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
                time.sleep(0.1)
            time.sleep(0.3)  # give a late write (there must be none) the chance to land
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        assert len(srv.log) > n_answered, "the batch was still in flight when it was killed"
        assert _stored(db) == n_answered, "every answer that arrived was stored before the kill"
        paid = {r["prompt"] for r in srv.log if r["answer"] is not None}

        state["healthy"] = True
        before = len(srv.log)
        judge = OpenAIJudge("fake-model", srv.base_url, concurrency=3, max_retries=0, timeout=10)
        answers = TemplateGrader(judge, JudgeCache(db)).complete(PROMPTS, "v1")
        asked = [r["prompt"] for r in srv.log[before:]]
    assert all(a is not None for a in answers)
    assert len(asked) == len(PROMPTS) - n_answered and not set(asked) & paid, "only the missing items were asked"
    assert _stored(db) == len(PROMPTS)


def test_streamed_answers_are_stored_before_the_stream_fails(tmp_path: Path) -> None:
    cache = JudgeCache(tmp_path / "j.sqlite")

    def compute(idx: list[int]) -> Iterator[tuple[int, str | None]]:
        yield 1, "b"
        yield 0, None  # a failed call: not stored
        yield 2, "c"
        raise RuntimeError("the judge died")

    keys = ["k0", "k1", "k2", "k3"]
    with pytest.raises(RuntimeError, match="the judge died"):
        cache.through(keys, "j", "v", compute)
    assert JudgeCache(tmp_path / "j.sqlite").get(keys) == {"k1": "b", "k2": "c"}
    asked: list[list[int]] = []
    again = cache.through(keys, "j", "v", lambda idx: asked.append(idx) or [f"new{i}" for i in idx])
    assert asked == [[0, 3]] and again == ["new0", "b", "c", "new3"]


def test_openai_judge_streams_in_completion_order() -> None:
    """A slow first prompt does not hold back the answers (and their cache writes) of the others."""
    with FakeOpenAIServer(lambda p, a: "timeout" if "slow" in p else "ok", timeout_sleep=0.5) as srv:
        judge = OpenAIJudge("fake-model", srv.base_url, concurrency=3, max_retries=0, timeout=10)
        order = [i for i, _ in judge.stream(["<response>slow one</response>", "<response>a</response>",
                                             "<response>b</response>"])]
    assert order[-1] == 0 and sorted(order) == [0, 1, 2]
