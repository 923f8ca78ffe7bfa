"""Every registered method passes the FeatureMethod contract (a new method file is tested at once)."""

from __future__ import annotations

import dataclasses

import pytest

from bench import registry
from bench.checks import check_method
from tests.conftest import planted_acts

registry.discover()

# small settings so the contract runs fast; a method not listed here runs with its defaults
FAST = {
    "snmf": {"n_features": 6, "max_iter": 30},
    "sae": {"d_sae": 16, "k": 4, "n_steps": 50},
    "snmf_deep": {"ranks": (6, 3), "max_iter": 30, "fine_tune_steps": 10},
}


@pytest.mark.parametrize("name", sorted(registry.METHODS))
def test_method_contract(name: str) -> None:
    factory = registry.METHODS[name]
    fields = {f.name for f in dataclasses.fields(factory)}
    params = {k: v for k, v in FAST.get(name, {}).items() if k in fields}
    method = factory(**params)
    kind = method.site.kind
    acts = planted_acts(d=24, kind=kind)
    check_method(method, acts)


def test_contract_catches_a_broken_method() -> None:
    @dataclasses.dataclass
    class Broken:
        site: object = dataclasses.field(default_factory=lambda: planted_acts().site)

        def fit(self, acts):  # noqa: ANN001, ANN202
            self.directions_ = acts.x[:2]
            return None  # breaks the contract

        def encode(self, x):  # noqa: ANN001, ANN202
            return x @ self.directions_.T

    with pytest.raises(AssertionError, match="fit\\(\\) must return self"):
        check_method(Broken(), planted_acts())


def test_registry_rejects_unknown_names() -> None:
    with pytest.raises(ValueError, match="unknown method 'dimm'; known: .*dim"):
        registry.lookup(registry.METHODS, "method", "dimm")
