"""The `Activations` bundle, batched collection with an explicit token mask, and the on-disk cache."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from bench.hooks import read
from bench.sites import Site

log = logging.getLogger(__name__)
CACHE_VERSION = 2  # 2: BOS prepended for tokenizers that do not add it (GPT-2)


@dataclass
class Activations:
    """Per-token activations at one site with where they came from."""

    x: Tensor  # [n_tokens, d_site]
    site: Site
    model_id: str
    prompt_idx: Tensor  # [n_tokens] row of `texts` each token belongs to
    position: Tensor  # [n_tokens] position of the token in its tokenized prompt
    token_ids: Tensor  # [n_tokens]
    texts: list[str]  # [n_prompts]
    labels: Tensor | None = None  # [n_tokens, n_concepts] bool, from the prompt's concept
    concepts: list[str] | None = None  # names of the label columns
    key: str = ""  # content hash of (model, site, texts, max_len, dtype, subset): lets methods cache fits
    source: Path | None = None  # the cache file `x` was read from, for streaming it in chunks

    def __len__(self) -> int:
        return self.x.shape[0]

    @property
    def n_prompts(self) -> int:
        return len(self.texts)

    def with_labels(self, prompt_labels: Tensor, concepts: list[str]) -> Activations:
        """Attach [n_prompts, n_concepts] prompt labels, broadcast to tokens."""
        return replace(self, labels=prompt_labels[self.prompt_idx], concepts=list(concepts))

    def subset(self, idx: Tensor, tag: str) -> Activations:
        """The tokens `idx` (prompts and texts unchanged); `tag` names the subset in the key."""
        return replace(
            self,
            x=self.x[idx],
            prompt_idx=self.prompt_idx[idx],
            position=self.position[idx],
            token_ids=self.token_ids[idx],
            labels=None if self.labels is None else self.labels[idx],
            source=None,
            key=hashlib.sha256(f"{self.key}/{tag}".encode()).hexdigest()[:16],
        )

    def cap(self, max_tokens: int | None, seed: int) -> Activations:
        """A seeded random subset of at most `max_tokens` tokens (kept in order), or self."""
        if max_tokens is None or len(self) <= max_tokens:
            return self
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(len(self), generator=g)[:max_tokens].sort().values
        return self.subset(idx, f"cap{max_tokens}-seed{seed}")

    def iter_chunks(self, chunk_tokens: int) -> Iterator[Tensor]:
        """x in consecutive chunks of at most `chunk_tokens` rows: [<=chunk_tokens, d_site] each.

        When the activations came from the cache, chunks are read from the file, so a caller that
        drops `x` (e.g. `replace(acts, x=acts.x[:0])`) can stream tokens without holding them all."""
        if self.source is not None:
            yield from iter_rows(self.source, "x", chunk_tokens)
            return
        for start in range(0, len(self), chunk_tokens):
            yield self.x[start : start + chunk_tokens]


def iter_rows(path: Path, name: str, chunk_tokens: int) -> Iterator[Tensor]:
    """Rows of tensor `name` in a safetensors file, `chunk_tokens` at a time, without loading the rest."""
    with safe_open(str(path), framework="pt") as f:
        sl = f.get_slice(name)
        n = sl.get_shape()[0]
        for start in range(0, n, chunk_tokens):
            yield sl[start : min(start + chunk_tokens, n)]


def pool(values: Tensor, prompt_idx: Tensor, n_prompts: int, how: str = "max") -> Tensor:
    """Per-token values [n_tokens, k] -> per-prompt [n_prompts, k] by max or mean over each prompt's tokens."""
    if how not in ("max", "mean"):
        raise ValueError(f"unknown pooling {how!r}; valid: max, mean")
    index = prompt_idx[:, None].expand_as(values)
    out = values.new_zeros(n_prompts, values.shape[1])
    return out.scatter_reduce(0, index, values, reduce="amax" if how == "max" else "mean", include_self=False)


def adds_bos(tokenizer: Any) -> bool:
    """Whether `tokenizer` itself starts a text with its BOS token (Gemma, Llama: yes; GPT-2: no)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]


def tokenize(tokenizer: Any, texts: Sequence[str], max_len: int) -> dict[str, Tensor]:
    """Right-padded batch with `attention_mask` and `keep` = real, non-special tokens (BOS/EOS/padding out).

    Every text starts with BOS when the tokenizer has one, as TransformerLens (the paper's reference code) does for
    every model, GPT-2 included: a tokenizer that does not add it itself (GPT-2's) gets it prepended here, so the
    first real token is not the attention sink. BOS counts within `max_len` and is never kept."""
    prepend = not adds_bos(tokenizer) and getattr(tokenizer, "bos_token_id", None) is not None
    enc = tokenizer(
        list(texts),
        return_tensors="pt",
        padding=True,
        truncation=True,
        max_length=max_len - 1 if prepend else max_len,
        return_special_tokens_mask=True,
    )
    special = enc.pop("special_tokens_mask").bool()
    if prepend:
        ones = torch.ones(len(special), 1, dtype=enc["attention_mask"].dtype)
        enc["input_ids"] = torch.cat([ones.to(enc["input_ids"].dtype) * tokenizer.bos_token_id, enc["input_ids"]], 1)
        enc["attention_mask"] = torch.cat([ones, enc["attention_mask"]], 1)
        special = torch.cat([torch.ones(len(special), 1, dtype=torch.bool), special], 1)
        enc.pop("token_type_ids", None)
    enc["keep"] = enc["attention_mask"].bool() & ~special
    return dict(enc)


def collect(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    sites: Sequence[Site],
    batch_size: int = 16,
    max_len: int = 128,
    dtype: torch.dtype = torch.float32,
    desc: str = "activations",
) -> dict[Site, dict[str, Tensor]]:
    """Read `sites` over `texts` in batches: {site: {x [n_tokens, d], prompt_idx, position, token_ids}}.

    Tokens are selected by an explicit mask (padding and special tokens dropped, never zeroed)."""
    device = next(model.parameters()).device
    parts: dict[Site, list[Tensor]] = {s: [] for s in sites}
    meta: dict[str, list[Tensor]] = {"prompt_idx": [], "position": [], "token_ids": []}
    tokenizer.padding_side = "right"
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # length-sorted batches pad less
    for start in tqdm(range(0, len(texts), batch_size), desc=desc, unit="batch", leave=False):
        rows = order[start : start + batch_size]
        enc = tokenize(tokenizer, [texts[i] for i in rows], max_len)
        keep = enc.pop("keep")
        batch = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
        out = read(model, batch, sites)
        b_idx, pos = keep.nonzero(as_tuple=True)
        for site in sites:
            parts[site].append(out[site][b_idx.to(device), pos.to(device)].to("cpu", dtype))
        meta["prompt_idx"].append(torch.tensor(rows)[b_idx])
        meta["position"].append(pos)
        meta["token_ids"].append(enc["input_ids"][b_idx, pos])
    cols = {k: torch.cat(v).long() for k, v in meta.items()}
    order_back = torch.argsort(cols["prompt_idx"] * (max_len + 1) + cols["position"], stable=True)
    cols = {k: v[order_back].contiguous() for k, v in cols.items()}
    return {s: {"x": torch.cat(parts[s])[order_back].contiguous(), **cols} for s in sites}


def cache_root() -> Path:
    """`$FEATBENCH_CACHE`, or `~/.cache/featbench`."""
    return Path(os.environ.get("FEATBENCH_CACHE") or Path.home() / ".cache" / "featbench")


class ActivationCache:
    """Content-addressed activation store: <root>/acts/<key>/{acts.safetensors, meta.json}.

    Entries are written to a temp directory `.<key>.<pid>.<host>.*`, fsynced (file and directories) and renamed
    into place, so a power loss leaves either the whole entry or none. An entry whose file does not match its
    meta.json (size, shapes) or does not open is rebuilt with a warning; temp directories of dead writers, or
    older than STALE_SECONDS, are removed."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = (root or cache_root()) / "acts"
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
        """Activations of `texts` at `sites`, collecting (in one pass) only the sites not cached yet."""
        from bench.data import fingerprint

        self.sweep()
        fp = fingerprint(list(texts))
        keys = {s: self.key(model_id, revision, s, fp, max_len, dtype) for s in sites}
        missing = [s for s in sites if not self.valid(keys[s])]
        self.hits += len(sites) - len(missing)
        self.misses += len(missing)
        if missing:
            fresh = collect(model, tokenizer, texts, missing, batch_size, max_len, dtype, desc)
            for s in missing:
                meta = {"model_id": model_id, "revision": revision, "site": str(s), "texts_fingerprint": fp,
                        "max_len": max_len, "dtype": str(dtype), "version": CACHE_VERSION, "n_texts": len(texts)}
                self._write(keys[s], fresh[s], meta)
        return {s: self._load(keys[s], s, model_id, list(texts)) for s in sites}

    def valid(self, key: str) -> bool:
        """Whether entry `key` is complete: its file has the size and shapes meta.json records and opens. A
        present but broken entry is moved aside and removed (with a warning), so it is rebuilt."""
        folder = self.root / key
        if not folder.exists():
            return False
        try:
            meta = json.loads((folder / "meta.json").read_text())
            path = folder / "acts.safetensors"
            if "bytes" in meta and path.stat().st_size != meta["bytes"]:
                raise ValueError(f"{path.stat().st_size} bytes, meta.json says {meta['bytes']}")
            with safe_open(str(path), framework="pt") as f:
                shapes = {name: f.get_slice(name).get_shape() for name in f.keys()}  # noqa: SIM118
            n = meta.get("n_tokens", shapes["x"][0])
            if any(shape[0] != n for shape in shapes.values()) or set(shapes) != set(_COLUMNS):
                raise ValueError(f"shapes {shapes} do not match {n} tokens")
        except (OSError, ValueError, KeyError, TypeError, SafetensorError) as e:
            log.warning("activation cache entry %s is truncated or corrupt (%s); rebuilding it", folder, e)
            self._discard(folder)
            return False
        return True

    def sweep(self, max_age: float | None = None) -> list[Path]:
        """Remove temp directories left by killed writers: the writer's pid is dead (same host) or the directory
        is older than `max_age` seconds (default STALE_SECONDS). Runs once per cache object unless called."""
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
            if tmp.is_dir() and (dead or age > max_age):
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

    def _write(self, key: str, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=self.root, prefix=f".{key}.{os.getpid()}.{_host()}."))
        try:
            path = tmp / "acts.safetensors"
            save_file(tensors, str(path))
            meta = {**meta, "n_tokens": int(tensors["x"].shape[0]), "d": int(tensors["x"].shape[1]),
                    "bytes": path.stat().st_size}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
            for f in (path, tmp / "meta.json", tmp):
                fsync(f)
            os.replace(tmp, self.root / key)
            fsync(self.root)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            if not (self.root / key / "acts.safetensors").exists():  # else another process won the race
                raise

    def _load(self, key: str, site: Site, model_id: str, texts: list[str]) -> Activations:
        with safe_open(str(self.root / key / "acts.safetensors"), framework="pt") as f:
            t = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 - safe_open has no iterator
        return Activations(
            t["x"], site, model_id, t["prompt_idx"], t["position"], t["token_ids"], texts, key=key,
            source=self.root / key / "acts.safetensors",
        )


_COLUMNS = ("x", "prompt_idx", "position", "token_ids")
STALE_SECONDS = 3600.0  # a temp directory older than this belongs to a killed writer
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


def fsync(path: Path) -> None:
    """Flush a file or a directory entry to disk (directories: where the OS allows it); shared by the caches."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        if not path.is_dir():
            raise
    finally:
        os.close(fd)
