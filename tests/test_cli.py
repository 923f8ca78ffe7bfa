"""`bench run` / `bench report` end to end on tiny models, errors, and crash-safe resume."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.cli import main
from bench.config import RunConfig
from bench.results import load, read_jsonl
from tests.conftest import FIXTURE_CONCEPTS

ROOT = Path(__file__).parent.parent


def _bench(*args: str, env: dict[str, str] | None = None, **kw) -> subprocess.Popen:  # noqa: ANN003
    return subprocess.Popen([sys.executable, "-m", "bench", *args], cwd=ROOT, env={**os.environ, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_run_then_report_prints_a_leaderboard(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "smoke"
    args = ["run", "--models", "tiny:gpt2,tiny:gemma2,tiny:llama", "--layers", "0,1", "--methods", "dim",
            "--tasks", "detection", "--concepts", str(FIXTURE_CONCEPTS), "--out", str(out)]
    assert main(args) == 0
    capsys.readouterr()
    assert main(["report", str(out)]) == 0
    table = capsys.readouterr().out
    header = next(line for line in table.splitlines() if line.startswith("| method"))
    assert header.count(" L0") == 3 and header.count(" L1") == 3
    assert any(line.startswith("| dim") for line in table.splitlines())
    assert (out / "leaderboard.csv").exists() and (out / "env.json").exists()
    frame = load([out])
    assert set(frame["model"]) == {"tiny:gpt2", "tiny:gemma2", "tiny:llama"}
    rec = frame[(frame["task"] == "detection") & (frame["split"] == "test")].iloc[0]
    assert rec["params"]["site"] and rec["model_source"].startswith(rec["model"])
    assert {"run_id", "model", "layer", "site", "method", "params", "task", "metric", "value", "concept",
            "split", "seed"} <= set(frame.columns)
    assert main(args) == 2, "a second run into the same directory must be refused"


@pytest.mark.parametrize(("flags", "message"), [
    (["--methods", "dimm"], "unknown method 'dimm'; known: dim"),
    (["--layers", "99"], "has 2 layers"),
    (["-M", "dim.normalise=false"], "valid for dim: chunk_tokens, features_of, normalize, site"),
    (["--tasks", "detect"], "unknown task 'detect'; known: detection"),
])
def test_bad_input_fails_without_traceback(tmp_path: Path, flags: list[str], message: str) -> None:
    proc = _bench("run", "--models", "tiny:gpt2", "--methods", "dim", "--tasks", "detection",
                  "--concepts", str(FIXTURE_CONCEPTS), "--out", str(tmp_path / "x"), *flags)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert message in err and "Traceback" not in err, err


def _strip(records: list[dict]) -> list[str]:
    """Records without what legitimately differs between runs (run id, wall-clock timings)."""
    keep = [{k: v for k, v in r.items() if k != "run_id"} for r in records if not r["metric"].endswith("seconds")]
    return sorted(json.dumps(r, sort_keys=True) for r in keep)


def test_sigkill_then_resume_gives_the_records_of_an_uninterrupted_run(tmp_path: Path) -> None:
    env = {"FEATBENCH_PLUGINS": "tests.plugin_slow", "FEATBENCH_CACHE": str(tmp_path / "cache")}
    common = ["run", "--models", "tiny:gpt2,tiny:llama", "--layers", "0,1", "--methods", "dim",
              "--tasks", "detection,slow_norm", "--concepts", str(FIXTURE_CONCEPTS)]
    killed = tmp_path / "killed"
    proc = _bench(*common, "--out", str(killed), env=env)
    deadline = time.time() + 120
    while len(read_jsonl(killed / "units.jsonl")) < 4 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n_done = len(read_jsonl(killed / "units.jsonl"))
    assert 4 <= n_done < 12
    resumed = _bench("run", "--resume", str(killed), env=env)
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    full = tmp_path / "full"
    straight = _bench(*common, "--out", str(full), env=env)
    _, err = straight.communicate(timeout=300)
    assert straight.returncode == 0, err
    assert len(read_jsonl(killed / "units.jsonl")) == 12
    assert _strip(read_jsonl(killed / "records.jsonl")) == _strip(read_jsonl(full / "records.jsonl"))


def test_resume_drops_records_of_a_unit_without_done_marker(tmp_path: Path) -> None:
    out = tmp_path / "r"
    args = ["run", "--models", "tiny:gpt2", "--layers", "0", "--methods", "dim", "--tasks", "detection",
            "--concepts", str(FIXTURE_CONCEPTS), "--out", str(out)]
    assert main(args) == 0
    records = (out / "records.jsonl").read_text()
    units = read_jsonl(out / "units.jsonl")
    # simulate a crash after the detection records were written but before its done marker
    (out / "units.jsonl").write_text("".join(json.dumps(u) + "\n" for u in units if "detection" not in u["unit"]))
    with open(out / "records.jsonl", "a") as f:
        f.write('{"torn": ')  # and a torn line
    assert main(["run", "--resume", str(out)]) == 0
    assert _strip(read_jsonl(out / "records.jsonl")) == _strip([json.loads(x) for x in records.splitlines()])


def test_dry_run_lists_units_offline_and_runs_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "dry"
    args = ["run", "--dry-run", "--models", "gpt2,google/gemma-2-2b", "--layers", "6,late", "--methods", "dim",
            "--tasks", "detection", "--out", str(out)]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "| google/gemma-2-2b |" in text and "forward_tflop" in text
    assert text.count("pending") == 2 * 2 * 2  # models x layers x (fit, detection)
    assert not out.exists()
    assert main(["run", "--dry-run", "--models", "gpt2", "--layers", "12"]) == 2  # gpt2 has 12 layers


def _stored_run(tmp_path: Path) -> Path:
    """A run directory holding only the config.json of `--methods dim -M dim.normalize=true` on tiny:gpt2."""
    out = tmp_path / "stored"
    out.mkdir()
    cfg = RunConfig.load(None, {"models": "tiny:gpt2", "layers": "0", "methods": "dim", "tasks": "detection",
                                "concepts": str(FIXTURE_CONCEPTS), "method": {"dim": {"normalize": "true"}}})
    (out / "config.json").write_text(json.dumps({"run_id": "stored", **cfg.to_dict()}, indent=2))
    return out


@pytest.mark.parametrize(("flags", "named"), [
    (["--methods", "snmf"], ["methods: stored ['dim'] vs given ['snmf']"]),
    (["--seed", "1", "--judge", "fake"], ["seed: stored 0 vs given 1", "judge: stored 'offline' vs given 'fake'"]),
    (["-M", "dim.normalize=false"], ["dim.normalize: stored True vs given False"]),
    (["-T", "detection.pool=mean"], ["detection.pool: stored 'max' vs given 'mean'"]),
    (["--preset", "smoke"], ["models: stored ['tiny:gpt2'] vs given"]),
    (["--out", "elsewhere"], ["out: stored"]),
])
def test_resume_refuses_flags_that_conflict_with_the_stored_config(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, flags: list[str],
        named: list[str]) -> None:
    out = _stored_run(tmp_path)
    before = {p: p.read_bytes() for p in out.rglob("*")}
    monkeypatch.setattr("bench.runner.load", lambda *a, **k: pytest.fail("resumed despite conflicting flags"))
    with caplog.at_level(logging.ERROR):
        assert main(["run", "--resume", str(out), *flags]) == 2
    (message,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert "conflict" in message and all(n in message for n in named), message
    assert {p: p.read_bytes() for p in out.rglob("*")} == before


def test_resume_accepts_flags_equal_to_the_stored_config(tmp_path: Path) -> None:
    out = _stored_run(tmp_path)
    same = ["--methods", "dim", "--layers", "0", "--seed", "0", "-M", "dim.normalize=1", "--models", "tiny:gpt2",
            "--concepts", str(FIXTURE_CONCEPTS), "-T", "detection.pool=max"]  # the default, set or not
    assert main(["run", "--resume", str(out), *same]) == 0
    assert {r["method"] for r in read_jsonl(out / "records.jsonl")} == {"dim"}


def test_flag_values_are_stored_typed(capsys: pytest.CaptureFixture[str]) -> None:
    """-T/-M values reach the run's config (what config.json stores) as their fields' types, not as the strings
    typed; a site stays a string that parses back; an alias keeps its `method`."""
    assert main(["run", "--show-config", "-T", "feature_steering.max_features=24", "-T",
                 "feature_steering.kl_targets=0.1,0.2", "-M", "snmf.n_features=64", "-M", "dim-snmf.chunk_tokens=512",
                 "--methods", "snmf,dim-snmf,dim", "-M", "dim.site=mlp_out@3"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["task"]["feature_steering"]["max_features"] == 24
    assert cfg["task"]["feature_steering"]["kl_targets"] == [0.1, 0.2]
    assert cfg["method"]["snmf"]["n_features"] == 64
    assert cfg["method"]["dim-snmf"] == {"method": "dim", "features_of": "snmf", "chunk_tokens": 512}
    assert cfg["method"]["dim"]["site"] == "mlp_out@3"
    assert RunConfig.from_dict(cfg).to_dict() == cfg
