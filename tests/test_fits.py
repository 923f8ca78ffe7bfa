"""The fit cache: every method's fitted state survives a save/load exactly; keys follow data and parameters."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from bench import registry
from bench.fits import FitCache, fit_key, learned
from bench.sites import Site
from tests.conftest import planted_acts
from tests.test_contract import FAST

registry.discover()


def _method(name: str):  # noqa: ANN202 - any registered method
    factory = registry.METHODS[name]
    fields = {f.name for f in dataclasses.fields(factory)}
    return factory(**{k: v for k, v in FAST.get(name, {}).items() if k in fields})


@pytest.mark.parametrize("name", sorted(registry.METHODS))
def test_every_method_reloads_exactly_the_state_it_fitted(name: str, tmp_path: Path) -> None:
    cache = FitCache(tmp_path)
    fitted = _method(name)
    acts = planted_acts(d=24, kind=fitted.site.kind)
    first = cache.fit(name, fitted, acts)
    assert not first.cached
    fresh = _method(name)
    fresh.fit = lambda _acts: pytest.fail("a cached fit must not be refitted")  # type: ignore[method-assign]
    again = cache.fit(name, fresh, acts)
    assert again.cached and again.key == first.key and again.seconds == first.seconds
    assert learned(fresh) == learned(fitted)
    torch.testing.assert_close(fresh.directions_, fitted.directions_, rtol=0, atol=0)
    torch.testing.assert_close(fresh.encode(acts.x), fitted.encode(acts.x), rtol=0, atol=0)
    for attr in learned(fitted):
        if not isinstance(getattr(fitted, attr), torch.Tensor):
            assert repr(getattr(fresh, attr)) == repr(getattr(fitted, attr)), attr


def test_the_key_follows_parameters_data_and_labels() -> None:
    acts = planted_acts(d=24, kind="mlp")
    dim = registry.METHODS["dim"]
    base = fit_key("dim", dim(), acts)
    assert fit_key("dim", dim(), acts) == base
    assert fit_key("dim", dim(normalize=False), acts) != base
    assert fit_key("dim", dim(site=Site(1, "mlp")), acts) != base
    assert fit_key("other", dim(), acts) != base
    assert fit_key("dim", dim(), planted_acts(d=24, kind="mlp", seed=1)) != base  # other tokens
    relabelled = dataclasses.replace(acts, labels=acts.labels.roll(1, dims=1))
    assert fit_key("dim", dim(), relabelled) != base  # same tokens, other concept labels
    renamed = dataclasses.replace(acts, concepts=["a", "b", "c"])
    assert fit_key("dim", dim(), renamed) != base
    keyed = dataclasses.replace(acts, key="acts-key-1")
    assert fit_key("dim", dim(), keyed) != fit_key("dim", dim(), dataclasses.replace(acts, key="acts-key-2"))


@dataclasses.dataclass
class _Inner:
    w: torch.Tensor
    site: Site
    note: str | None = None


@dataclasses.dataclass
class _Stateful:
    """A method with every kind of storable state: aliases, tuples, nested dataclasses, metrics."""

    site: Site = dataclasses.field(default_factory=lambda: Site(0, "resid"))
    bad: bool = False

    def fit(self, acts):  # noqa: ANN001, ANN201
        self.directions_ = acts.x[:3].clone()
        self.inner_ = _Inner(self.directions_, Site(2, "mlp"))
        self.shape_ = (3, {"k": [1, 2.5, None]})
        self.fit_metrics_ = {"loss": 0.25, "nan": float("nan")}
        if self.bad:
            self.lookup_ = {1: "int keys do not survive JSON"}
        return self

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.directions_.T


def test_nested_state_round_trips_with_aliases(tmp_path: Path) -> None:
    cache, acts = FitCache(tmp_path), planted_acts(d=24)
    cache.fit("stateful", _Stateful(), acts)
    got = _Stateful()
    assert cache.fit("stateful", got, acts).cached
    assert got.inner_.w is got.directions_, "a tensor stored under two names must stay one tensor"
    assert got.inner_.site == Site(2, "mlp") and got.shape_ == (3, {"k": [1, 2.5, None]})
    assert got.fit_metrics_["loss"] == 0.25 and got.fit_metrics_["nan"] != got.fit_metrics_["nan"]


def test_state_that_json_cannot_hold_is_refused_loudly(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"cannot cache the fitted state lookup_: dict key 1"):
        FitCache(tmp_path).fit("stateful", _Stateful(bad=True), planted_acts(d=24))
    with pytest.raises(ValueError, match="cannot cache the fitted state x_ of type set"):
        method = _Stateful()
        method.x_ = {1, 2}
        FitCache(tmp_path).save("k", method, "stateful", 0.0)


def test_a_corrupt_entry_is_refitted_and_replaced(tmp_path: Path) -> None:
    cache, acts = FitCache(tmp_path), planted_acts(d=24)
    key = cache.fit("stateful", _Stateful(), acts).key
    state = tmp_path / "fits" / key / "state.safetensors"
    state.write_bytes(state.read_bytes()[:40])  # truncated by a crash or a full disk
    fitted = cache.fit("stateful", _Stateful(), acts)
    assert not fitted.cached and fitted.key == key
    assert cache.fit("stateful", _Stateful(), acts).cached, "the rebuilt entry is used next time"
    assert json.loads((tmp_path / "fits" / key / "state.json").read_text())["key"] == key
    assert [p.name for p in (tmp_path / "fits").iterdir()] == [key], "no temp or broken folders left"
