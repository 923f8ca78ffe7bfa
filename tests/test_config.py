from __future__ import annotations

import dataclasses
import json

import pytest

from bench.config import RunConfig, build, parse_params, shipped_config
from bench.sites import Site, resolve_layers
from methods.dim import DiffInMeans


def test_shipped_configs_parse() -> None:
    for name in ("default", "smoke"):
        cfg = RunConfig.load(shipped_config(name))
        assert cfg.models == ("gemma-3-270m-gguf",)


def test_cli_overrides_file(tmp_path) -> None:  # noqa: ANN001
    path = tmp_path / "c.toml"
    path.write_text('models = ["tiny:gpt2"]\nseed = 3\n[method.dim]\nnormalize = false\n')
    cfg = RunConfig.load(path, {"seed": 7, "layers": "0,middle", "method": {"dim": {"site": "mlp"}}})
    assert cfg.seed == 7 and cfg.models == ("tiny:gpt2",) and cfg.layers == (0, "middle")
    assert cfg.method["dim"] == {"normalize": False, "site": "mlp"}
    assert RunConfig.from_dict(cfg.to_dict()) == cfg, "config.json round-trips to the same config"


@pytest.mark.parametrize("name", sorted(p.stem for p in shipped_config("default").parent.glob("*.toml")))
def test_every_shipped_config_round_trips_through_json(name: str) -> None:
    cfg = RunConfig.load(shipped_config(name))
    back = RunConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg and back.to_dict() == cfg.to_dict()
    assert dataclasses.replace(cfg, seed=cfg.seed + 1) != cfg, "equality must see a changed field"


def test_unknown_setting_is_refused(tmp_path) -> None:  # noqa: ANN001
    path = tmp_path / "c.toml"
    path.write_text("modles = ['x']\n")
    with pytest.raises(ValueError, match="unknown setting.*modles.*valid: "):
        RunConfig.load(path)


def test_method_params_are_coerced_and_checked() -> None:
    params = parse_params(["dim.normalize=false", "dim.site=mlp@3"], "-M")
    dim = build(DiffInMeans, params["dim"], "method", "dim")
    assert dim.normalize is False and dim.site == Site(3, "mlp")
    msg = r"unknown method parameter\(s\) dim.normalise; valid for dim: chunk_tokens, features_of, normalize, site"
    with pytest.raises(ValueError, match=msg):
        build(DiffInMeans, {"normalise": "true"}, "method", "dim")
    with pytest.raises(ValueError, match="expected NAME.FIELD=VALUE"):
        parse_params(["dim=3"], "-M")


def test_layer_names_resolve_over_depth() -> None:
    assert resolve_layers(["early", "middle", "late"], 18) == [3, 9, 14]
    assert resolve_layers([0, -1], 4) == [0, 3]
    with pytest.raises(ValueError, match="out of range: the model has 2 layers"):
        resolve_layers([99], 2)
    with pytest.raises(ValueError, match="bad layer 'mid'"):
        resolve_layers(["mid"], 2)


def test_tuple_fields_are_coerced_item_by_item() -> None:
    from dataclasses import dataclass

    @dataclass
    class T:
        factors: tuple[float, ...] = (1.0,)
        names: tuple[str, ...] = ()

    t = build(T, {"factors": "0.5,2", "names": "a,b"}, "task", "t")
    assert t.factors == (0.5, 2.0) and t.names == ("a", "b")


def test_a_ray_address_is_ignored_by_the_local_executor_so_a_ray_run_resumes_locally() -> None:
    from bench.config import RunConfig

    cfg = RunConfig(executor="ray", ray_address="auto").with_overrides({"executor": "local"})
    assert cfg.executor == "local" and cfg.ray_address == "auto"
    with pytest.raises(ValueError, match="bad ray_address ' '"):
        RunConfig(executor="ray", ray_address=" ")
