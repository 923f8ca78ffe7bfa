"""The only code that touches torch hooks: `read()` activations at sites, `steer()` by adding a vector, and
`capture_layer()` / `replay_prefix()` to run a forward from a layer on a recorded prefix."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from bench.sites import Site, layers_of, module_for


class _StopForward(Exception):
    """Raised by a hook after the deepest requested site, to skip the rest of the forward pass."""


def _first(out: Any) -> Tensor:
    """The hidden state of a module output: transformers 4.x returns tuples, 5.x a bare tensor."""
    return out[0] if isinstance(out, tuple) else out


def _attach_reader(model: nn.Module, site: Site, store: dict[Site, Tensor]) -> Any:
    module = module_for(model, site)
    if site.kind == "mlp":  # the MLP hidden state is the down-projection's input

        def pre(_m: nn.Module, args: tuple[Any, ...]) -> None:
            store[site] = args[0].detach()

        return module.register_forward_pre_hook(pre)

    def post(_m: nn.Module, _args: tuple[Any, ...], out: Any) -> None:
        store[site] = _first(out).detach()

    return module.register_forward_hook(post)


def read(
    model: nn.Module, batch: Mapping[str, Tensor], sites: Sequence[Site], stop_early: bool = True
) -> dict[Site, Tensor]:
    """Activations of every site in one forward pass: {site: [batch, seq, d_site]}.

    With `stop_early` the pass is aborted once the deepest requested layer has run."""
    if not sites:
        raise ValueError("read() needs at least one site")
    store: dict[Site, Tensor] = {}
    with ExitStack() as stack:
        for site in sites:
            stack.callback(_attach_reader(model, site, store).remove)
        if stop_early:
            last = layers_of(model)[max(s.layer for s in sites)]

            def stop(_m: nn.Module, _a: tuple[Any, ...], _o: Any) -> None:
                raise _StopForward

            stack.callback(last.register_forward_hook(stop).remove)
        try:
            with torch.no_grad():
                model(**batch, use_cache=False)
        except _StopForward:
            pass
    return {s: store[s] for s in sites}


@contextmanager
def steer(model: nn.Module, site: Site, vector: Tensor) -> Iterator[None]:
    """Add `vector` ([d_site]) at every position of `site` for any forward or generate() call inside."""
    module = module_for(model, site)
    if site.kind == "mlp":

        def pre(_m: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
            return (args[0] + vector.to(args[0]), *args[1:])

        handle = module.register_forward_pre_hook(pre)
    else:

        def post(_m: nn.Module, _args: tuple[Any, ...], out: Any) -> Any:
            if isinstance(out, tuple):
                return (out[0] + vector.to(out[0]), *out[1:])
            return out + vector.to(out)

        handle = module.register_forward_hook(post)
    try:
        yield
    finally:
        handle.remove()


def _rows(out: Any, rows: Tensor) -> Any:
    """A layer output (a tensor, or a tuple whose tensors lead with the batch) restricted to batch `rows`."""
    if isinstance(out, tuple):
        return tuple(o[rows.to(o.device)] if isinstance(o, Tensor) else o for o in out)
    return out[rows.to(out.device)]  # a device map may keep layer L-1 on another device than the inputs


@contextmanager
def capture_layer(model: nn.Module, layer: int) -> Iterator[dict[str, Any]]:
    """Record the whole output of decoder layer `layer` (as the model's loop receives it) of the forward passes
    inside, in the yielded dict under "out"."""
    got: dict[str, Any] = {}

    def post(_m: nn.Module, _a: tuple[Any, ...], out: Any) -> None:
        got["out"] = out

    handle = layers_of(model)[layer].register_forward_hook(post)
    try:
        yield got
    finally:
        handle.remove()


@contextmanager
def replay_prefix(model: nn.Module, layer: int, recorded: Any, rows: Tensor) -> Iterator[None]:
    """Skip decoder layers 0 .. layer - 1: each returns `recorded` (the output of layer - 1 from an earlier pass
    over the same left-padded prompts, see `capture_layer`) at batch rows `rows` [b], so the forward inside
    starts computing at `layer`. Exact when nothing before `layer` is hooked (steering at a site of `layer` or
    deeper) and the batch holds those prompts, in the order `rows` gives."""
    if layer <= 0:
        yield
        return
    out = _rows(recorded, rows)
    skipped = list(layers_of(model))[:layer]

    def skip(*_args: Any, **_kwargs: Any) -> Any:
        return out

    saved = [module.__dict__.get("forward") for module in skipped]  # an instance forward (accelerate's) comes back
    for module in skipped:
        module.forward = skip
    try:
        yield
    finally:
        for module, forward in zip(skipped, saved, strict=True):
            if forward is None:
                del module.forward
            else:
                module.forward = forward
