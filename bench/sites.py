"""Where activations are read and steering vectors are added, per architecture."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import Tensor, nn

SiteKind = Literal["resid", "mlp", "mlp_out"]
SITE_KINDS: tuple[str, ...] = ("resid", "mlp", "mlp_out")


@dataclass(frozen=True)
class Site:
    """A point in the model: `resid` = decoder-layer output [d_model]; `mlp` = the MLP hidden state, i.e. the
    input of the down-projection [d_mlp]; `mlp_out` = the MLP block's output as it joins the residual stream
    [d_model] (for Gemma: after the post-feed-forward norm, as TransformerLens's `hook_mlp_out`)."""

    layer: int
    kind: SiteKind = "resid"

    def __post_init__(self) -> None:
        if self.kind not in SITE_KINDS:
            raise ValueError(f"unknown site kind {self.kind!r}; known: {', '.join(SITE_KINDS)}")

    def __str__(self) -> str:
        return f"{self.kind}@{self.layer}"

    @classmethod
    def parse(cls, text: str, layer: int = 0) -> Site:
        """`"mlp"` -> Site(layer, "mlp"); `"mlp@3"` -> Site(3, "mlp")."""
        kind, _, at = text.partition("@")
        return cls(int(at) if at else layer, kind)  # type: ignore[arg-type]


@dataclass(frozen=True)
class ArchPaths:
    """Dotted module paths: the decoder-layer list, then (inside one layer) the MLP module, its
    down-projection, the module whose output is `mlp_out`, then (from the model root) the final norm."""

    layers: str
    mlp: str
    down: str
    mlp_out: str
    final_norm: str


ARCHS: dict[str, ArchPaths] = {
    "gpt2": ArchPaths("transformer.h", "mlp", "mlp.c_proj", "mlp", "transformer.ln_f"),
    "gemma2": ArchPaths("model.layers", "mlp", "mlp.down_proj", "post_feedforward_layernorm", "model.norm"),
    "gemma3_text": ArchPaths(
        "model.layers", "mlp", "mlp.down_proj", "post_feedforward_layernorm", "model.norm"
    ),
    "llama": ArchPaths("model.layers", "mlp", "mlp.down_proj", "mlp", "model.norm"),
    "qwen2": ArchPaths("model.layers", "mlp", "mlp.down_proj", "mlp", "model.norm"),
    "mistral": ArchPaths("model.layers", "mlp", "mlp.down_proj", "mlp", "model.norm"),
}


def arch_of(model: nn.Module) -> ArchPaths:
    """The path row for `model`'s architecture (its config's `model_type`)."""
    model_type = getattr(model.config, "model_type", None)
    if model_type not in ARCHS:
        raise ValueError(
            f"unsupported architecture {model_type!r}; supported: {', '.join(sorted(ARCHS))} "
            "(add a row to bench.sites.ARCHS)"
        )
    return ARCHS[model_type]


def layers_of(model: nn.Module) -> nn.ModuleList:
    """The decoder-layer list of `model`."""
    return model.get_submodule(arch_of(model).layers)


def n_layers(model: nn.Module) -> int:
    return len(layers_of(model))


def check_layer(model: nn.Module, layer: int) -> None:
    n = n_layers(model)
    if not 0 <= layer < n:
        name = getattr(model.config, "_name_or_path", "") or model.config.model_type
        raise ValueError(f"layer {layer} is out of range for {name}: it has {n} layers (valid: 0..{n - 1})")


def module_for(model: nn.Module, site: Site) -> nn.Module:
    """The module whose output (`resid`, `mlp_out`) or input (`mlp`) is `site`."""
    check_layer(model, site.layer)
    paths, layer = arch_of(model), layers_of(model)[site.layer]
    if site.kind == "resid":
        return layer
    return layer.get_submodule(paths.down if site.kind == "mlp" else paths.mlp_out)


def to_module(module: nn.Module, x: Tensor) -> Tensor:
    """`x` moved to the device of `module`'s weights, to call the module directly: under a device map layers live
    on different devices (a module accelerate offloads, its weights on `meta`, moves its inputs itself)."""
    p = next(module.parameters(), None)
    return x if p is None or p.device.type == "meta" else x.to(p.device)


def down_proj(model: nn.Module, layer: int) -> nn.Module:
    """The down-projection of `layer` (its input is the `mlp` site)."""
    return module_for(model, Site(layer, "mlp"))


def site_dim(model: nn.Module, site: Site) -> int:
    """Width of `site`: d_mlp for `mlp`, d_model otherwise."""
    cfg = model.config
    if site.kind == "mlp":
        return int(getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None) or 4 * cfg.n_embd)
    return int(getattr(cfg, "hidden_size", None) or cfg.n_embd)


def resolve_layers(spec: list[int | str], n: int) -> list[int]:
    """Layer spec -> sorted unique ints. Names `early`, `middle`, `late` sit at 1/6, 1/2, 5/6 of depth;
    negative ints count from the end."""
    named = {"early": n // 6, "middle": n // 2, "late": n - 1 - n // 6}
    out: list[int] = []
    for item in spec:
        if isinstance(item, str) and item in named:
            value = named[item]
        else:
            try:
                value = int(item)
            except ValueError:
                raise ValueError(
                    f"bad layer {item!r}; use an integer (0..{n - 1}) or one of early, middle, late"
                ) from None
            if value < 0:
                value += n
        if not 0 <= value < n:
            raise ValueError(f"layer {item} is out of range: the model has {n} layers (valid: 0..{n - 1})")
        out.append(value)
    return sorted(set(out))
