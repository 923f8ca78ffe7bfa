"""Build the shipped hierarchical concept data (bench/data/hier_concepts.jsonl) from data_src/hier_concepts.json.

Deterministic: the same source and seed give a byte-identical file. Run: python scripts/build_hier_data.py
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SRC, OUT = ROOT / "data_src" / "hier_concepts.json", ROOT / "bench" / "data" / "hier_concepts.jsonl"
SEED = 0
SPLITS = ("train", "train", "train", "dev", "test", "test")  # per child of 6 sentences, after a seeded shuffle


def main() -> int:
    spec = json.loads(SRC.read_text(encoding="utf-8"))
    rng = random.Random(SEED)
    rows = []
    for parent, group in spec.items():
        for child, texts in group["children"].items():
            if len(texts) != len(SPLITS):
                raise ValueError(f"{child}: {len(texts)} sentences; the builder splits exactly {len(SPLITS)}")
            if any(child not in t for t in texts):
                raise ValueError(f"{child}: every sentence must contain the word itself")
            order = sorted(texts)
            rng.shuffle(order)
            rows += [{"text": t, "concept": child, "parent": parent, "token": child,
                      "description": f"{child} (one of the {group['description']})", "split": s}
                     for t, s in zip(order, SPLITS, strict=True)]
    OUT.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    sys.stdout.write(f"wrote {len(rows)} rows to {OUT}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
