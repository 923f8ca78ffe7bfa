"""Exact resume: fits loaded, not refitted; torn last lines cut; one env.json entry per start; record fields."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from bench.cli import main
from bench.config import RunConfig
from bench.results import read_jsonl
from bench.runner import make_task
from tests.conftest import FIXTURE_CONCEPTS

RUN_FILES = ("units.jsonl", "records.jsonl", "samples.jsonl")


def _args(out: Path, methods: str = "dim", tasks: str = "detection", *extra: str) -> list[str]:
    return ["run", "--models", "tiny:gpt2", "--layers", "0", "--methods", methods, "--tasks", tasks,
            "--concepts", str(FIXTURE_CONCEPTS), "--out", str(out), *extra]


def _strip(records: list[dict]) -> list[str]:
    keep = [{k: v for k, v in r.items() if k != "run_id"} for r in records if not r["metric"].endswith("seconds")]
    return sorted(json.dumps(r, sort_keys=True) for r in keep)


def _units(out: Path) -> list[str]:
    return [u["unit"] for u in read_jsonl(out / "units.jsonl")]


def test_resume_loads_every_fit_instead_of_refitting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "r"
    assert main(_args(out, "dim,snmf", "detection", "-M", "snmf.n_features=4", "-M", "snmf.max_iter=5")) == 0
    records = read_jsonl(out / "records.jsonl")
    keys = {(r["method"], r["task"]): r["fit_key"] for r in records}
    assert keys[("dim", "fit")] == keys[("dim", "detection")] != keys[("snmf", "fit")] == keys[("snmf", "detection")]
    units = (out / "units.jsonl").read_text().splitlines(keepends=True)
    (out / "units.jsonl").write_text("".join(u for u in units if "detection" not in u))  # detection to redo
    from methods.dim import DiffInMeans
    from methods.snmf import SNMF

    for cls in (DiffInMeans, SNMF):
        monkeypatch.setattr(cls, "fit", lambda *_: pytest.fail("a resumed run must load its fit, not refit"))
    assert main(["run", "--resume", str(out)]) == 0
    again = read_jsonl(out / "records.jsonl")
    assert _strip(again) == _strip(records)
    assert {(r["method"], r["task"]): r["fit_key"] for r in again} == keys
    redone = [u for u in read_jsonl(out / "units.jsonl") if "detection" in u["unit"]]
    assert len(redone) == 2 and all(u["fit_cached"] for u in redone)
    assert read_jsonl(out / "units.jsonl")[0]["fit_cached"] is False
    assert json.loads((out / "env.json").read_text())["starts"][-1]["fits"] == {"fitted": 0, "loaded": 2}
    monkeypatch.undo()
    other = tmp_path / "other"
    assert main(_args(other, "dim", "detection", "-M", "dim.normalize=false")) == 0
    assert {r["fit_key"] for r in read_jsonl(other / "records.jsonl")}.isdisjoint(keys.values())


def _tear(out: Path, name: str) -> None:
    """Leave the run as a kill while appending to `name` for its last unit (detection) would."""
    units = (out / "units.jsonl").read_text().splitlines(keepends=True)
    assert "detection" in units[-1]
    (out / "units.jsonl").write_text("".join(units[:-1]))
    records = (out / "records.jsonl").read_text().splitlines(keepends=True)
    fit_records = [r for r in records if '"task": "fit"' in r]
    if name == "units.jsonl":  # records written, done marker torn
        with open(out / "units.jsonl", "a") as f:
            f.write(units[-1][: len(units[-1]) // 2])
    elif name == "records.jsonl":  # some records written, the last one torn
        text = "".join(records)
        (out / "records.jsonl").write_text(text[: len(text) - len(records[-1]) // 2])
    else:  # samples torn before any of the unit's records
        (out / "records.jsonl").write_text("".join(fit_records))
        done = {"model": "tiny:gpt2", "layer": 0, "method": "dim", "task": "fit", "kind": "note"}
        torn = json.dumps({**done, "task": "detection"})
        (out / "samples.jsonl").write_text(json.dumps(done) + "\n" + torn[: len(torn) // 2])


@pytest.mark.parametrize("name", RUN_FILES)
def test_a_torn_last_line_is_cut_on_resume_not_glued_to(tmp_path: Path, name: str) -> None:
    out = tmp_path / "r"
    assert main(_args(out)) == 0
    records, units = read_jsonl(out / "records.jsonl"), _units(out)
    _tear(out, name)
    assert main(["run", "--resume", str(out)]) == 0
    for f in RUN_FILES:
        text = (out / f).read_text() if (out / f).exists() else ""
        assert text == "" or text.endswith("\n"), f
        assert all(json.loads(line) for line in text.splitlines()), f"{f} holds a glued or torn line"
    assert _units(out) == units
    assert _strip(read_jsonl(out / "records.jsonl")) == _strip(records)
    if name == "samples.jsonl":
        assert [r["task"] for r in read_jsonl(out / "samples.jsonl")] == ["fit"]


def test_env_json_keeps_one_entry_per_start(tmp_path: Path) -> None:
    out = tmp_path / "r"
    assert main(_args(out)) == 0
    units = (out / "units.jsonl").read_text().splitlines(keepends=True)
    (out / "units.jsonl").write_text(units[0])
    assert main(["run", "--resume", str(out)]) == 0
    starts = json.loads((out / "env.json").read_text())["starts"]
    assert [s["resume"] for s in starts] == [False, True] and [s["units"] for s in starts] == [2, 1]
    for s in starts:
        assert {"featbench_commit", "dirty", "started", "ended", "seconds", "host", "pid", "device", "versions",
                "models", "status", "cpu_seconds", "cpu_count", "load_avg_start", "load_avg_end"} <= set(s)
        assert s["status"] == "finished" and s["ended"] >= s["started"] and 0 < s["seconds"] < 600
        assert s["cpu_seconds"] > 0 and len(s["load_avg_start"]) == len(s["load_avg_end"]) == 3
        assert s["models"]["tiny:gpt2"]["revision"].startswith("tiny-")
        assert s["fast_linear"] is True and s["threads"] >= 1  # the float-rounding settings of the run
    assert starts[0]["started"] <= starts[1]["started"]


def test_a_failed_start_is_recorded_with_its_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "r"
    monkeypatch.setattr("methods.dim.DiffInMeans.fit", lambda *_: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError):
        main(_args(out))
    (start,) = json.loads((out / "env.json").read_text())["starts"]
    assert start["status"] == "error: RuntimeError: boom" and start["seconds"] >= 0
    monkeypatch.undo()
    assert main(["run", "--resume", str(out)]) == 0, "the failed start released the run directory's lock"


def test_every_record_carries_task_params_judge_fit_key_and_model_source(tmp_path: Path) -> None:
    out = tmp_path / "r"
    tiny_steering = ["-T", "steering.max_new_tokens=3", "-T", "steering.n_dev=1", "-T", "steering.n_test=1",
                     "-T", "steering.factors=1", "-T", "detection.pool=mean", "--judge", "fake"]
    assert main(_args(out, "dim", "detection,steering", *tiny_steering)) == 0
    records = read_jsonl(out / "records.jsonl")
    cfg = RunConfig.from_dict({k: v for k, v in json.loads((out / "config.json").read_text()).items()
                               if k != "run_id"})
    for task in ("fit", "detection", "steering"):
        recs = [r for r in records if r["task"] == task]
        assert recs, task
        want = {} if task == "fit" else json.loads(json.dumps(dataclasses.asdict(make_task(task, cfg)), default=str))
        assert all(r["task_params"] == want for r in recs), task
        assert {r["judge"] for r in recs} == ({"fake"} if task == "steering" else {None}), task
    assert {r["task_params"]["pool"] for r in records if r["task"] == "detection"} == {"mean"}
    assert len({r["fit_key"] for r in records}) == 1 and len(records[0]["fit_key"]) == 24
    assert {r["model_source"] for r in records} == {f"tiny:gpt2@{records[0]['model_source'].split('@')[1]}"}
