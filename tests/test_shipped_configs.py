"""Every shipped config parses and validates offline: models, layers, methods, releases, task options."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from bench.cli import main

CONFIG_DIR = Path(__file__).parent.parent / "bench" / "configs"
CONFIGS = sorted(p.stem for p in CONFIG_DIR.glob("*.toml"))


def _toml(name: str) -> dict:
    return tomllib.loads((CONFIG_DIR / f"{name}.toml").read_text())


@pytest.mark.parametrize("name", CONFIGS)
def test_shipped_config_dry_runs_offline(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--preset", name, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "pending" in out and "forward_tflop" in out


def test_paper_configs_name_the_papers_settings() -> None:
    expected = {"default", "concepts", "smoke", "paper", "paper-gpt2", "paper-gemma2", "paper-llama31",
                "axbench-gemma2"}
    assert expected <= set(CONFIGS)


@pytest.mark.parametrize("name", ["paper-gpt2", "paper-gemma2", "paper-llama31"])
def test_paper_presets_run_the_feature_centric_protocol_with_the_references_settings(name: str) -> None:
    cfg = _toml(name)
    assert cfg["tasks"] == ["feature_labels", "feature_steering", "feature_detection"] and cfg["seed"] == 42
    steer = cfg["task"]["feature_steering"]
    assert steer["kl_targets"] == [0.025, 0.05, 0.1, 0.15, 0.25, 0.35, 0.5] and steer["prompts"] == ["I think that"]
    assert (steer["n_samples"], steer["max_new_tokens"], steer["top_k"], steer["temperature"]) == (8, 50, 30, 1.0)
    assert {k: cfg["method"]["snmf"][k] for k in ("max_iter", "patience", "tol_mode")} == {
        "max_iter": 2000, "patience": 1500, "tol_mode": "absolute"}
    dim = cfg["method"]["dim-snmf"]
    assert dim["site"] == "mlp_out" and dim["features_of"] == "snmf" and dim["method"] == "dim"
    assert cfg["method"]["sae"]["release"] and cfg["method"]["sae-act"]["d_sae"] == cfg["method"]["snmf"]["n_features"]
    labels = cfg["task"]["feature_labels"]
    assert (labels["n_top"], labels["window"], labels["n_show"], labels["n_vocab"], labels["n_vocab_show"]) == (
        25, 15, 10, 75, 25)
    assert cfg["task"]["feature_detection"]["n_sentences"] == 5


def test_the_default_runs_the_papers_protocol_and_the_concepts_preset_axbenchs() -> None:
    assert _toml("default")["tasks"] == ["feature_labels", "feature_steering", "feature_detection"]
    assert _toml("concepts")["tasks"] == ["detection", "steering", "labeling"]
