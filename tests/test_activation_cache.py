"""The activation cache survives power loss and killed writers: fsync before rename, corrupt entries rebuilt, stale
temp directories removed."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bench.activations import ActivationCache, cache_root
from bench.cli import main
from bench.models import load
from bench.results import read_jsonl
from bench.sites import Site
from tests.conftest import FIXTURE_CONCEPTS

TEXTS = ["The chef seared the steak.", "Stars shine at night.", "Bonjour mes amis."]
SITES = [Site(0, "mlp"), Site(1, "resid")]
SHARD = "shard-00000.safetensors"  # the first (here: only) shard of a store


@pytest.fixture(scope="module")
def gpt2():  # noqa: ANN201 - (model, tokenizer)
    model, tok, _ = load("tiny:gpt2")
    return model, tok


def _get(cache: ActivationCache, gpt2) -> dict:  # noqa: ANN001
    return cache.get(*gpt2, "tiny:gpt2", "r0", TEXTS, SITES, batch_size=2, max_len=16)


def _rewrite(path: Path, data: bytes) -> None:
    """Replace `path` by a new file (a new inode: tensors still memory-mapped from the old one stay readable)."""
    tmp = path.with_suffix(".new")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _entry(cache: ActivationCache, site: Site) -> Path:
    (folder,) = [p for p in cache.root.iterdir() if not p.name.startswith(".")
                 and json.loads((p / "meta.json").read_text())["site"] == str(site)]
    return folder


def test_meta_records_tokens_and_bytes(gpt2) -> None:  # noqa: ANN001
    cache = ActivationCache()
    acts = _get(cache, gpt2)
    meta = json.loads((_entry(cache, SITES[0]) / "meta.json").read_text())
    assert meta["n_tokens"] == len(acts[SITES[0]]) and meta["d"] == acts[SITES[0]].x.shape[1]
    assert meta["bytes"] == sum(f.stat().st_size for f in _entry(cache, SITES[0]).glob("shard-*.safetensors"))


@pytest.mark.parametrize("damage", ["truncate", "garbage-header", "missing-meta", "wrong-shape-meta"])
def test_a_corrupt_entry_is_rebuilt_with_a_warning(gpt2, damage: str, caplog: pytest.LogCaptureFixture) -> None:  # noqa: ANN001
    cache = ActivationCache()
    first = {s: a.x.clone() for s, a in _get(cache, gpt2).items()}
    folder = _entry(cache, SITES[0])
    path = folder / SHARD
    if damage == "truncate":
        _rewrite(path, path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "garbage-header":
        _rewrite(path, b"\xff" * 16 + path.read_bytes()[16:])
    elif damage == "missing-meta":
        (folder / "meta.json").unlink()
    else:
        meta = json.loads((folder / "meta.json").read_text())
        (folder / "meta.json").write_text(json.dumps({**meta, "n_tokens": meta["n_tokens"] + 1}))
    again = ActivationCache()
    with caplog.at_level(logging.WARNING):
        second = _get(again, gpt2)
    assert again.misses == 1 and again.hits == 1
    assert any("corrupt" in r.getMessage() and folder.name in r.getMessage() for r in caplog.records)
    for site in SITES:
        torch.testing.assert_close(second[site].x, first[site])
    third = ActivationCache()
    _get(third, gpt2)
    assert third.hits == 2, "the rebuilt entry is complete"
    assert not [p for p in cache.root.iterdir() if p.name.startswith(".")], "no temp directory left behind"


def test_write_fsyncs_file_and_directories_before_the_rename(gpt2, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}") if Path("/proc/self/fd").exists() else str(fd)))
        real_fsync(fd)

    def replace(src: object, dst: object) -> None:
        events.append(("replace", str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    cache = ActivationCache()
    _get(cache, gpt2)
    renames = [i for i, (kind, dst) in enumerate(events) if kind == "replace" and Path(dst).parent == cache.root]
    assert len(renames) == len(SITES)  # each entry is renamed into place once
    for i in renames:
        synced = [p for kind, p in events[:i] if kind == "fsync"]
        assert len(synced) >= 3 * len(SITES[: renames.index(i) + 1])  # the shard, meta.json, the temp directory
        assert any(p.endswith(SHARD) for p in synced)
        assert any(p.endswith("meta.json") for p in synced)
    assert events[-1][0] == "fsync", "the cache directory is fsynced after the last rename"


def test_temp_directories_of_killed_writers_are_removed(gpt2) -> None:  # noqa: ANN001
    from bench.activations import _host

    cache = ActivationCache()
    cache.root.mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = {
        "dead-writer": cache.root / f".abc123.{dead.pid}.{_host()}.x1",
        "old-format-and-old": cache.root / ".abc123-x2",
    }
    kept = {
        "live-writer": cache.root / f".abc123.{os.getpid()}.{_host()}.x3",
        "old-format-but-fresh": cache.root / ".abc123-x4",
        "other-host-fresh": cache.root / f".abc123.{dead.pid}.00000000.x5",
    }
    for folder in [*stale.values(), *kept.values()]:
        folder.mkdir()
        (folder / "acts.safetensors").write_bytes(b"partial")
    hour_ago = time.time() - 2 * 3600
    os.utime(stale["old-format-and-old"], (hour_ago, hour_ago))
    _get(cache, gpt2)
    assert not any(p.exists() for p in stale.values())
    assert all(p.exists() for p in kept.values())


def test_a_corrupt_entry_is_rebuilt_by_the_next_run(tmp_path: Path) -> None:
    args = ["run", "--models", "tiny:gpt2", "--layers", "0", "--methods", "dim", "--tasks", "detection",
            "--concepts", str(FIXTURE_CONCEPTS)]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    entries = sorted((cache_root() / "acts").glob(f"*/{SHARD}"))
    assert entries
    for path in entries:
        _rewrite(path, path.read_bytes()[:100])  # what a power loss mid-write without fsync leaves
    assert main([*args, "--out", str(tmp_path / "b")]) == 0

    def numbers(run: str) -> list[tuple]:
        return sorted((r["metric"], r["concept"], r["split"], r["value"]) for r in read_jsonl(tmp_path / run /
                      "records.jsonl") if not r["metric"].endswith("seconds"))

    assert numbers("a") == numbers("b")
