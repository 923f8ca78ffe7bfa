"""A local model folder's revision is a content fingerprint, so overwritten weights never reuse old caches."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

import bench.models
from bench.activations import ActivationCache
from bench.models import file_sha256, load
from bench.sites import Site

TEXTS = ["the cat sat on the mat", "a dog ran in the park"]


def _save_tiny(folder: Path, scale: float = 1.0) -> None:
    model, tok, _ = load("tiny:gpt2")
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(scale)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)


def test_overwritten_local_weights_change_the_revision_and_the_activation_key(tmp_path: Path) -> None:
    folder, cache, site = tmp_path / "my-model", ActivationCache(), Site(0, "mlp")
    _save_tiny(folder)
    model, tok, prov = load(str(folder))
    assert prov["revision"].startswith("fp:") and len(prov["revision"]) == 3 + 16
    assert prov["revision"] != "local" and "model.safetensors" in prov["files"]
    first = cache.get(model, tok, str(folder), prov["revision"], TEXTS, [site])[site]
    assert load(str(folder))[2]["revision"] == prov["revision"], "unchanged files: same revision"

    _save_tiny(folder, scale=1.5)  # same names, same sizes, other weights
    model, tok, prov2 = load(str(folder))
    assert prov2["files"]["model.safetensors"]["size"] == prov["files"]["model.safetensors"]["size"]
    assert prov2["revision"] != prov["revision"]
    second = cache.get(model, tok, str(folder), prov2["revision"], TEXTS, [site])[site]
    assert second.key != first.key and cache.misses == 2, "the old activations must not be reused"
    assert not torch.equal(first.x, second.x)


def test_weight_hashes_are_remembered_until_the_file_changes(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "w.safetensors"
    path.write_bytes(b"a" * 1000)
    old = time.time() - 60
    os.utime(path, (old, old))
    calls: list[Path] = []
    real = bench.models._sha256
    monkeypatch.setattr(bench.models, "_sha256", lambda p: calls.append(p) or real(p))
    digest = file_sha256(path)
    assert file_sha256(path) == digest and len(calls) == 1, "an unchanged file is hashed once"
    path.write_bytes(b"b" * 1000)  # same size; a fresh mtime is never trusted
    assert file_sha256(path) != digest and file_sha256(path) != digest and len(calls) == 3
