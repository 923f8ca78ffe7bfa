"""Hierarchical concept data: child concepts (e.g. Monday) grouped under parent categories (days), with the word
that names each child (its token for the logit intervention). Shipped: `bench/data/hier_concepts.jsonl` (see
DATASHEET.md); any file `ConceptData.load` reads works, with `parent` and `token` columns optional and mappable."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import pandas as pd
import torch
from torch import Tensor

from bench.data import ConceptData, package_data, parse_columns

EXTRA = ("parent", "token")  # columns beyond ConceptData's that --concept-columns may map here


def parse_hier_columns(spec: str | Mapping[str, str] | None) -> tuple[dict[str, str], dict[str, str]]:
    """`"text=prompt,concept=label,parent=category"` -> (ConceptData's mapping, the mapping of `parent`/`token`)."""
    if isinstance(spec, Mapping):
        pairs = dict(spec)
    else:
        pairs = dict(item.partition("=")[::2] for item in str(spec or "").split(",") if item.strip())
    pairs = {k.strip(): v.strip() for k, v in pairs.items()}
    extra = {k: v for k, v in pairs.items() if k in EXTRA}
    bad = [f"{k}={v}" for k, v in extra.items() if not v]
    if bad:
        raise ValueError(f"bad concept column mapping {bad[0]}: expected OURS=THEIRS, e.g. parent=category")
    return parse_columns({k: v for k, v in pairs.items() if k not in EXTRA}), extra


@dataclass
class HierConcepts:
    """Rows of `text`, `concept` (the child), `parent` (its category; the child itself when absent), `token` (the
    word naming the child; the concept name when absent) and `split`."""

    frame: pd.DataFrame
    name: str = "hier_concepts"

    @classmethod
    def load(cls, spec: str | Path | None = None, columns: str | Mapping[str, str] | None = None,
             seed: int = 0) -> HierConcepts:
        """The shipped hierarchical set (`spec=None`) or a file/hub dataset as `ConceptData.load` reads it."""
        spec = spec or package_data("hier_concepts.jsonl")
        base_cols, extra = parse_hier_columns(columns)
        data = ConceptData.load(spec, base_cols, seed=seed)
        frame = data.frame
        for ours, theirs in extra.items():
            if theirs not in frame.columns:
                raise ValueError(f"--concept-columns {ours}={theirs}: {spec} has no column {theirs!r}; its columns: "
                                 f"{', '.join(map(str, frame.columns))}")
            frame = frame.assign(**{ours: frame[theirs]})
        frame = frame[frame["concept"] != ""].copy()  # hard negatives have no place in the tree
        for col in EXTRA:
            if col not in frame.columns:
                frame[col] = ""
            frame[col] = frame[col].fillna("").astype(str).str.strip()
            frame[col] = frame[col].where(frame[col] != "", frame["concept"])
        clash = frame.groupby("concept")["parent"].nunique()
        if (clash > 1).any():
            raise ValueError(f"concept {clash[clash > 1].index[0]!r} of {spec} has more than one parent; each "
                             "child needs exactly one")
        return cls(frame.reset_index(drop=True), Path(str(spec)).stem)

    @property
    def texts(self) -> list[str]:
        return self.frame["text"].tolist()

    @cached_property
    def children(self) -> list[str]:
        return sorted(self.frame["concept"].unique())

    @cached_property
    def parents(self) -> list[str]:
        return sorted(self.frame["parent"].unique())

    @cached_property
    def parent_of(self) -> dict[str, str]:
        return dict(zip(self.frame["concept"], self.frame["parent"], strict=True))

    @cached_property
    def token_of(self) -> dict[str, str]:
        return dict(zip(self.frame["concept"], self.frame["token"], strict=True))

    @cached_property
    def names(self) -> list[str]:
        """Every concept a tree node can be named by: the children, then the parents that are not children."""
        return self.children + [p for p in self.parents if p not in set(self.children)]

    def labels(self) -> Tensor:
        """[n_rows, len(names)] bool: row i is a positive of child j, or of a parent whose child it is."""
        col = {n: i for i, n in enumerate(self.names)}
        out = torch.zeros(len(self.frame), len(self.names), dtype=torch.bool)
        for i, (c, p) in enumerate(zip(self.frame["concept"], self.frame["parent"], strict=True)):
            out[i, col[c]] = out[i, col[p]] = True
        return out
