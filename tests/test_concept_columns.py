"""Concept data in the paper's shapes: a column mapping (`--concept-columns`), `{concept: [texts]}` JSON, and a
seeded, stratified split for rows without one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.cli import main
from bench.config import RunConfig
from bench.data import ConceptData, parse_columns

CONCEPTS = {"cooking": "Simmer the onions in butter", "sport": "The striker scored a goal", "sea": "Waves hit the pier"}


def _paper_file(tmp_path: Path, n: int = 10) -> Path:
    """The reference's final_dataset_20_concepts.json shape: a JSON list of {prompt, label}, no split."""
    rows = [{"prompt": f"{text} number {i}.", "label": f" {label}"} for label, text in CONCEPTS.items()
            for i in range(n)]
    path = tmp_path / "paper.json"
    path.write_text(json.dumps(rows))
    return path


def test_a_mapped_file_without_splits_gets_a_seeded_stratified_split(tmp_path: Path) -> None:
    path = _paper_file(tmp_path)
    data = ConceptData.load(path, "text=prompt,concept=label", seed=3)
    assert data.concepts == sorted(CONCEPTS), "labels are stripped of the paper's leading spaces"
    counts = data.frame.groupby(["concept", "split"]).size().unstack()
    assert (counts[["train", "dev", "test"]] == [5, 2, 3]).all().all(), "50/20/30 within every concept"
    again = ConceptData.load(path, {"text": "prompt", "concept": "label"}, seed=3)
    assert again.frame["split"].tolist() == data.frame["split"].tolist()
    other = ConceptData.load(path, "text=prompt,concept=label", seed=4)
    assert other.frame["split"].tolist() != data.frame["split"].tolist()
    assert data.frame["text"].tolist() == [r["prompt"] for r in json.loads(path.read_text())], "file order kept"


def test_a_json_object_of_concept_lists_needs_no_mapping(tmp_path: Path) -> None:
    path = tmp_path / "languages.json"
    path.write_text(json.dumps({lang: [f"{lang} sentence {i}" for i in range(4)] for lang in ("french", "german")}))
    data = ConceptData.load(path)
    assert data.concepts == ["french", "german"] and len(data) == 8
    assert set(data.frame["split"]) <= {"train", "dev", "test"}
    assert (data.frame.groupby("concept")["split"].apply(lambda s: {"train", "test"} <= set(s))).all()


def test_a_wrong_mapping_names_the_files_columns(tmp_path: Path) -> None:
    path = _paper_file(tmp_path)
    with pytest.raises(ValueError, match=r"concept=lable: .* has no column 'lable'; its columns: prompt, label"):
        ConceptData.load(path, "text=prompt,concept=lable")
    with pytest.raises(ValueError, match=r"lacks column\(s\) text, concept; its columns: prompt, label.*"
                                         r"--concept-columns"):
        ConceptData.load(path)
    with pytest.raises(ValueError, match="expected OURS=THEIRS with OURS one of text, concept"):
        parse_columns("txt=prompt")


def test_the_cli_mapping_reaches_the_config_and_fails_before_the_model_loads(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = _paper_file(tmp_path)
    cfg = RunConfig.from_dict({"models": "tiny:gpt2", "concepts": str(path), "concept_columns": "text=prompt,"
                               "concept=label"})
    assert cfg.concept_columns == {"text": "prompt", "concept": "label"}
    assert RunConfig.from_dict(cfg.to_dict()) == cfg
    common = ["run", "--models", "tiny:gpt2", "--methods", "dim", "--tasks", "detection", "--concepts", str(path)]
    assert main([*common, "--concept-columns", "text=prompt,concept=label", "--dry-run"]) == 0
    assert main([*common, "--concept-columns", "text=prompt,concept=name", "--out", str(tmp_path / "r")]) == 2
    assert "has no column 'name'; its columns: prompt, label" in caplog.text
    assert not (tmp_path / "r").exists()
