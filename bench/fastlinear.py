"""A faster layout for the unembedding on CPU, equal to float32 rounding.

`F.linear(x, W)` computes x @ W^T. On CPU builds of torch with MKL, that layout runs well below the machine's
matmul rate when W is tall: the unembedding (lm_head) of a model with a large vocabulary, e.g. gemma-3-270m's
[262144, 640]. featbench computes the same dot products as (W_c @ x^T)^T for blocks W_c of `CHUNK` rows of W,
each written into its columns of the output. A block's product and its transpose are far smaller working sets
than one product over all of W and the transpose of its [V, n] result (our reading of why it is faster; the
speed itself is measured). `bench perf linear_layout` times both layouts at the rows of a decoding step, a
labelling batch, a calibration batch and a scoring pass, up to `MAX_ROWS`, the largest row count measured;
above it torch's layout stays. `use_fast_linears(model)` gives every float32 `nn.Linear` of a CPU model with at
least `MIN_OUT` outputs this layout; the smaller linears of the blocks keep torch's (the layout targets tall W;
the benchmark times two of them for reference).

The two layouts take the same dot products over the same inputs, but MKL may block the sum differently: at some
row counts (e.g. 16 and 32 here) they agree to the bit, at others (2, 3, 5, 7) they differ in the last bits
(about 1e-6 of a logit). That is float rounding, like a change of thread count, yet it can move a greedy
near-tie or a bisection hit at the tolerance's edge, so every run records the setting in env.json
(`fast_linear`). `tests/test_fastlinear.py` checks logits and greedy tokens on every model family we support.
`FEATBENCH_FAST_LINEAR=0` turns the layout off. Weights stay where they are (tied embeddings
stay tied); on other devices or dtypes, and for inputs that need a gradient, the modules run torch's own
forward."""

from __future__ import annotations

import contextlib
import logging
import os
import types
from collections.abc import Iterator

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)
ENV = "FEATBENCH_FAST_LINEAR"
MIN_OUT = 16384  # outputs: vocabularies, not the blocks' projections
CHUNK = 1024  # rows of W per product (`bench perf linear_layout --chunks` measures others)
MAX_ROWS = 512  # input rows: up to a scoring batch (16 texts x 30 tokens); above, torch's layout (not measured)


def fast_linear_forward(self: nn.Linear, x: Tensor) -> Tensor:
    """`nn.Linear.forward` as (W_c @ x^T)^T per block W_c of `CHUNK` rows of W: x [..., d_in] -> [..., d_out]
    (float32 CPU tensors of at most `MAX_ROWS` rows that need no gradient, outside autocast; else torch's own
    path). Not for `torch.vmap` (the blocks are written in place)."""
    flat = x.reshape(-1, x.shape[-1])  # [n, d_in]
    if (x.dtype != torch.float32 or x.device.type != "cpu" or self.weight.dtype != torch.float32 or x.requires_grad
            or flat.shape[0] > MAX_ROWS or torch.is_autocast_enabled("cpu")):
        return nn.functional.linear(x, self.weight, self.bias)
    chunk = CHUNK
    if chunk < 1:
        raise ValueError(f"bench.fastlinear.CHUNK={chunk}: expected a positive number of rows of W per product")
    xt, w = flat.t(), self.weight  # [d_in, n], [d_out, d_in]
    out = flat.new_empty((flat.shape[0], w.shape[0]))  # [n, d_out]
    for start in range(0, w.shape[0], chunk):
        out[:, start : start + chunk] = torch.mm(w[start : start + chunk], xt).t()  # [n, c]
    if self.bias is not None:
        out += self.bias
    return out.view(*x.shape[:-1], w.shape[0])


def enabled() -> bool:
    """Whether the fast layout is on (`FEATBENCH_FAST_LINEAR`, default 1)."""
    value = os.environ.get(ENV, "1").strip().lower()
    if value not in ("0", "1", "false", "true", "no", "yes", "off", "on", ""):
        raise ValueError(f"{ENV}={value!r}: expected 1 (on, the default) or 0 (off)")
    return value not in ("0", "false", "no", "off")


def use_fast_linears(model: nn.Module) -> int:
    """Give every float32 CPU `nn.Linear` of `model` with at least `MIN_OUT` outputs the fast layout (an
    instance-level forward, in place); returns how many modules changed. A no-op when `FEATBENCH_FAST_LINEAR=0`."""
    if not enabled():
        return 0
    n = 0
    for module in model.modules():
        if (type(module) is nn.Linear and module.weight.device.type == "cpu"
                and module.weight.dtype == torch.float32 and module.out_features >= MIN_OUT
                and "forward" not in module.__dict__):
            module.forward = types.MethodType(fast_linear_forward, module)
            n += 1
    log.debug("fast CPU linear layout on %d modules", n)
    return n


@contextlib.contextmanager
def stock_layout(model: nn.Module) -> Iterator[int]:
    """Inside the block, every module `use_fast_linears` changed runs torch's own `nn.Linear.forward` again (for
    benchmarks that compare against a stock model); yields how many modules were switched back."""
    changed = [m for m in model.modules() if m.__dict__.get("forward") is not None
               and getattr(m.__dict__["forward"], "__func__", None) is fast_linear_forward]
    for m in changed:
        del m.forward
    try:
        yield len(changed)
    finally:
        for m in changed:
            m.forward = types.MethodType(fast_linear_forward, m)
