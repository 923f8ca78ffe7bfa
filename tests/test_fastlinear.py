"""The fast CPU linear layout (bench.fastlinear): logits equal to float32 rounding and the same greedy tokens as
torch's stock `nn.Linear` on every supported model family, steering hooks included; the stock path where the
layout does not apply; off with FEATBENCH_FAST_LINEAR=0."""

from __future__ import annotations

import pytest
import torch

from bench.fastlinear import MAX_ROWS, enabled, fast_linear_forward, use_fast_linears
from bench.models import load
from bench.sites import Site
from bench.steer import Sampling, left_pad, sample


def _stock(model: torch.nn.Module) -> list[torch.nn.Linear]:
    """Strip the fast layout from `model`; returns the modules that had it."""
    had = [m for m in model.modules() if type(m) is torch.nn.Linear and "forward" in m.__dict__]
    for m in had:
        del m.forward
    return had


@pytest.mark.parametrize(("d_out", "chunk"), [(11, 1), (11, 2), (11, 5), (11, 10), (11, 11), (11, 1024), (12, 3),
                                              (12, 4), (12, 6)])  # last block short, of one row, exact, the only one
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(5, 7), (2, 3, 7), (1, 7), (3, 7, "transposed"), (300, 7), (0, 7)])
def test_forward_equals_linear(shape: tuple, bias: bool, d_out: int, chunk: int,  # noqa: ANN001
                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("bench.fastlinear.CHUNK", chunk)
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(7, d_out, bias=bias)
    if shape[-1] == "transposed":  # a non-contiguous input
        shape = shape[:1]
        x = torch.randn(7, *shape, generator=g).t()
        assert not x.is_contiguous()
    else:
        x = torch.randn(*shape, 7, generator=g)
    got = fast_linear_forward(lin, x)
    assert got.shape == (*x.shape[:-1], d_out) and got.is_contiguous()
    torch.testing.assert_close(got, torch.nn.functional.linear(x, lin.weight, lin.bias), rtol=1e-6, atol=1e-6)


def test_weight_gradients_through_the_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Weights that need a gradient (an input that does not) take the blocked path, and its gradients are
    torch's."""
    monkeypatch.setattr("bench.fastlinear.CHUNK", 3)
    lin = torch.nn.Linear(7, 11)
    x = torch.randn(4, 7)
    fast_linear_forward(lin, x).square().sum().backward()
    got = lin.weight.grad.clone(), lin.bias.grad.clone()
    lin.zero_grad()
    torch.nn.functional.linear(x, lin.weight, lin.bias).square().sum().backward()
    torch.testing.assert_close(got, (lin.weight.grad, lin.bias.grad), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("chunk", [0, -4])
def test_a_bad_block_size_is_refused(chunk: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("bench.fastlinear.CHUNK", chunk)
    with pytest.raises(ValueError, match=f"CHUNK={chunk}: expected a positive"):
        fast_linear_forward(torch.nn.Linear(3, 5), torch.randn(2, 3))


def test_grad_and_other_dtypes_take_the_stock_path(monkeypatch: pytest.MonkeyPatch) -> None:
    lin = torch.nn.Linear(4, 3)

    def no_mm(*_a: object, **_k: object) -> None:
        raise AssertionError("the fast layout ran")

    monkeypatch.setattr(torch, "mm", no_mm)
    x = torch.randn(2, 4, requires_grad=True)
    fast_linear_forward(lin, x).sum().backward()
    assert x.grad is not None and lin.weight.grad is not None
    many = torch.randn(MAX_ROWS + 1, 4)  # above the rows measured
    assert torch.equal(fast_linear_forward(lin, many), torch.nn.functional.linear(many, lin.weight, lin.bias))
    for dtype in (torch.bfloat16, torch.float64):  # a module cast after the layout was installed
        cast = torch.nn.Linear(4, 3).to(dtype)
        assert fast_linear_forward(cast, torch.randn(2, 4, dtype=dtype)).dtype == dtype
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fast_linear_forward(lin, torch.randn(2, 4)).dtype == torch.bfloat16
    big = torch.nn.Linear(4, 20000)
    with pytest.raises(AssertionError, match="the fast layout ran"):  # while a few float32 rows do use it
        fast_linear_forward(big, torch.randn(2, 4))
    big = torch.nn.Linear(4, 20000)
    assert use_fast_linears(big.to(torch.bfloat16)) == 0  # only float32 modules change
    assert use_fast_linears(torch.nn.Linear(4, 3)) == 0  # only unembedding-sized ones
    assert use_fast_linears(big.float()) == 1


def test_every_family_gives_the_same_logits_and_greedy_tokens(tiny, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    model, tok, arch = tiny
    _stock(model)
    monkeypatch.setattr("bench.fastlinear.MIN_OUT", 1)
    n_linear = use_fast_linears(model)
    assert n_linear == sum(type(m) is torch.nn.Linear for m in model.modules()) > 0
    ids, mask = left_pad([[5, 6, 7, 8, 9], [10, 11, 12]], 0)
    site = Site(1, "mlp_out")
    vec = torch.randn(2, model.config.hidden_size if hasattr(model.config, "hidden_size") else model.config.n_embd)
    greedy = Sampling(6, 0.0, 0, 1.0)
    with torch.inference_mode():
        fast_logits = model(input_ids=ids, attention_mask=mask).logits
    fast_tokens = sample(model, [[5, 6, 7, 8, 9], [10, 11, 12]], greedy, site=site, vectors=vec)
    had = _stock(model)
    try:
        with torch.inference_mode():
            stock_logits = model(input_ids=ids, attention_mask=mask).logits
        stock_tokens = sample(model, [[5, 6, 7, 8, 9], [10, 11, 12]], greedy, site=site, vectors=vec)
    finally:
        _stock(model)
        monkeypatch.undo()
        use_fast_linears(model)  # back to what load() gives
    assert len(had) == n_linear
    torch.testing.assert_close(fast_logits, stock_logits, rtol=1e-5, atol=1e-5)
    assert fast_tokens == stock_tokens, arch


def test_env_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEATBENCH_FAST_LINEAR", "0")
    assert not enabled()
    monkeypatch.setattr("bench.fastlinear.MIN_OUT", 1)
    model, _, _ = load("tiny:llama")
    assert not any("forward" in m.__dict__ for m in model.modules())
    monkeypatch.setenv("FEATBENCH_FAST_LINEAR", "1")
    assert use_fast_linears(model) > 0
    monkeypatch.setenv("FEATBENCH_FAST_LINEAR", "maybe")
    with pytest.raises(ValueError, match="FEATBENCH_FAST_LINEAR='maybe'"):
        enabled()


def test_stock_layout_switches_back_and_restores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("bench.fastlinear.MIN_OUT", 1)
    from bench.fastlinear import stock_layout

    model, _, _ = load("tiny:llama")
    fast = [m for m in model.modules() if "forward" in m.__dict__]
    assert fast
    with stock_layout(model) as n:
        assert n == len(fast) and not any("forward" in m.__dict__ for m in model.modules())
    assert [m for m in model.modules() if "forward" in m.__dict__] == fast
    assert all(m.forward.__func__ is fast_linear_forward for m in fast)


def _before_blocks(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """The layout the committed records were made with (up to 618ecc7): one (W @ x^T)^T over all of W, then a
    transpose, at most 128 rows; torch's `F.linear` above."""
    flat = x.reshape(-1, x.shape[-1])
    if flat.shape[0] > 128:
        return torch.nn.functional.linear(x, self.weight, self.bias)
    return torch.mm(self.weight, flat.t()).t().contiguous().view(*x.shape[:-1], self.weight.shape[0])


@pytest.mark.slow
def test_blocks_give_the_earlier_logits_on_the_default_model() -> None:
    """The blocked layout left the committed records valid: on gemma-3-270m its logits equal, to the bit, those of
    the layout they were made with, at decoding, calibration and scoring shapes up to `MAX_ROWS` rows, on 2
    threads (the machine's, as the default run uses)."""
    import types

    model, _, _ = load("gemma-3-270m-gguf")
    head = model.get_output_embeddings()
    assert head.forward.__func__ is fast_linear_forward
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(0)
    try:
        for rows, length, keep in [(1, 7, 1), (2, 7, 1), (3, 5, 1), (5, 5, 1), (7, 5, 1), (16, 9, 1), (32, 6, 1),
                                   (64, 6, 1), (128, 6, 1), (256, 6, 1), (4, 30, 0), (16, 30, 0), (16, 32, 0)]:
            ids = torch.randint(10, 5000, (rows, length), generator=g)
            got = []
            for forward in (fast_linear_forward, _before_blocks):
                head.forward = types.MethodType(forward, head)
                with torch.inference_mode():
                    got.append(model(input_ids=ids, use_cache=False, logits_to_keep=keep).logits)
            assert torch.equal(*got), (rows, length, float((got[0] - got[1]).abs().max()))
    finally:
        head.forward = types.MethodType(fast_linear_forward, head)
        torch.set_num_threads(threads)
