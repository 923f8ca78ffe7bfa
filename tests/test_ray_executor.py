"""`bench run --executor ray` on a local Ray cluster (two CPU workers) writes the records, samples and done markers
of the local executor, in the same order (timings aside); a run resumed under Ray after a crash finishes the same."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bench.cli import main
from bench.results import read_jsonl
from tests.conftest import FIXTURE_CONCEPTS

ray = pytest.importorskip("ray")

ARGS = ["--models", "tiny:gpt2", "--layers", "0,1", "--methods", "snmf,sae,dim",
        "--tasks", "feature_labels,feature_steering,feature_detection", "-M", "snmf.n_features=6",
        "-M", "snmf.max_iter=20", "-M", "sae.d_sae=8", "-M", "sae.k=2", "-M", "sae.n_steps=20",
        "-M", "dim.features_of=snmf", "-T", "feature_labels.max_features=2", "-T", "feature_steering.max_features=2",
        "-T", "feature_detection.max_features=2", "-T", "feature_detection.n_sentences=2",
        "-T", "feature_steering.kl_targets=0.002", "-T", "feature_steering.kl_tolerance=0.001",
        "-T", "feature_steering.n_samples=1", "-T", "feature_steering.max_new_tokens=4",
        "--concepts", str(FIXTURE_CONCEPTS), "--judge", "fake"]


def _rows(out: Path) -> dict[str, list[dict[str, Any]]]:
    """The run's files without what differs between two runs of one config: run id, timings."""
    records = [{k: v for k, v in r.items() if k != "run_id"} for r in read_jsonl(out / "records.jsonl")]
    for r in records:
        if r["metric"].endswith("_seconds"):  # fit_seconds, sae's train_seconds
            r["value"] = None
    units = [{k: v for k, v in u.items() if k != "seconds"} for u in read_jsonl(out / "units.jsonl")]
    return {"records": records, "samples": read_jsonl(out / "samples.jsonl"), "units": units}


@pytest.fixture(scope="module")
def cluster() -> Any:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("local") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FEATBENCH_CACHE", str(out.parent / "cache"))
        assert main(["run", *ARGS, "--out", str(out)]) == 0
    return out


def test_ray_writes_the_local_runs_rows(cluster: Any, local: Path, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEATBENCH_CACHE", str(tmp_path / "cache"))  # nothing computed by the local run is reused
    out = tmp_path / "ray"
    assert main(["run", *ARGS, "--executor", "ray", "--out", str(out)]) == 0
    got, want = _rows(out), _rows(local)
    assert len(want["units"]) == 2 * 3 * 4
    for name in ("units", "records", "samples"):
        assert got[name] == want[name], name


def test_a_crashed_run_resumes_under_ray(cluster: Any, local: Path, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEATBENCH_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "crashed"
    assert main(["run", *ARGS, "--out", str(out)]) == 0
    units = (out / "units.jsonl").read_text().splitlines(keepends=True)
    (out / "units.jsonl").write_text("".join(units[:5]))  # the driver died after 5 done markers
    assert main(["run", "--resume", str(out), "--executor", "ray", "--workers", "2"]) == 0
    got, want = _rows(out), _rows(local)
    for rows in (got, want):  # units redone after the crash load their fits from the cache
        rows["units"] = [{k: v for k, v in u.items() if k != "fit_cached"} for u in rows["units"]]
    assert got == want
