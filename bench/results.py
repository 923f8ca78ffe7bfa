"""Scores, records on disk (append-only JSON lines) and loading them into one pandas frame."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd

log = logging.getLogger(__name__)
RECORD_FIELDS = (
    "run_id", "model", "model_source", "layer", "site", "method", "params", "task", "task_params", "judge", "fit_key",
    "metric", "value", "concept", "split", "seed", "feature", "factor", "sign", "kl_target",
)
REQUIRED_FIELDS = ("model", "layer", "method", "task", "metric", "value", "split")  # a line without one is skipped


@dataclass(frozen=True)
class Score:
    """One number a task produced. `value=None` means unscored (e.g. the judge gave no parseable rating)."""

    metric: str
    value: float | None
    concept: str | None = None
    split: str = "test"
    feature: int | None = None
    factor: float | None = None  # the point of a sweep this number belongs to (e.g. steering factor)
    sign: int | None = None  # +1 / -1: the direction a feature was steered in (feature-centric steering)
    kl_target: float | None = None  # the KL target (nats) its steering strength was calibrated to


def append_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    """Append rows to a JSON-lines file and fsync, so a crash loses at most the line being written."""
    lines = "".join(json.dumps(r, default=str, sort_keys=True) + "\n" for r in rows)
    if not lines:
        return
    with open(path, "a", encoding="utf-8") as f:
        f.write(lines)
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSON-lines file; a torn last line (from a crash mid-write) and any line that is not a JSON
    object (`null`, garbage) are ignored."""
    return parse_jsonl(path)[0]


def parse_jsonl(path: Path) -> tuple[list[dict[str, Any]], int]:
    """(rows, number of skipped lines) of a JSON-lines file: blank lines are not counted, a line that is not a
    JSON object is skipped and counted. A missing file gives ([], 0)."""
    if not path.exists():
        return [], 0
    rows, skipped = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if isinstance(row, dict):
            rows.append(row)
        else:
            skipped += 1
    return rows, skipped


def to_record(score: Score, **provenance: Any) -> dict[str, Any]:
    """A record: the score's fields plus run provenance (run_id, model, layer, site, method, params, task, seed)."""
    rec = {**provenance, **asdict(score)}
    if rec.get("value") is not None:
        rec["value"] = float(rec["value"])
    return rec


def unique_dirs(dirs: Iterable[str | Path]) -> list[Path]:
    """The run directories in the order given, each once (the same directory named twice is read once)."""
    seen: dict[Path, Path] = {}
    for d in dirs:
        seen.setdefault(Path(d).resolve(), Path(d))
    return list(seen.values())


def load(dirs: Iterable[str | Path]) -> pd.DataFrame:
    """All records of the given run directories as one frame (one row per number), with every column of
    RECORD_FIELDS (missing fields of old records are empty: None, or {} for params and task_params).

    Each directory is read once however often it is named. Lines that are not records (`null`, malformed or
    torn JSON, objects without the required fields) are skipped; a directory without records.jsonl is skipped
    when another has one, and a FileNotFoundError when none has. What was skipped is logged as one warning.
    """
    given = list(dirs)
    unique = unique_dirs(given)
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    missing: list[str] = []
    if len(unique) < len(given):
        notes.append(f"{len(given) - len(unique)} repeated run directory name(s), each read once")
    for d in unique:
        path = d / "records.jsonl"
        if not path.is_file():
            missing.append(str(d))
            continue
        found, skipped = parse_jsonl(path)
        valid = [r for r in found if _is_record(r)]
        if skipped + len(found) - len(valid):
            notes.append(f"{skipped + len(found) - len(valid)} malformed line(s) in {path}")
        rows.extend(valid)
    if missing and len(missing) == len(unique):
        raise FileNotFoundError(f"no records.jsonl in {', '.join(missing)}; is it a featbench run directory?")
    if missing:
        notes.append(f"no records.jsonl in {', '.join(missing)}")
    if notes:
        log.warning("skipped: %s", "; ".join(notes))
    return normalize(pd.DataFrame(rows))


def _is_record(row: dict[str, Any]) -> bool:
    value = row.get("value")
    return all(k in row for k in REQUIRED_FIELDS) and (value is None or isinstance(value, int | float))


def normalize(frame: pd.DataFrame) -> pd.DataFrame:
    """The frame with every record field as a column: missing fields (old records, hand-made frames) are
    None, and params / task_params are dicts ({} when missing)."""
    frame = frame.copy()
    for field in RECORD_FIELDS:
        if field not in frame:
            frame[field] = None
    for field in ("params", "task_params"):
        frame[field] = [v if isinstance(v, dict) else {} for v in frame[field]]
    return frame
