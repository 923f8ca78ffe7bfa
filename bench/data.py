"""Concept datasets, steering instructions and neutral text, loaded with the `datasets` library."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from importlib.resources import files
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import Tensor

log = logging.getLogger(__name__)
REQUIRED = ("text", "concept", "split")
SPLITS = ("train", "dev", "test")
COLUMNS = (*REQUIRED, "description", "hard_negative_for")  # what --concept-columns may map
SPLIT_SHARES = (0.5, 0.2, 0.3)  # train/dev/test of rows without a split: the shipped data's proportions
_WARNED: set[tuple[str, int]] = set()  # (concept data, dropped rows) already warned about
_LOADERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def package_data(name: str) -> Path:
    """Path of a file shipped in `bench/data/`."""
    return Path(str(files("bench").joinpath("data", name)))


def fingerprint(texts: list[str]) -> str:
    """Content hash of an ordered list of texts."""
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()[:16]


def _read(spec: str | Path) -> pd.DataFrame:
    """A local JSONL/CSV/parquet file or a hub dataset name -> one frame (hub splits become a column)."""
    import datasets

    path = Path(spec)
    if path.exists():
        return _read_local(path)
    if path.suffix in _LOADERS:  # a hub dataset name never ends in .jsonl/.csv/...
        raise FileNotFoundError(f"{path} does not exist (a data file: {', '.join(_LOADERS)}; or a hub dataset name)")
    try:
        dd = datasets.load_dataset(str(spec))
    except Exception as e:  # noqa: BLE001 - the hub raises many kinds; the message is what matters
        raise ValueError(f"{spec!r} is neither a local file nor a loadable hub dataset: {_first_line(e)}") from e
    frames = []
    for split_name, ds in dd.items():
        frame = ds.to_pandas()
        if "split" not in frame:
            frame["split"] = {"validation": "dev"}.get(split_name, split_name)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def _read_local(path: Path) -> pd.DataFrame:
    """One local file as a frame; an empty, non-UTF-8 or malformed file is a ValueError naming the line."""
    import datasets

    loader = _LOADERS.get(path.suffix)
    if loader is None or path.is_dir():
        raise ValueError(f"cannot read {path}: use a file ending in one of {', '.join(_LOADERS)}")
    raw = path.read_bytes()
    if not raw.strip():
        raise ValueError(f"{path} is empty; it needs rows with columns {', '.join(REQUIRED)}")
    if path.suffix == ".json" and raw.lstrip().startswith(b"{"):
        return _read_grouped(path, raw)
    if loader != "parquet":
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as e:
            line = raw[: e.start].count(b"\n") + 1
            raise ValueError(f"{path} line {line} is not UTF-8 (byte 0x{raw[e.start]:02x}); "
                             "re-save the file as UTF-8") from None
        problem = _diagnose(raw, path.suffix)
        if problem:
            raise ValueError(f"cannot read {path}: {problem}")
    try:
        return datasets.load_dataset(loader, data_files=str(path), split="train").to_pandas()
    except Exception as e:  # noqa: BLE001 - pyarrow, datasets and csv raise many kinds; the message is what matters
        raise ValueError(f"cannot read {path} as {loader}: {_first_line(e)}") from e


def _read_grouped(path: Path, raw: bytes) -> pd.DataFrame:
    """A JSON object `{concept: [text, ...]}` (the paper's hier_concepts.json and languages.json) as rows of
    `text` and `concept`, in file order."""
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path} as JSON: {e}") from None
    bad = [k for k, v in data.items() if not (isinstance(v, list) and all(isinstance(t, str) for t in v))]
    if bad:
        raise ValueError(f"cannot read {path}: a JSON object must map each concept to a list of texts; "
                         f"{bad[0]!r} does not (or give a list of rows)")
    return pd.DataFrame([{"text": t, "concept": k} for k, texts in data.items() for t in texts],
                        columns=["text", "concept"])


def parse_columns(spec: str | Mapping[str, str] | None) -> dict[str, str]:
    """`"text=prompt,concept=label"` (or a mapping) -> {"text": "prompt", "concept": "label"}: which column of
    the data file each of featbench's columns comes from; ValueError naming a bad entry."""
    if not spec:
        return {}
    pairs = (spec.items() if isinstance(spec, Mapping)
             else [item.partition("=")[::2] for item in str(spec).split(",") if item.strip()])
    out: dict[str, str] = {}
    for ours, theirs in pairs:
        ours, theirs = str(ours).strip(), str(theirs).strip()
        if ours not in COLUMNS or not theirs:
            raise ValueError(f"bad concept column mapping {ours}={theirs}: expected OURS=THEIRS with OURS one of "
                             f"{', '.join(COLUMNS)}, e.g. --concept-columns text=prompt,concept=label")
        out[ours] = theirs
    return out


def _mapped(frame: pd.DataFrame, columns: Mapping[str, str], spec: str) -> pd.DataFrame:
    """`frame` with featbench's columns taken from the file's columns named in `columns`."""
    absent = {ours: theirs for ours, theirs in columns.items() if theirs not in frame.columns}
    if absent:
        wrong = ", ".join(f"{o}={t}" for o, t in absent.items())
        raise ValueError(f"--concept-columns {wrong}: {spec} has no column {', '.join(map(repr, absent.values()))}; "
                         f"its columns: {', '.join(map(str, frame.columns))}")
    picked = {ours: frame[theirs] for ours, theirs in columns.items()}
    return frame.drop(columns=[c for c in picked if c in frame.columns]).assign(**picked)


def assign_splits(frame: pd.DataFrame, seed: int) -> pd.DataFrame:
    """A seeded split stratified by concept, in the shipped data's proportions (SPLIT_SHARES train/dev/test):
    per concept (and among the rows without one) a seeded shuffle, then round(0.5 n) train, round(0.2 n) dev and
    the rest test, with at least one train and one test row when a concept has two or more."""
    rng = np.random.default_rng(seed)
    split = pd.Series("", index=frame.index, dtype=object)
    concept = frame["concept"].fillna("").astype(str)
    for name in sorted(concept.unique()):
        rows = rng.permutation(frame.index[concept == name].to_numpy())
        n = len(rows)
        n_train = max(1, round(SPLIT_SHARES[0] * n))
        n_dev = round(SPLIT_SHARES[1] * n)
        if n >= 2:
            n_train = min(n_train, n - 1)
            n_dev = min(n_dev, n - 1 - n_train)
        split[rows[:n_train]] = "train"
        split[rows[n_train : n_train + n_dev]] = "dev"
        split[rows[n_train + n_dev :]] = "test"
    return frame.assign(split=split)


def _diagnose(raw: bytes, suffix: str) -> str | None:
    """What is wrong with a UTF-8 text file before `datasets` reads it: a CSV header without rows, or the first
    line of a JSONL file that is not a JSON object."""
    lines = raw.decode("utf-8").splitlines()
    if suffix == ".csv" and sum(1 for line in lines if line.strip()) <= 1:
        return "it has a header but no rows"
    if suffix == ".jsonl":
        for i, line in enumerate(lines, 1):
            try:
                if line.strip() and not isinstance(json.loads(line), dict):
                    return f"line {i} is not a JSON object"
            except json.JSONDecodeError as e:
                return f"line {i} is not valid JSON ({e.msg}); one JSON object per line"
    return None


def _first_line(e: BaseException) -> str:
    cause = e.__cause__ or e.__context__
    text = str(e).strip() or (str(cause).strip() if cause else "") or type(e).__name__
    return text.splitlines()[0]


@dataclass
class ConceptData:
    """Rows of `text`, `concept` (empty for a pure hard negative), `split` (train/dev/test), `description`,
    `hard_negative_for`; extra columns are kept."""

    frame: pd.DataFrame
    name: str = "concepts"

    @classmethod
    def load(cls, spec: str | Path | None = None, columns: Mapping[str, str] | str | None = None,
             seed: int = 0) -> ConceptData:
        """The shipped concept data (`spec=None`), a local file, or a hub dataset name.

        `columns` maps featbench's columns to the file's (`{"text": "prompt", "concept": "label"}`, as
        `--concept-columns text=prompt,concept=label`); a JSON object `{concept: [texts]}` needs none. Data
        without a `split` column gets a seeded split stratified by concept (`assign_splits`, from `seed`)."""
        spec = spec or package_data("concepts.jsonl")
        frame = _mapped(_read(spec), parse_columns(columns), str(spec))
        missing = [c for c in REQUIRED if c not in frame.columns and c != "split"]
        if missing:
            raise ValueError(
                f"concept data {spec} lacks column(s) {', '.join(missing)}; its columns: "
                f"{', '.join(map(str, frame.columns))}; needs {', '.join(REQUIRED[:2])} (optional: split, "
                "description, hard_negative_for); map yours with --concept-columns, e.g. text=prompt,concept=label"
            )
        if "split" not in frame.columns:
            frame = assign_splits(frame, seed)
            log.info("concept data %s has no split column: assigned a split stratified by concept, %s "
                     "train/dev/test (seed %d)", spec, "/".join(f"{s:.0%}" for s in SPLIT_SHARES), seed)
        frame = _checked(frame.copy(), str(spec))
        frame["description"] = frame["description"].where(frame["description"] != "", frame["concept"])
        return cls(frame.reset_index(drop=True), name=Path(str(spec)).stem)

    def require_splits(self, splits: list[str], why: str) -> None:
        """ValueError unless every split in `splits` has rows (`why` says who reads them)."""
        for name in splits:
            if not (self.frame["split"] == name).any():
                raise ValueError(f"the {name} split of the concept data {self.name} has no rows, but {why} reads "
                                 f"it; add {name} rows (column split = {name!r})")

    def split(self, name: str) -> ConceptData:
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; valid: {', '.join(SPLITS)}")
        return ConceptData(self.frame[self.frame["split"] == name].reset_index(drop=True), self.name)

    def restrict(self, concepts: list[str]) -> ConceptData:
        """Only positives and hard negatives of `concepts`."""
        unknown = sorted(set(concepts) - set(self.concepts))
        if unknown:
            raise ValueError(f"unknown concept(s) {unknown}; known: {', '.join(self.concepts)}")
        keep = self.frame["concept"].isin(concepts) | self.frame["hard_negative_for"].isin(concepts)
        return ConceptData(self.frame[keep].reset_index(drop=True), self.name)

    @cached_property
    def concepts(self) -> list[str]:
        return sorted(c for c in self.frame["concept"].unique() if c)

    @property
    def texts(self) -> list[str]:
        return self.frame["text"].tolist()

    @cached_property
    def descriptions(self) -> dict[str, str]:
        pos = self.frame[self.frame["concept"] != ""]
        return dict(zip(pos["concept"], pos["description"], strict=True))

    def labels(self) -> Tensor:
        """[n_rows, n_concepts] bool: row i is a positive of concept j."""
        concept = self.frame["concept"].to_numpy()
        return torch.tensor([[c == k for k in self.concepts] for c in concept], dtype=torch.bool).reshape(
            len(concept), len(self.concepts)
        )

    def __len__(self) -> int:
        return len(self.frame)


def _rows(mask: pd.Series) -> str:
    """The 1-based row numbers where `mask` holds, the first five."""
    rows = [str(i + 1) for i in mask.to_numpy().nonzero()[0]]
    return ", ".join(rows[:5]) + (f" and {len(rows) - 5} more" if len(rows) > 5 else "")


def _checked(frame: pd.DataFrame, spec: str) -> pd.DataFrame:
    """`frame` with typed columns and empty texts dropped (with a warning), or a ValueError that names the rows or
    concept to fix: no rows, null texts or splits, unknown splits, a concept without train or test rows."""
    if frame.empty:
        raise ValueError(f"concept data {spec} has no rows; it needs rows with columns {', '.join(REQUIRED)}")
    for col in ("text", "split"):
        null = frame[col].isna()
        if null.any():
            raise ValueError(f"concept data {spec}: row(s) {_rows(null)} have no {col} (null/NaN); give every row a "
                             f"{col} or delete the row")
    frame["text"] = frame["text"].astype(str)
    frame["split"] = frame["split"].astype(str)
    bad = sorted(set(frame["split"]) - set(SPLITS))
    if bad:
        raise ValueError(f"unknown split(s) {bad} in concept data {spec} (row(s) "
                         f"{_rows(~frame['split'].isin(SPLITS))}); valid: {', '.join(SPLITS)}")
    blank = frame["text"].str.strip() == ""
    if blank.any() and (spec, int(blank.sum())) not in _WARNED:  # once per file, though runs load it twice
        _WARNED.add((spec, int(blank.sum())))
        log.warning("concept data %s: dropped %d row(s) with an empty or whitespace-only text (rows %s)", spec,
                    int(blank.sum()), _rows(blank))
    frame = frame[~blank].reset_index(drop=True)
    for col in ("concept", "hard_negative_for", "description"):
        if col not in frame:
            frame[col] = ""
        frame[col] = frame[col].fillna("").astype(str).str.strip()  # the paper's labels carry leading spaces
    counts = frame[frame["concept"] != ""].groupby(["concept", "split"]).size().unstack(fill_value=0)
    if counts.empty:
        raise ValueError(f"concept data {spec} names no concept (every row's concept is empty); give the positive "
                         "rows a concept")
    counts = counts.reindex(columns=list(SPLITS), fill_value=0)
    for concept, row in counts.iterrows():
        lacking = [s for s in ("train", "test") if row[s] == 0]
        if lacking:
            have = ", ".join(f"{int(row[s])} {s}" for s in SPLITS)
            raise ValueError(f"concept {concept!r} of {spec} has no {' and no '.join(lacking)} rows ({have}); every "
                             "concept needs train rows (to fit and match features) and test rows (to score)")
    return frame


def load_lines(spec: str | Path | None, default: str) -> pd.DataFrame:
    """A shipped or local JSONL of text rows (instructions, neutral corpus): columns `text` and maybe `split`."""
    frame = _read(spec or package_data(default))
    if "text" not in frame:
        raise ValueError(f"{spec or default} needs a `text` column")
    return frame
