"""The activation store on disk: safetensors shards written as tokens are collected, read back a few rows at a time.

A store is a folder of `shard-NNNNN.safetensors` files (columns `x` [n_i, d], `prompt_idx`, `position`, `token_ids`
[n_i], at most `shard_tokens` tokens each, whole texts only) and a `meta.json` that lists them. While it is being
written it lives in a partial folder whose `manifest.json` is replaced atomically after each complete shard, so an
interrupted writer resumes from its last complete shard (`ShardWriter`); the finished folder is renamed into place.

Rows are read with `os.preadv` into a buffer of their own (`RowSource`), never through a memory map of the file: a
map keeps every page it touched resident until it is closed (measured: a 1 GiB file read in slices through one
`safe_open` left the process at 1.2 GiB RSS; reads here keep it at the size of one chunk). The files are plain
safetensors, readable by `safetensors.safe_open` and `load_file`."""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

log = logging.getLogger(__name__)
SHARD_TOKENS = 32_768  # default tokens per shard: 256 MiB of float32 at d = 2,048
COLUMNS = ("x", "prompt_idx", "position", "token_ids")
MAX_HEADER = 100 * 2**20
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def header(path: Path) -> tuple[int, dict[str, dict[str, Any]]]:
    """(byte offset of the data, {tensor name: {dtype, shape, data_offsets}}) of a safetensors file; ValueError when
    the header is not one or does not fit the file's size."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError(f"{path}: {size} bytes, no safetensors header")
        (n,) = struct.unpack("<Q", raw)
        if n > min(MAX_HEADER, size - 8):
            raise ValueError(f"{path}: header length {n} does not fit the file ({size} bytes)")
        meta = json.loads(f.read(n))
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: the header is not a JSON object")
    meta.pop("__metadata__", None)
    end = max((int(t["data_offsets"][1]) for t in meta.values()), default=0)
    if 8 + n + end != size:
        raise ValueError(f"{path}: the header describes {8 + n + end} bytes, the file has {size}")
    for name, t in meta.items():
        if t.get("dtype") not in _DTYPES:
            raise ValueError(f"{path}: tensor {name} has unsupported dtype {t.get('dtype')!r}")
    return 8 + n, meta


def read_tensor(path: Path, name: str) -> Tensor:
    """One whole tensor of a safetensors file, read (not mapped)."""
    offset, meta = header(path)
    t = meta[name]
    a, b = (int(v) for v in t["data_offsets"])
    buf = torch.empty(b - a, dtype=torch.uint8)
    with open(path, "rb") as f:
        pread_into(f.fileno(), buf, offset + a, path)
    return buf.view(_DTYPES[t["dtype"]]).view(t["shape"])


def pread_into(fd: int, buf: Tensor, offset: int, path: Path) -> None:
    """Fill the contiguous uint8 tensor `buf` from byte `offset` of `fd`."""
    view, done = memoryview(buf.numpy()).cast("B"), 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got <= 0:
            raise OSError(f"{path}: file ends before byte {offset + len(view)}; the store is truncated")
        done += got


class RowSource:
    """Rows of tensor `x` [n, d] stored in one safetensors file or across the shards of a store folder."""

    def __init__(self, files: Sequence[Path], name: str = "x") -> None:
        self.files, self.offsets, self.sizes, counts = [], [], [], [0]
        self.d, self.dtype = 0, torch.float32
        for path in files:
            offset, meta = header(path)
            if name not in meta:
                raise ValueError(f"{path} has no tensor {name!r}; it has {', '.join(meta)}")
            t = meta[name]
            if len(t["shape"]) != 2:
                raise ValueError(f"{path}: {name} has shape {t['shape']}; expected [n_tokens, d]")
            n, d = t["shape"]
            self.files.append(path)
            self.offsets.append(offset + int(t["data_offsets"][0]))
            self.sizes.append(path.stat().st_size)
            self.d, self.dtype = int(d), _DTYPES[t["dtype"]]
            counts.append(int(n))
        self.starts = torch.tensor(counts).cumsum(0)  # [n_files + 1] first row of each file
        self.n = int(self.starts[-1])
        self.row_bytes = self.d * self.dtype.itemsize

    @classmethod
    def of(cls, path: Path) -> RowSource:
        """A single safetensors file with `x`, or a store folder (its `meta.json` lists the shards)."""
        if path.is_dir():
            meta = json.loads((path / "meta.json").read_text())
            return cls([path / s["file"] for s in meta["shards"]])
        return cls([path])

    def read(self, rows: Tensor) -> Tensor:
        """x[rows] for int64 rows [b] in any order: [b, d]."""
        rows = rows.long()
        if len(rows) > 1 and not bool((rows[1:] > rows[:-1]).all()):
            order = torch.argsort(rows)
            out = torch.empty(len(rows), self.d, dtype=self.dtype)
            out[order] = self._read_sorted(rows[order])
            return out
        return self._read_sorted(rows)

    def read_range(self, start: int, stop: int) -> Tensor:
        """x[start:stop]: [stop - start, d]."""
        return self._read_sorted(torch.arange(start, stop))

    def iter_chunks(self, chunk_tokens: int, rows: Tensor | None = None) -> Iterator[Tensor]:
        """x (or x[rows]) in consecutive chunks of at most `chunk_tokens` rows: [<=chunk_tokens, d] each."""
        n = self.n if rows is None else len(rows)
        for start in range(0, n, chunk_tokens):
            stop = min(start + chunk_tokens, n)
            yield self.read_range(start, stop) if rows is None else self.read(rows[start:stop])

    def _read_sorted(self, rows: Tensor) -> Tensor:
        out = torch.empty(len(rows), self.row_bytes, dtype=torch.uint8)
        if len(rows) and self.row_bytes:
            if int(rows[0]) < 0 or int(rows[-1]) >= self.n:
                raise IndexError(f"rows {int(rows[0])}..{int(rows[-1])} out of range for {self.n} stored rows")
            seg = torch.searchsorted(self.starts, rows, right=True) - 1  # file of each row
            brk = ((rows[1:] != rows[:-1] + 1) | (seg[1:] != seg[:-1])).nonzero().flatten() + 1
            bounds = torch.cat([torch.zeros(1, dtype=torch.long), brk, torch.tensor([len(rows)])]).tolist()
            seg_l, local = seg.tolist(), (rows - self.starts[seg]).tolist()
            fds: dict[int, int] = {}
            try:
                for a, b in zip(bounds[:-1], bounds[1:], strict=True):
                    s = seg_l[a]
                    if s not in fds:
                        fds[s] = os.open(self.files[s], os.O_RDONLY)
                        if os.fstat(fds[s]).st_size != self.sizes[s]:
                            raise OSError(f"{self.files[s]} changed size since it was opened; reload the activations")
                    pread_into(fds[s], out[a:b], self.offsets[s] + local[a] * self.row_bytes, self.files[s])
            finally:
                for fd in fds.values():
                    os.close(fd)
        return out.view(self.dtype).view(len(rows), self.d)


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


def check_store(folder: Path) -> dict[str, Any]:
    """The store's meta.json after checking every shard against it (size, header, shapes); ValueError or OSError
    naming what is wrong otherwise."""
    meta = json.loads((folder / "meta.json").read_text())
    total = 0
    for shard in meta["shards"]:
        path = folder / shard["file"]
        if path.stat().st_size != shard["bytes"]:
            raise ValueError(f"{path.name}: {path.stat().st_size} bytes, meta.json says {shard['bytes']}")
        _, cols = header(path)
        shapes = {name: t["shape"] for name, t in cols.items()}
        if set(shapes) != set(COLUMNS) or any(s[0] != shard["n_tokens"] for s in shapes.values()) or \
                shapes["x"][1:] != [meta["d"]]:
            raise ValueError(f"{path.name}: shapes {shapes} do not match {shard['n_tokens']} tokens of d={meta['d']}")
        total += shard["n_tokens"]
    if total != meta["n_tokens"]:
        raise ValueError(f"the shards hold {total} tokens, meta.json says {meta['n_tokens']}")
    return meta


class ShardWriter:
    """Writes one store into the partial folder `folder`, resuming an interrupted writer's complete shards.

    `add(cols, end_text)` takes the tokens of texts up to `end_text` (exclusive) in (prompt, position) order; tokens
    of texts already written are dropped. A shard is cut before a batch that would take it past `shard_tokens`
    (a single batch larger than that becomes one shard), so shards hold whole texts. `finish(final)` writes meta.json
    and renames the folder to `final`. Memory: at most one shard and one batch of tokens."""

    def __init__(self, folder: Path, meta: dict[str, Any], shard_tokens: int = SHARD_TOKENS) -> None:
        if shard_tokens < 1:
            raise ValueError(f"shard_tokens={shard_tokens}; must be >= 1")
        self.folder, self.meta, self.shard_tokens = folder, meta, shard_tokens
        self.shards: list[dict[str, Any]] = []
        self.d: int | None = None
        self._buf: list[dict[str, Tensor]] = []
        self._buf_n = 0
        folder.mkdir(parents=True, exist_ok=True)
        self._resume()
        self.end_text = self.shards[-1]["texts"][1] if self.shards else 0  # texts [0, end_text) are written
        self._pending_end = self.end_text  # ... or buffered

    def _resume(self) -> None:
        manifest = self.folder / "manifest.json"
        try:
            old = json.loads(manifest.read_text()) if manifest.exists() else None
        except ValueError:
            old = None
        if old is not None and old.get("meta") == self.meta:
            for shard in old["shards"]:
                path = self.folder / shard["file"]
                if not path.exists() or path.stat().st_size != shard["bytes"]:
                    break
                self.shards.append(shard)
                self.d = old["d"]
        keep = {s["file"] for s in self.shards} | {"manifest.json"}
        for f in self.folder.iterdir():
            if f.name not in keep:
                f.unlink()
        if self.shards:
            log.info("activation store %s: resuming after %d complete shard(s), %d texts", self.folder.name,
                     len(self.shards), self.shards[-1]["texts"][1])

    def add(self, cols: dict[str, Tensor], end_text: int) -> None:
        if end_text <= self._pending_end:
            return
        if len(cols["prompt_idx"]) and int(cols["prompt_idx"].min()) < self._pending_end:  # a resume mid-batch
            keep = cols["prompt_idx"] >= self._pending_end
            cols = {k: v[keep] for k, v in cols.items()}
        self.d = int(cols["x"].shape[1])
        n = len(cols["x"])
        if self._buf_n and self._buf_n + n > self.shard_tokens:
            self._flush()
        self._buf.append(cols)
        self._buf_n += n
        self._pending_end = end_text

    def _flush(self) -> None:
        if not self._buf:
            return
        tensors = {k: torch.cat([c[k] for c in self._buf]).contiguous() for k in COLUMNS}
        self._write_shard(tensors, self._pending_end)
        self._buf, self._buf_n = [], 0

    def _write_shard(self, tensors: dict[str, Tensor], end_text: int) -> None:
        name = f"shard-{len(self.shards):05d}.safetensors"
        path = self.folder / name
        save_file(tensors, str(path))
        fsync(path)
        self.shards.append({"file": name, "n_tokens": int(tensors["x"].shape[0]), "texts": [self.end_text, end_text],
                            "bytes": path.stat().st_size})
        self.end_text = end_text
        tmp = self.folder / "manifest.json.tmp"
        tmp.write_text(json.dumps({"meta": self.meta, "d": self.d, "shards": self.shards}, indent=1))
        fsync(tmp)
        os.replace(tmp, self.folder / "manifest.json")
        fsync(self.folder)

    def finish(self, final: Path, dtype: torch.dtype) -> dict[str, Any]:
        """Write the last shard and meta.json, and rename the folder to `final` (fsynced). Returns meta.json."""
        self._flush()
        if not self.shards:  # no tokens at all: one empty shard keeps d and the dtype
            d = self.d or 0
            self._write_shard({"x": torch.zeros(0, d, dtype=dtype), **{k: torch.zeros(0, dtype=torch.long)
                                                                       for k in COLUMNS[1:]}}, self._pending_end)
        meta = {**self.meta, "n_tokens": sum(s["n_tokens"] for s in self.shards), "d": self.d or 0,
                "bytes": sum(s["bytes"] for s in self.shards), "shard_tokens": self.shard_tokens,
                "shards": self.shards}
        (self.folder / "manifest.json").unlink(missing_ok=True)
        (self.folder / "meta.json").write_text(json.dumps(meta, indent=1))
        fsync(self.folder / "meta.json")
        fsync(self.folder)
        if final.exists():  # a broken entry moved aside by `valid` is gone; anything else lost a race to us
            shutil.rmtree(final, ignore_errors=True)
        os.replace(self.folder, final)
        fsync(final.parent)
        return meta
