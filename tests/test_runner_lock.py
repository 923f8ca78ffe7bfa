"""A run directory has one writer: a second process on it exits 2 at once naming the holder's pid."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.config import RunConfig
from bench.results import read_jsonl
from bench.runner import Run
from tests.conftest import FIXTURE_CONCEPTS

ROOT = Path(__file__).parent.parent


def _bench(*args: str, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "bench", *args], cwd=ROOT, env={**os.environ, **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_second_process_on_a_run_directory_exits_2_naming_the_holder(tmp_path: Path) -> None:
    env = {"FEATBENCH_PLUGINS": "tests.plugin_slow", "FEATBENCH_CACHE": str(tmp_path / "cache"),
           "OMP_NUM_THREADS": "1"}
    out = tmp_path / "r"
    args = ["run", "--models", "tiny:gpt2", "--layers", "0,1", "--methods", "dim", "--tasks", "slow_norm",
            "-T", "slow_norm.pause=2", "--concepts", str(FIXTURE_CONCEPTS), "--out", str(out)]
    first = _bench(*args, env=env)
    try:
        deadline = time.time() + 120
        while not read_jsonl(out / "units.jsonl") and time.time() < deadline and first.poll() is None:
            time.sleep(0.02)
        assert first.poll() is None, "the first run ended before the test could hold it"
        first.send_signal(signal.SIGSTOP)  # frozen mid-run, holding the lock
        assert (out / ".lock").read_text().strip() == str(first.pid)
        n_units = len(read_jsonl(out / "units.jsonl"))
        t0 = time.time()
        seconds = [_bench(*a, env=env) for a in (["run", "--resume", str(out)], args)]  # resume; same --out
        for second in seconds:
            _, err = second.communicate(timeout=120)
            assert second.returncode == 2, err
            assert f"pid {first.pid}" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert time.time() - t0 < 90, "refused at once, not after waiting for the lock"
        assert len(read_jsonl(out / "units.jsonl")) == n_units, "the refused processes wrote nothing"
    finally:
        first.send_signal(signal.SIGCONT)
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    units = [u["unit"] for u in read_jsonl(out / "units.jsonl")]
    records = read_jsonl(out / "records.jsonl")
    assert sorted(units) == sorted(set(units)) and len(units) == 4
    assert len(records) == sum(u["n_records"] for u in read_jsonl(out / "units.jsonl")), "records doubled"
    assert len({json.dumps(r, sort_keys=True) for r in records}) == len(records)
    assert len(json.loads((out / "env.json").read_text())["starts"]) == 1, "only the first process started"


def test_the_lock_is_held_for_the_life_of_the_run(tmp_path: Path) -> None:
    cfg = RunConfig(models=("tiny:gpt2",), layers=(0,), methods=("dim",), tasks=("detection",),
                    concepts=str(FIXTURE_CONCEPTS))
    with Run(cfg, tmp_path / "r"), pytest.raises(ValueError, match=f"in use by another bench process \\(pid "
                                                              f"{os.getpid()}\\)"):
        Run(cfg, tmp_path / "r", resume=True)
    with Run(cfg, tmp_path / "r", resume=True):  # released by close()
        pass


def test_an_unwritable_run_directory_is_one_line_error(tmp_path: Path) -> None:
    cfg = RunConfig(models=("tiny:gpt2",), layers=(0,), methods=("dim",), tasks=("detection",))
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="cannot write the run directory"):
        Run(cfg, tmp_path / "file" / "r")
