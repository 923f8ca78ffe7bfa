"""The labeling task's labeler choice (issue #14): the CSV regenerates from labeling run directories (synthetic here,
with a bag-of-words embedder: no model), the choice rule, and the task's default labeler is the one the committed
CSV chooses."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch

from bench.judge import OfflineGrader
from bench.labeling_labeler_choice import (
    COLUMNS,
    INCUMBENT,
    OUT,
    chosen,
    compare,
    lift_difference,
    main,
    overall,
    summary,
    template_examples,
)
from tasks.labeling import Labeling

_WORD = re.compile(r"[a-z]+")
CONCEPTS = {"music": "songs melody guitar", "space": "planets stars galaxy", "food": "bread cheese soup",
            "law": "court judge lawyer", "sport": "football match goal", "weather": "rain snow storm"}


def _bag_of_words(texts: Any) -> torch.Tensor:
    vocab = sorted({w for d in CONCEPTS.values() for w in d.split()} | {"family", "members", "colours"})
    out = torch.zeros(len(texts), len(vocab) + 1)
    for i, t in enumerate(texts):
        for w in _WORD.findall(t.lower()):
            out[i, vocab.index(w) if w in vocab else len(vocab)] += 1
    return torch.nn.functional.normalize(out + 1e-6, dim=-1)


class _BagOfWords(OfflineGrader):
    def embed(self, texts: Any, batch_size: int = 64) -> torch.Tensor:  # noqa: ARG002
        return _bag_of_words(texts)


def _write(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _run(root: Path, labeler: str, good: set[str], layers: tuple[int, ...] = (3, 9)) -> Path:
    """A finished labeling run of `labeler`: per layer and method (dim, sae) one feature per concept, labelled
    with the concept's description for concepts in `good`, else with a copy of a few-shot example; two sampled
    features, one dead."""
    run = root / labeler
    run.mkdir()
    samples, records = [], []
    for layer in layers:
        for method in ("dim", "sae"):
            base = {"model": "m", "layer": layer, "method": method, "task": "labeling"}
            rows = [{"feature": i, "matched": [{"concept": c, "description": d}],
                     "label": d if c in good else "family members",
                     "output_label": d.split()[0] if c in good else "colours", "accuracy": 0.5 + 0.1 * (c in good),
                     "f1": 0.4} for i, (c, d) in enumerate(CONCEPTS.items())]
            rows += [{"feature": 10, "matched": [], "label": "colours", "output_label": "rain", "accuracy": None,
                      "f1": None},
                     {"feature": 11, "matched": [], "label": None, "output_label": "colours", "accuracy": None,
                      "f1": None}]
            samples += [{**base, "kind": "labeling", **r} for r in rows]
            for r in rows:
                for metric, key in (("label_accuracy", "accuracy"), ("label_f1", "f1")):
                    records.append({**base, "metric": metric, "value": r[key], "feature": r["feature"],
                                    "task_params": {"labeler": labeler}})
    _write(run / "samples.jsonl", samples)
    _write(run / "records.jsonl", records)
    return run


def test_the_csv_regenerates_from_run_directories(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a = _run(tmp_path, INCUMBENT, good={"music"})
    b = _run(tmp_path, "challenger", good=set(CONCEPTS) - {"law"})
    monkeypatch.setattr("bench.judge.make_judge", lambda spec, **_: _BagOfWords())
    out = tmp_path / "choice.csv"
    assert main([str(a), str(b), "--out", str(out)]) == 0
    frame = pd.read_csv(out)
    assert list(frame.columns) == COLUMNS
    again = compare([a, b], _bag_of_words, Labeling().concept_threshold)
    pd.testing.assert_frame_equal(frame.astype(str), again.astype(str))  # one command, the same CSV

    by = frame.set_index(["labeler", "layer", "method", "metric"])
    v = by["value"]
    assert v[("challenger", "3", "dim", "input_names_concept")] == pytest.approx(5 / 6, abs=1e-4)
    assert v[(INCUMBENT, "3", "dim", "input_names_concept")] == pytest.approx(1 / 6, abs=1e-4)
    assert v[("challenger", "3", "dim", "input_names_concept_baseline")] == 0  # descriptions share no word
    assert by["n"][("challenger", "3", "dim", "input_names_concept_baseline")] == 30
    assert v[(INCUMBENT, "9", "sae", "input_echo")] == 6  # five "family members" and one "colours"
    assert v[(INCUMBENT, "9", "sae", "input_labelled")] == 7 and by["n"][(INCUMBENT, "9", "sae", "input_labelled")] == 8
    assert v[(INCUMBENT, "9", "sae", "input_distinct")] == 3
    assert v[("challenger", "9", "sae", "output_echo")] == 2 and v[("challenger", "9", "sae", "output_distinct")] == 6
    assert v[("challenger", "3", "dim", "label_accuracy")] == pytest.approx((5 * 0.6 + 0.5) / 6, abs=1e-4)
    assert v[("challenger", "all", "all", "mean_lift")] == pytest.approx(5 / 6, abs=1e-4)
    assert v[("challenger", "all", "all", "lift_diff")] == pytest.approx(4 / 6, abs=1e-4)
    assert v[("challenger", "all", "all", "lift_diff_ci_low")] > 0
    assert chosen(frame) == "challenger"
    assert len(summary(frame)) == 8 and list(overall(frame)["chosen"]) == ["", "yes"]


def test_the_incumbent_stays_unless_the_challenger_is_clearly_better(tmp_path: Path) -> None:
    a = _run(tmp_path, INCUMBENT, good={"music", "space", "food"})
    same = _run(tmp_path, "same", good={"music", "space", "law"})  # as good, other concepts
    worse = _run(tmp_path, "worse", good={"music"})
    for other in (same, worse):
        frame = compare([a, other], _bag_of_words, 0.28, examples=template_examples())
        assert chosen(frame) == INCUMBENT
    with pytest.raises(ValueError, match="incumbent"):
        compare([same, worse], _bag_of_words, 0.28)


def test_lift_difference_is_paired_over_concepts() -> None:
    a = {("u", "input"): {"x": 1.0, "y": 0.0, "z": 1.0}, ("v", "input"): {"x": 1.0, "y": 1.0}}
    b = {("u", "input"): {"x": 0.0, "y": 0.0, "z": 1.0}, ("v", "input"): {"x": 0.0, "y": 1.0}}
    diff, lo, hi, n = lift_difference(a, b)
    assert n == 5 and diff == pytest.approx(2 / 5, abs=1e-4) and 0 <= lo <= diff <= hi <= 1


def test_the_default_labeler_is_the_one_the_committed_csv_chooses() -> None:
    frame = pd.read_csv(OUT)
    assert list(frame.columns) == COLUMNS
    assert {INCUMBENT, "gemma-3-270m-gguf"} <= set(frame["labeler"])
    assert Labeling().labeler == chosen(frame)
