"""The `Activations` bundle, batched collection with an explicit token mask, and the on-disk cache of shard stores."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from bench.collect import adds_bos, collect, tokenize, windows
from bench.sites import Site
from bench.store import COLUMNS, SHARD_TOKENS, RowSource, ShardWriter, check_store, fsync, read_tensor

log = logging.getLogger(__name__)
CACHE_VERSION = 3  # 2: BOS prepended for tokenizers that do not add it (GPT-2); 3: shard stores
LOAD_WARN_BYTES = 4 * 2**30  # reading more than this of x into memory at once logs a warning
READ_CHUNK = 65_536  # rows per read when loading a view's x
__all__ = ["Activations", "ActivationCache", "adds_bos", "collect", "fsync", "load_store", "memory_budget",
           "pool", "tokenize", "windows"]


class _X:
    """`Activations.x`: the tensor given, or (given None) the rows of `source` read on first access and kept."""

    def __get__(self, obj: Activations | None, owner: type | None = None) -> Tensor:
        if obj is None:
            raise AttributeError("x")  # no class-level default: x is a required field
        x = obj.__dict__["_x"]
        if x is None:
            x = obj._read_all()
            obj.__dict__["_x"] = x
        return x

    def __set__(self, obj: Activations, value: Tensor | None) -> None:
        obj.__dict__["_x"] = value
        obj.__dict__["_lazy"] = value is None


@dataclass(repr=False, eq=False)
class Activations:
    """Per-token activations at one site with where they came from.

    `x` may stay on disk: with `x=None` and `source` a store folder (or one safetensors file with tensor `x`),
    `iter_chunks` streams the rows and `cap`/`subset` return views that keep streaming (`rows` picks the source's
    rows); reading `acts.x` loads them all once (fine for small data; `d`, `len` and `nbytes` never do)."""

    x: Tensor = _X()  # type: ignore[assignment]  # [n_tokens, d_site]
    site: Site
    model_id: str
    prompt_idx: Tensor  # [n_tokens] row of `texts` each token belongs to
    position: Tensor  # [n_tokens] position of the token in its tokenized prompt
    token_ids: Tensor  # [n_tokens]
    texts: list[str]  # [n_prompts]
    labels: Tensor | None = None  # [n_tokens, n_concepts] bool, from the prompt's concept
    concepts: list[str] | None = None  # names of the label columns
    key: str = ""  # content hash of (model, site, texts, max_len, dtype, subset): lets methods cache fits
    source: Path | None = None  # the store folder or safetensors file `x` streams from
    rows: Tensor | None = None  # [n_tokens] rows of `source` these tokens are (None: all, in order)

    def __post_init__(self) -> None:
        if self._lazy and self.source is None:
            raise ValueError("Activations(x=None) needs `source`, the store or file the rows are read from")

    def __len__(self) -> int:
        x = self.__dict__["_x"]
        return x.shape[0] if x is not None else len(self.prompt_idx)

    def __repr__(self) -> str:
        return (f"Activations({len(self)} tokens x {self.d} at {self.site} of {self.model_id}, "
                f"{self.n_prompts} texts, {'streamed from ' + str(self.source) if self.streams else 'in memory'})")

    @property
    def n_prompts(self) -> int:
        return len(self.texts)

    @property
    def streams(self) -> bool:
        """Whether `x` is still on disk (iter_chunks reads the source; nothing is loaded)."""
        return self._lazy and self.__dict__["_x"] is None

    @property
    def reads_source(self) -> bool:
        """Whether `iter_chunks` reads the source (x not loaded from it, or given alongside it)."""
        return self.source is not None and (self.__dict__["_x"] is None or not self._lazy)

    @property
    def d(self) -> int:
        """Width of x, without loading it."""
        x = self.__dict__["_x"]
        return int(x.shape[1]) if x is not None else self._src().d

    @property
    def nbytes(self) -> int:
        """Bytes of x (loaded or not)."""
        x = self.__dict__["_x"]
        return x.numel() * x.element_size() if x is not None else len(self) * self._src().row_bytes

    def chunk_tokens(self, max_bytes: int = 64 * 2**20, itemsize: int | None = None) -> int:
        """Tokens per streamed chunk: at most `max_bytes` and 1/8 of `memory_budget()` of x per chunk (`itemsize`:
        bytes per value as the caller holds it; default: as stored)."""
        if itemsize is None:
            itemsize = self._src().dtype.itemsize if self.streams else self.x.element_size()
        return max(1, min(max_bytes, memory_budget() // 8) // max(1, self.d * itemsize))

    def _src(self) -> RowSource:
        if "_source" not in self.__dict__:
            assert self.source is not None
            self.__dict__["_source"] = RowSource.of(self.source)
        return self.__dict__["_source"]

    def _read_all(self) -> Tensor:
        if self.nbytes > LOAD_WARN_BYTES:
            log.warning("loading %.1f GiB of activations of %s into memory; stream them with iter_chunks",
                        self.nbytes / 2**30, self.site)
        src = self._src()
        if self.rows is None:
            return src.read_range(0, src.n)
        out = torch.empty(len(self.rows), src.d, dtype=src.dtype)
        for start in range(0, len(self.rows), READ_CHUNK):
            out[start : start + READ_CHUNK] = src.read(self.rows[start : start + READ_CHUNK])
        return out

    def _evolve(self, **changes: Any) -> Activations:
        """`dataclasses.replace` that keeps x on disk (replace itself would read `x`)."""
        kw = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "x"}
        kw["x"] = None if self._lazy else self.__dict__["_x"]
        out = Activations(**(kw | changes))
        if self._lazy and "rows" not in changes and "source" not in changes:
            out.__dict__["_x"] = self.__dict__["_x"]  # the same rows: share what was loaded
            out.__dict__.update({k: v for k, v in self.__dict__.items() if k == "_source"})
        return out

    def with_labels(self, prompt_labels: Tensor, concepts: list[str]) -> Activations:
        """Attach [n_prompts, n_concepts] prompt labels, broadcast to tokens."""
        return self._evolve(labels=prompt_labels[self.prompt_idx], concepts=list(concepts))

    def subset(self, idx: Tensor, tag: str) -> Activations:
        """The tokens `idx` (prompts and texts unchanged); `tag` names the subset in the key. A streamed `x`
        stays on disk (the result reads the source's rows `idx`)."""
        meta = {
            "prompt_idx": self.prompt_idx[idx], "position": self.position[idx], "token_ids": self.token_ids[idx],
            "labels": None if self.labels is None else self.labels[idx],
            "key": hashlib.sha256(f"{self.key}/{tag}".encode()).hexdigest()[:16],
        }
        if self._lazy:
            return self._evolve(rows=idx.long() if self.rows is None else self.rows[idx], **meta)
        return self._evolve(x=self.x[idx], source=None, rows=None, **meta)

    def cap(self, max_tokens: int | None, seed: int) -> Activations:
        """A seeded random subset of at most `max_tokens` tokens (kept in order), or self."""
        if max_tokens is None or len(self) <= max_tokens:
            return self
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(len(self), generator=g)[:max_tokens].sort().values
        return self.subset(idx, f"cap{max_tokens}-seed{seed}")

    def take(self, idx: Tensor) -> Tensor:
        """x[idx] for token indices `idx` [b] in any order: [b, d_site], read from the source (only those rows) when
        `iter_chunks` would read it, so a streamed view stays on disk."""
        if self.reads_source:
            return self._src().read(idx.long() if self.rows is None else self.rows[idx])
        return self.x[idx]

    def iter_chunks(self, chunk_tokens: int) -> Iterator[Tensor]:
        """x in consecutive chunks of at most `chunk_tokens` rows: [<=chunk_tokens, d_site] each.

        With a `source`, chunks are read from it unless x was loaded from it, so a streamed (or capped) view never
        holds all its tokens; a caller that gave x and a source (e.g. `replace(acts, x=acts.x[:0])`) streams too."""
        if self.reads_source:
            yield from self._src().iter_chunks(chunk_tokens, self.rows)
            return
        for start in range(0, len(self), chunk_tokens):
            yield self.x[start : start + chunk_tokens]


def pool(values: Tensor, prompt_idx: Tensor, n_prompts: int, how: str = "max") -> Tensor:
    """Per-token values [n_tokens, k] -> per-prompt [n_prompts, k] by max or mean over each prompt's tokens."""
    if how not in ("max", "mean"):
        raise ValueError(f"unknown pooling {how!r}; valid: max, mean")
    index = prompt_idx[:, None].expand_as(values)
    out = values.new_zeros(n_prompts, values.shape[1])
    return out.scatter_reduce(0, index, values, reduce="amax" if how == "max" else "mean", include_self=False)


def memory_budget() -> int:
    """Bytes of activations a stage may hold in memory at once (`$FEATBENCH_MEMORY_BUDGET`: bytes, or with a K, M or
    G suffix; default 1G). Larger data is streamed from the store in chunks."""
    raw = os.environ.get("FEATBENCH_MEMORY_BUDGET", "1G").strip().upper()
    scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(raw[-1:], 1)
    try:
        return int(float(raw[:-1] if scale > 1 else raw) * scale)
    except ValueError as e:
        raise ValueError(f"FEATBENCH_MEMORY_BUDGET={raw!r}; expected bytes, e.g. 1G, 512M or 1073741824") from e


def cache_root() -> Path:
    """`$FEATBENCH_CACHE`, or `~/.cache/featbench`."""
    return Path(os.environ.get("FEATBENCH_CACHE") or Path.home() / ".cache" / "featbench")


class ActivationCache:
    """Content-addressed activation store: <root>/acts/<key>/{shard-NNNNN.safetensors..., meta.json} (`bench.store`).

    A missing entry is collected into `.<key>.partial/`, one shard of at most `shard_tokens` tokens at a time, so
    memory does not grow with the number of tokens; a collection that is killed resumes from its last complete shard
    (writers of one key take turns through
    `<root>/locks/acts-<key>.lock`). The finished folder is fsynced and renamed into place, so
    a power loss leaves either the whole entry or a resumable partial one. An entry whose shards do not match its
    meta.json (size, shapes) or do not parse is rebuilt with a warning; temp directories of dead writers, or older
    than STALE_SECONDS, are removed (partial stores after STALE_PARTIAL_SECONDS). Loading reads the token columns;
    `x` stays on disk until used (`Activations.iter_chunks`, or `.x` for all of it)."""

    def __init__(self, root: Path | None = None, shard_tokens: int = SHARD_TOKENS) -> None:
        self.root = (root or cache_root()) / "acts"
        self.shard_tokens = shard_tokens
        self.hits = 0
        self.misses = 0
        self._swept = False

    @staticmethod
    def key(model_id: str, revision: str, site: Site, texts_fp: str, max_len: int, dtype: torch.dtype) -> str:
        spec = json.dumps([model_id, revision, str(site), texts_fp, max_len, str(dtype), CACHE_VERSION])
        return hashlib.sha256(spec.encode()).hexdigest()[:24]

    def get(
        self,
        model: nn.Module,
        tokenizer: Any,
        model_id: str,
        revision: str,
        texts: Sequence[str],
        sites: Sequence[Site],
        batch_size: int = 16,
        max_len: int = 128,
        dtype: torch.dtype = torch.float32,
        desc: str = "activations",
    ) -> dict[Site, Activations]:
        """Activations of `texts` at `sites`, collecting (in one pass) only the sites not cached yet. `dtype` is the
        stored dtype (float32, or bfloat16/float16 for half the disk and reads)."""
        from bench.data import fingerprint

        self.sweep()
        fp = fingerprint(list(texts))
        keys = {s: self.key(model_id, revision, s, fp, max_len, dtype) for s in sites}
        missing = [s for s in sites if not self.valid(keys[s])]
        self.hits += len(sites) - len(missing)
        self.misses += len(missing)
        if missing:
            self.root.mkdir(parents=True, exist_ok=True)
            with self._locked(sorted(keys[s] for s in missing)):
                missing = [s for s in missing if not self.valid(keys[s])]  # another process may have written them
                metas = {s: {"model_id": model_id, "revision": revision, "site": str(s), "texts_fingerprint": fp,
                             "max_len": max_len, "dtype": str(dtype), "version": CACHE_VERSION, "n_texts": len(texts)}
                         for s in missing}
                self._collect(model, tokenizer, texts, missing, keys, metas, batch_size, max_len, dtype, desc)
        return {s: self._load(keys[s], s, model_id, list(texts)) for s in sites}

    def _collect(self, model: nn.Module, tokenizer: Any, texts: Sequence[str], sites: list[Site],
                 keys: dict[Site, str], metas: dict[Site, dict[str, Any]], batch_size: int, max_len: int,
                 dtype: torch.dtype, desc: str) -> None:
        """Collect `sites` into shard stores, resuming each from its partial folder."""
        if not sites:
            return
        writers = {s: ShardWriter(self.root / f".{keys[s]}.partial", metas[s], self.shard_tokens) for s in sites}
        start = min(w.end_text for w in writers.values())
        window = max(batch_size, self.shard_tokens // max(max_len, 1))  # a window's tokens fit one shard

        def ahead(first: int, end: int) -> list[Site]:  # the sites whose stores do not hold texts [first, end) yet
            return [s for s in sites if writers[s].end_text < end]

        for _, end, got in windows(model, tokenizer, texts, sites, batch_size, max_len, dtype, desc, start, window,
                                   ahead):
            for s, cols in got.items():
                writers[s].add(cols, end)
        for s in sites:
            writers[s].finish(self.root / keys[s], dtype)

    @contextlib.contextmanager
    def _locked(self, keys: list[str]) -> Iterator[None]:
        """Hold the OS locks of `keys` (sorted, so two writers never wait on each other in a cycle)."""
        locks = self.root.parent / "locks"
        locks.mkdir(parents=True, exist_ok=True)
        with contextlib.ExitStack() as stack:
            for key in keys:
                f = stack.enter_context(open(locks / f"acts-{key}.lock", "a+b"))  # noqa: SIM115
                fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            yield

    def valid(self, key: str) -> bool:
        """Whether entry `key` is complete: every shard has the size and shapes meta.json records and parses. A
        present but broken entry is moved aside and removed (with a warning), so it is rebuilt."""
        folder = self.root / key
        if not folder.exists():
            return False
        try:
            check_store(folder)
        except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
            log.warning("activation cache entry %s is truncated or corrupt (%s); rebuilding it", folder, e)
            self._discard(folder)
            return False
        return True

    def sweep(self, max_age: float | None = None) -> list[Path]:
        """Remove temp directories left by killed writers: the writer's pid is dead (same host) or the directory
        is older than `max_age` seconds (default STALE_SECONDS). Partial stores are kept for a resume unless older
        than STALE_PARTIAL_SECONDS. Runs once per cache object unless called."""
        if self._swept and max_age is None:
            return []
        self._swept = True
        max_age = STALE_SECONDS if max_age is None else max_age
        removed = []
        for tmp in self.root.glob(".*") if self.root.is_dir() else []:
            m = _TMP.match(tmp.name)
            try:
                age = time.time() - tmp.stat().st_mtime
            except OSError:
                continue
            dead = m is not None and m["host"] == _host() and not _alive(int(m["pid"]))
            limit = STALE_PARTIAL_SECONDS if tmp.name.endswith(".partial") else max_age
            if tmp.is_dir() and (dead or age > limit):
                shutil.rmtree(tmp, ignore_errors=True)
                removed.append(tmp)
        if removed:
            log.info("activation cache: removed %d temp director%s of killed writers", len(removed),
                     "y" if len(removed) == 1 else "ies")
        return removed

    def _discard(self, folder: Path) -> None:
        aside = folder.with_name(f".{folder.name}.{os.getpid()}.{_host()}.broken")
        try:
            os.replace(folder, aside)
        except OSError:
            return  # another process moved or rebuilt it
        shutil.rmtree(aside, ignore_errors=True)

    def _load(self, key: str, site: Site, model_id: str, texts: list[str]) -> Activations:
        return load_store(self.root / key, site, model_id, texts, key)


def load_store(folder: Path, site: Site, model_id: str, texts: list[str], key: str = "") -> Activations:
    """Activations of a finished store folder: the token columns in memory, x left in the shards (`source`)."""
    meta = json.loads((folder / "meta.json").read_text())
    cols = {c: torch.cat([read_tensor(folder / s["file"], c) for s in meta["shards"]]) if meta["shards"]
            else torch.zeros(0, dtype=torch.long) for c in COLUMNS[1:]}
    return Activations(None, site, model_id, cols["prompt_idx"], cols["position"],  # type: ignore[arg-type]
                       cols["token_ids"], texts, key=key or meta.get("key", ""), source=folder)


STALE_SECONDS = 3600.0  # a temp directory older than this belongs to a killed writer
STALE_PARTIAL_SECONDS = 7 * 86400.0  # a partial store untouched this long is not resumed any more
_TMP = re.compile(r"^\.[0-9a-f]+\.(?P<pid>\d+)\.(?P<host>[0-9a-f]{8})\.")


def _host() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True
