"""The judge cache: every answer a judge gave, in SQLite (WAL), stored the moment it arrives."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import closing
from pathlib import Path
from typing import Any

from bench.activations import cache_root

# What `compute(indices)` may return: the answers of those indices in order (a batch back end), or
# (position in `indices`, answer) pairs in completion order (a concurrent back end; each is stored as it comes).
Answers = list[str | None] | Iterable[tuple[int, str | None]]


class JudgeCache:
    """Answers keyed by sha256(judge, prompt, decoding params, template version) in SQLite (WAL).

    Answers never expire; failed calls (None) are not stored. Each write opens its own short connection and
    commits at once, so the cache is safe to use from several threads and processes, and a run killed mid-batch
    keeps every answer that had arrived. `hits` counts items served from the file, `misses` the distinct keys that
    had to be computed."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or cache_root() / "judge.sqlite"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.hits = 0
        self.misses = 0
        with closing(self._connect()) as conn, conn:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("CREATE TABLE IF NOT EXISTS answers (key TEXT PRIMARY KEY, judge TEXT NOT NULL, "
                         "version TEXT NOT NULL, answer TEXT NOT NULL, created REAL NOT NULL)")

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=60)

    @staticmethod
    def key(judge: str, prompt: str, params: Mapping[str, Any], version: str) -> str:
        blob = json.dumps({"judge": judge, "prompt": prompt, "params": dict(params), "version": version},
                          sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def get(self, keys: Sequence[str]) -> dict[str, str]:
        found: dict[str, str] = {}
        unique = list(dict.fromkeys(keys))
        with closing(self._connect()) as conn:
            for start in range(0, len(unique), 500):
                chunk = unique[start : start + 500]
                rows = conn.execute(f"SELECT key, answer FROM answers WHERE key IN ({','.join('?' * len(chunk))})",
                                    chunk).fetchall()
                found.update(rows)
        return found

    def put(self, rows: Sequence[tuple[str, str, str, str]]) -> None:
        """Store (key, judge, version, answer) rows in one transaction; an existing key keeps its first answer."""
        if not rows:
            return
        with closing(self._connect()) as conn, conn:
            conn.executemany("INSERT OR IGNORE INTO answers VALUES (?, ?, ?, ?, ?)",
                             [(*r, time.time()) for r in rows])

    def through(self, keys: Sequence[str], judge: str, version: str | Sequence[str],
                compute: Callable[[list[int]], Answers]) -> list[str | None]:
        """Answers for `keys`: stored ones from the file, the rest from `compute(indices of first occurrences)`.

        `compute` returns either the answers of those indices in order (stored when it returns) or an iterator of
        (position in the indices, answer) pairs in completion order, each stored the moment it is yielded; if the
        iterator raises, what it yielded before stays stored. `version` (one, or one per key) is stored next to
        each answer for inspection."""
        versions = [version] * len(keys) if isinstance(version, str) else list(version)
        stored = self.get(keys)
        self.hits += sum(1 for k in keys if k in stored)
        first = {k: i for i, k in reversed(list(enumerate(keys)))}
        todo = sorted(i for k, i in first.items() if k not in stored)
        self.misses += len(todo)
        if todo:
            fresh = compute(todo)
            if isinstance(fresh, list):
                pairs = list(zip(todo, fresh, strict=True))
                self.put([(keys[i], judge, versions[i], a) for i, a in pairs if a is not None])
                stored.update({keys[i]: a for i, a in pairs if a is not None})
            else:
                for j, answer in fresh:
                    i = todo[j]
                    if answer is not None:
                        self.put([(keys[i], judge, versions[i], answer)])
                        stored[keys[i]] = answer
        return [stored.get(k) for k in keys]
