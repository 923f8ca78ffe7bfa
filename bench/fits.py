"""Fitted features cached by content, so a rerun or a resume scores exactly the dictionary it fitted first.

key = sha256(activations key (model, revision, site, texts, cap/subset), the labels, the method's registry
name, its parameters as canonical JSON, FIT_CACHE_VERSION). An entry `<cache>/fits/<key>/` holds
`state.safetensors` (every tensor of the learned state, i.e. the attributes whose names end in `_`) and
`state.json` (the rest of that state as JSON, tensors and dataclasses referenced by name, and the fit's
wall-clock seconds). Entries are written to a temp folder, fsynced, then renamed into place; a corrupt
entry is refitted and replaced.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import importlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from bench.activations import Activations, cache_root, fsync
from bench.protocols import FeatureMethod

log = logging.getLogger(__name__)
FIT_CACHE_VERSION = 1
_MARKERS = ("__tensor__", "__tuple__", "__dataclass__")


def params_json(method: FeatureMethod) -> dict[str, Any]:
    """The method's hyperparameters (its dataclass fields) as plain JSON values."""
    return json.loads(json.dumps(dataclasses.asdict(method), default=str))  # type: ignore[call-overload]


def learned(method: FeatureMethod) -> list[str]:
    """Names of the learned attributes (`directions_`, `fit_metrics_`, ...), sorted."""
    return sorted(a for a in vars(method) if a.endswith("_") and not a.startswith("_"))


def fit_key(name: str, method: FeatureMethod, acts: Activations) -> str:
    """Content key of fitting `method` (registered as `name`, with its current parameters) on `acts`."""
    data = acts.key or _digest(acts.x)
    labels = None
    if acts.labels is not None:
        labels = hashlib.sha256(_bytes(acts.labels) + json.dumps(acts.concepts).encode()).hexdigest()
    spec = {"acts": data, "n_tokens": len(acts), "labels": labels, "method": name, "params": params_json(method),
            "version": FIT_CACHE_VERSION}
    return hashlib.sha256(json.dumps(spec, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:24]


@dataclass(frozen=True)
class Fit:
    """Where a method's fitted state came from."""

    key: str  # fit_key(...): stamped on every record computed from this fit
    seconds: float  # wall-clock seconds of the fit itself (the original fit when loaded from the cache)
    cached: bool  # True when the state was loaded from the cache instead of fitted


class FitCache:
    """Content-addressed store of fitted method state: <root>/fits/<key>/{state.safetensors, state.json}."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = (root or cache_root()) / "fits"

    def fit(self, name: str, method: FeatureMethod, acts: Activations) -> Fit:
        """Load `method`'s fitted state for `acts` from the cache, or fit it and store it. Mutates `method`."""
        key = fit_key(name, method, acts)
        seconds = self.load(key, method)
        if seconds is not None:
            log.info("fit: loaded %s %s from the fit cache (%s); not refitted", name, acts.site, key)
            return Fit(key, seconds, True)
        t0 = time.perf_counter()
        method.fit(acts)
        seconds = time.perf_counter() - t0
        self.save(key, method, name, seconds)
        return Fit(key, seconds, False)

    def load(self, key: str, method: FeatureMethod) -> float | None:
        """Set `method`'s learned attributes from entry `key`; the original fit's seconds, or None on a miss.

        An unreadable entry (truncated, corrupt, or of an older layout) counts as a miss and is refitted."""
        path = self.root / key
        if not (path / "state.json").exists():
            return None
        try:
            meta = json.loads((path / "state.json").read_text(encoding="utf-8"))
            tensors = load_file(str(path / "state.safetensors"))
            state = _decode(meta["state"], tensors, {})
            seconds = float(meta["fit_seconds"])
        except Exception as e:  # noqa: BLE001 - any damage to an entry means: fit again and replace it
            log.warning("fit cache entry %s is unreadable (%s: %s); fitting again", path, type(e).__name__, e)
            return None
        for attr, value in state.items():
            setattr(method, attr, value)
        return seconds

    def save(self, key: str, method: FeatureMethod, name: str, seconds: float) -> Path:
        """Store `method`'s learned state as entry `key` (atomically); refuse state that is not storable."""
        enc = _Encoder()
        state = {attr: enc.encode(getattr(method, attr), attr) for attr in learned(method)}
        meta = {"version": FIT_CACHE_VERSION, "key": key, "method": name, "params": params_json(method),
                "fit_seconds": seconds, "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                "state": state}
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.root / key
        for stale in self.root.glob(f".{key}-*"):  # left behind by a killed writer of this key
            if time.time() - stale.stat().st_mtime > 3600:
                shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(dir=self.root, prefix=f".{key}-"))
        try:
            save_file(enc.tensors, str(tmp / "state.safetensors"), metadata={"key": key})
            (tmp / "state.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
            for f in (tmp / "state.safetensors", tmp / "state.json", tmp):
                fsync(f)
            old = None
            if final.exists():  # a corrupt entry being replaced: move it aside first (rename needs a free name)
                old = Path(tempfile.mkdtemp(dir=self.root, prefix=f".{key}-old-"))
                os.replace(final, old / "entry")
            os.replace(tmp, final)
            fsync(self.root)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            if not (final / "state.json").exists():  # another process may have won the race
                raise
        return final


class _Encoder:
    """Learned state -> JSON tree; tensors go to `tensors` under their attribute path, once per object."""

    def __init__(self) -> None:
        self.tensors: dict[str, Tensor] = {}
        self.names: dict[int, str] = {}  # id(tensor) -> stored name, so aliases stay aliases

    def encode(self, value: Any, path: str) -> Any:
        if isinstance(value, Tensor):
            if id(value) not in self.names:
                self.names[id(value)] = path
                self.tensors[path] = value.detach().to("cpu").contiguous().clone()
            return {"__tensor__": self.names[id(value)], "device": str(value.device)}
        if value is None or isinstance(value, bool | int | float | str):
            return value
        if isinstance(value, list | tuple):
            items = [self.encode(v, f"{path}.{i}") for i, v in enumerate(value)]
            return {"__tuple__": items} if isinstance(value, tuple) else items
        if isinstance(value, dict):
            bad = [k for k in value if not isinstance(k, str) or k in _MARKERS]
            if bad:
                raise ValueError(f"cannot cache the fitted state {path}: dict key {bad[0]!r} is not a plain "
                                 f"string (keys must be str and not one of {', '.join(_MARKERS)})")
            return {k: self.encode(v, f"{path}.{k}") for k, v in value.items()}
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            cls = type(value)
            fields = {f.name: self.encode(getattr(value, f.name), f"{path}.{f.name}")
                      for f in dataclasses.fields(value)}
            return {"__dataclass__": f"{cls.__module__}:{cls.__qualname__}", "fields": fields}
        raise ValueError(f"cannot cache the fitted state {path} of type {type(value).__name__}: learned state "
                         f"must be tensors, JSON values (str, int, float, bool, None, lists, dicts with str "
                         f"keys), tuples or dataclasses of them")


def _decode(value: Any, tensors: dict[str, Tensor], moved: dict[str, Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors, moved) for v in value]
    if not isinstance(value, dict):
        return value
    if "__tensor__" in value:
        name = value["__tensor__"]
        if name not in moved:
            device = value["device"]
            if device.startswith("cuda") and not torch.cuda.is_available():
                device = "cpu"
            moved[name] = tensors[name].to(device)
        return moved[name]
    if "__tuple__" in value:
        return tuple(_decode(v, tensors, moved) for v in value["__tuple__"])
    if "__dataclass__" in value:
        cls = _dataclass(value["__dataclass__"])
        fields = {k: _decode(v, tensors, moved) for k, v in value["fields"].items()}
        init = {f.name for f in dataclasses.fields(cls) if f.init}
        obj = cls(**{k: v for k, v in fields.items() if k in init})
        for k, v in fields.items():
            if k not in init:
                object.__setattr__(obj, k, v)
        return obj
    return {k: _decode(v, tensors, moved) for k, v in value.items()}


def _dataclass(spec: str) -> type:
    """The dataclass named `module:qualname` (only dataclasses are ever built from a cache entry)."""
    module, _, qualname = spec.partition(":")
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    if not (isinstance(obj, type) and dataclasses.is_dataclass(obj)):
        raise TypeError(f"{spec} is not a dataclass")
    return obj


def _bytes(t: Tensor) -> bytes:
    raw = t.detach().to("cpu").contiguous().flatten().view(torch.uint8)  # any dtype, bfloat16 included
    return str((t.dtype, tuple(t.shape))).encode() + raw.numpy().tobytes()


def _digest(t: Tensor) -> str:
    return hashlib.sha256(_bytes(t)).hexdigest()
