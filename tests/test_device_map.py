"""`--device-map`: a model placed by accelerate as it loads gives the records of the plain run; hooks, collection and
direct module calls work through accelerate's device hooks; bad maps are refused before the model loads."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from bench.cli import _stored_config, main
from bench.config import RunConfig
from bench.feature_evidence import vocab_lists
from bench.features import steering_target, vocab_projection
from bench.hooks import read, steer
from bench.models import load
from bench.results import read_jsonl
from bench.sites import Site
from tests.conftest import FIXTURE_CONCEPTS
from tests.test_bad_input import _argv, _no_model_load, _refused

accelerate = pytest.importorskip("accelerate")
VOLATILE = ("run_id", "value_seconds")  # differ between any two runs


def _records(out: Path) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in read_jsonl(out / "records.jsonl")
            if not r["metric"].endswith("seconds")]


def test_a_device_map_gives_the_records_of_the_plain_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Collection, steering (generation and KL calibration) and the vocabulary projections of feature labels on a
    model loaded through accelerate (`auto` on this machine, or an explicit map) equal the plain run's."""
    args = ["run", "--models", "tiny:gemma2", "--layers", "1", "--methods", "dim", "--tasks",
            "detection,steering,feature_steering", "--concepts", str(FIXTURE_CONCEPTS), "--judge", "fake",
            "-T", "steering.max_new_tokens=4", "-T", "steering.n_dev=1", "-T", "steering.n_test=2",
            "-T", "steering.factors=1,4", "-T", "feature_steering.max_features=2",
            "-T", "feature_steering.kl_targets=0.002", "-T", "feature_steering.n_samples=1",
            "-T", "feature_steering.max_new_tokens=4"]
    runs = {"plain": [], "auto": ["--device-map", "auto"], "table": ["--device-map", '{"": "cpu"}']}
    for name, extra in runs.items():
        monkeypatch.setenv("FEATBENCH_CACHE", str(tmp_path / f"cache-{name}"))  # collect afresh each time
        assert main([*args, *extra, "--out", str(tmp_path / name)]) == 0
    plain = _records(tmp_path / "plain")
    assert {r["task"] for r in plain} >= {"detection", "steering", "feature_steering"}
    for name in ("auto", "table"):
        assert _records(tmp_path / name) == plain, name
    assert _stored_config(tmp_path / "table").device_map == {"": "cpu"}  # what a resume reads back


def _per_layer_map(model: torch.nn.Module) -> dict[str, str]:
    """Every top-level child of the decoder (each layer its own entry) and the head, all on the CPU."""
    base = model.base_model_prefix
    inner = getattr(model, base)
    out = {f"{base}.{name}": "cpu" for name, _ in inner.named_children() if name not in ("layers", "h")}
    layers = getattr(inner, "layers", None) or inner.h
    out |= {f"{base}.{'layers' if hasattr(inner, 'layers') else 'h'}.{i}": "cpu" for i in range(len(layers))}
    return out | {name: "cpu" for name, _ in model.named_children() if name != base}


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gemma2"])
def test_hooks_and_direct_module_calls_work_through_accelerate_hooks(arch: str) -> None:
    """A model dispatched by accelerate with a hook on every layer (force_hooks: the hooks a multi-device map adds)
    reads, steers, stops early and projects directions exactly as the plain model."""
    from accelerate import dispatch_model

    plain, tok, _ = load(f"tiny:{arch}")
    placed, _, _ = load(f"tiny:{arch}", device_map={"": "cpu"})
    placed = dispatch_model(placed, _per_layer_map(placed), main_device="cpu", force_hooks=True)
    assert hasattr(placed.get_submodule(f"{placed.base_model_prefix}"), "_hf_hook") or any(
        hasattr(m, "_hf_hook") for m in placed.modules()), "accelerate attached no hooks"
    batch = dict(tok(["the cat sat on the mat", "a dog ran"], return_tensors="pt", padding=True))
    sites = [Site(0, "mlp"), Site(1, "resid"), Site(1, "mlp_out")]
    want, got = read(plain, batch, sites), read(placed, batch, sites)
    for s in sites:
        assert torch.equal(want[s], got[s]), s
    g = torch.Generator().manual_seed(0)
    for site in sites:
        vec = torch.randn(want[site].shape[-1], generator=g)
        with steer(plain, site, vec), torch.no_grad():
            a = plain(**batch).logits
        with steer(placed, site, vec), torch.no_grad():
            b = placed(**batch).logits
        assert torch.equal(a, b), site
    dirs = torch.randn(3, want[Site(0, "mlp")].shape[-1], generator=g)
    for fn in (vocab_projection, vocab_lists):
        for x, y in zip(fn(plain, Site(0, "mlp"), dirs, 5), fn(placed, Site(0, "mlp"), dirs, 5), strict=True):
            assert torch.equal(x, y), fn.__name__
    ta, tb = steering_target(plain, Site(0, "mlp"), dirs), steering_target(placed, Site(0, "mlp"), dirs)
    assert ta[0] == tb[0] and torch.equal(ta[1], tb[1])


def test_a_device_map_table_in_toml_and_none_on_the_command_line() -> None:
    assert RunConfig.from_dict({"device_map": {"": "cpu", "lm_head": 0}}).device_map == {"": "cpu", "lm_head": 0}
    table = RunConfig.from_dict({"device_map": '{"model.layers.0": "cuda:1"}'}).device_map  # --device-map JSON
    assert table == {"model.layers.0": "cuda:1"}
    assert RunConfig.from_dict({"device_map": "none"}).device_map is None
    assert RunConfig.from_dict({"device_map": "balanced_low_0"}).device_map == "balanced_low_0"


BAD = {
    "strategy": ("autox", ["device_map 'autox'", "auto, balanced, balanced_low_0, sequential"]),
    "json": ("{not json", ["device_map '{not json'", "not a JSON object"]),
    "empty-table": ("{}", ["device_map {}", "a table {module: device}"]),
    "bad-device": ('{"": "gpu"}', ["device_map {'': 'gpu'}", "cuda:<i>"]),
    "negative-index": ('{"": -1}', ["device_map {'': -1}", "GPU index"]),
    "absent-gpu": ('{"": 7}', ["'cuda:7'", "--device-map"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_device_map_is_refused_before_the_model_loads(case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            caplog: pytest.LogCaptureFixture,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    value, words = BAD[case]
    if case == "absent-gpu" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    _no_model_load(monkeypatch)
    message = _refused(_argv({"--device-map": value}, tmp_path / "run"), caplog, capsys)
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"
    assert not (tmp_path / "run").exists()


def test_a_device_map_without_accelerate_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          caplog: pytest.LogCaptureFixture,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "accelerate", None)
    _no_model_load(monkeypatch)
    message = _refused(_argv({"--device-map": "auto"}, tmp_path / "run"), caplog, capsys)
    assert "--device-map needs accelerate" in message and "featbench[device-map]" in message
