"""The steering engine (bench.steer): greedy decoding equals `generate` token for token (left padding, per-row
steering, EOS), the sampling distribution equals `generate`'s logits warpers, sampling is seeded, BOS is prepended
where the tokenizer adds none, and the batched KL bisection hits its targets, flags unreachable ones and equals the
reference's per-row bisection."""

from __future__ import annotations

import math

import pytest
import torch
from tokenizers import processors
from transformers.generation import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from bench.hooks import steer
from bench.models import load, tiny_tokenizer
from bench.sites import Site, layers_of, n_layers, site_dim
from bench.steer import (
    EPS,
    Bisection,
    KLProbe,
    Sampling,
    bisect,
    bisect_one,
    calibrate,
    left_pad,
    next_token_distribution,
    prompt_ids,
    sample,
)

TEXTS = ["the cat sat on the mat and", "a dog", "i think that the big red house is on the hill"]


def _generate(model, rows, pad, site=None, vectors=None, **kw):  # noqa: ANN001, ANN003, ANN202
    """Hugging Face `generate` on left-padded rows, steered like `sample` (new tokens per row)."""
    ids, mask = left_pad(rows, pad)
    hook = steer(model, site, vectors[:, None, :]) if site is not None else torch.no_grad()
    with hook, torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, pad_token_id=pad, **kw)
    return out[:, ids.shape[1] :].tolist()


@pytest.mark.parametrize("kind", ["mlp", "resid"])
def test_greedy_decoding_equals_generate_with_left_padding_and_per_row_steering(tiny, kind: str) -> None:  # noqa: ANN001
    model, tok, _ = tiny
    rows = [prompt_ids(tok, t) for t in TEXTS]
    assert len({len(r) for r in rows}) == 3, "rows of different lengths: the batch is left-padded"
    site = Site(1, kind)
    d = model.config.intermediate_size if kind == "mlp" and hasattr(model.config, "intermediate_size") else None
    d = d or (64 if kind == "mlp" else 32)
    vectors = 3.0 * torch.randn(len(rows), d, generator=torch.Generator().manual_seed(1))
    n = 24  # prompt + new tokens pass the tiny Gemma's sliding window of 16
    mine = sample(model, rows, Sampling(max_new_tokens=n, temperature=0), site=site, vectors=vectors,
                  pad_id=tok.pad_token_id, batch_size=3)
    theirs = _generate(model, rows, tok.pad_token_id, site, vectors, do_sample=False, max_new_tokens=n)
    assert mine == theirs
    plain = sample(model, rows, Sampling(max_new_tokens=n, temperature=0), pad_id=tok.pad_token_id)
    assert plain == _generate(model, rows, tok.pad_token_id, do_sample=False, max_new_tokens=n)
    assert plain != mine, "the steering vectors change the generations"
    alone = [sample(model, [r], Sampling(max_new_tokens=n, temperature=0), site=site, vectors=v[None],
                    pad_id=tok.pad_token_id)[0] for r, v in zip(rows, vectors, strict=True)]
    assert alone == mine, "a left-padded row decodes as it would alone"


def test_stop_at_eos_per_row_equals_generate() -> None:
    model, tok, _ = load("tiny:gpt2")
    rows = [prompt_ids(tok, t) for t in TEXTS]
    free = sample(model, rows, Sampling(max_new_tokens=12, temperature=0), pad_id=tok.pad_token_id)
    eos = next(t for t in free[2][2:] if t not in free[2][:2])  # a token row 2 emits mid-way: its "EOS"
    mine = sample(model, rows, Sampling(max_new_tokens=12, temperature=0, stop_at_eos=True), pad_id=tok.pad_token_id,
                  eos_id=eos)
    theirs = _generate(model, rows, tok.pad_token_id, do_sample=False, max_new_tokens=12, eos_token_id=eos)
    for m, t, f in zip(mine, theirs, free, strict=True):
        assert m == (t[: t.index(eos) + 1] if eos in t else t) == (f[: f.index(eos) + 1] if eos in f else f)
    assert eos in mine[2] and len(mine[2]) < 12


@pytest.mark.parametrize(("temperature", "top_k", "top_p"), [(1.0, 30, 1.0), (0.7, 30, 0.3), (1.3, 0, 0.9),
                                                             (1.0, 5, 0.5), (2.0, 1, 1.0), (1.0, 0, 1.0)])
def test_sampling_distribution_equals_generates_warpers(temperature: float, top_k: int, top_p: float) -> None:
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(6, 400, generator=g)
    logits[1, :8] = logits[1].max() + 1  # eight tokens tied at the top: top-k keeps every tie
    logits[2, 10:50] = logits[2].max()
    warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)] + ([TopKLogitsWarper(top_k)] if top_k else [])
                                  + ([TopPLogitsWarper(top_p)] if top_p < 1 else []))
    expected = torch.softmax(warpers(torch.zeros(6, 1, dtype=torch.long), logits.clone()), -1)
    ids, probs = next_token_distribution(logits, Sampling(temperature=temperature, top_k=top_k, top_p=top_p))
    got = torch.zeros_like(logits).scatter_add_(1, ids, probs)
    plain = [0, 3, 4, 5]  # rows without ties
    torch.testing.assert_close(got[plain], expected[plain], atol=1e-6, rtol=1e-5)
    # rows 1 and 2: which of several tied tokens top-p cuts is arbitrary in both (sort order); the rest is equal
    torch.testing.assert_close(got.sort(-1).values, expected.sort(-1).values, atol=1e-6, rtol=1e-5)
    if top_k:
        assert ids.shape[1] < 400, "top-k never sorts the whole vocabulary"


def test_draws_follow_the_distribution_and_are_seeded() -> None:
    logits = torch.randn(1, 50, generator=torch.Generator().manual_seed(0)).expand(40000, 50)
    s = Sampling(temperature=0.8, top_k=6, top_p=0.9)
    from bench.steer import _choose

    draws = _choose(logits, s, torch.Generator().manual_seed(0))
    ids, probs = next_token_distribution(logits[:1], s)
    freq = torch.bincount(draws, minlength=50).float() / len(draws)
    expected = torch.zeros(50).scatter_add_(0, ids[0], probs[0])
    assert (freq - expected).abs().max() < 0.01
    assert set(draws.tolist()) <= set(ids[0][probs[0] > 0].tolist())
    model, tok, _ = load("tiny:gpt2")
    rows = [prompt_ids(tok, t) for t in TEXTS]
    kw = dict(pad_id=tok.pad_token_id, batch_size=2)
    a, b = (sample(model, rows, Sampling(max_new_tokens=8), seed=3, **kw) for _ in range(2))
    assert a == b and sample(model, rows, Sampling(max_new_tokens=8), seed=4, **kw) != a


def test_bos_is_prepended_where_the_tokenizer_adds_none() -> None:
    tok = tiny_tokenizer()  # adds <bos> itself, like Gemma's and Llama's
    assert prompt_ids(tok, "i think that")[0] == tok.bos_token_id
    assert prompt_ids(tok, "i think that").count(tok.bos_token_id) == 1
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single="$A", special_tokens=[])  # GPT-2-like
    assert tok("i think that")["input_ids"][0] != tok.bos_token_id
    assert prompt_ids(tok, "i think that") == [tok.bos_token_id, *tok("i think that")["input_ids"]]


# ----------------------------------------------------------------------------------------------- KL calibration
def _kl_alone(model, site: Site, prompt: list[int], vector: torch.Tensor) -> float:  # noqa: ANN001
    """The reference's KL, computed independently: one unpadded prompt, full logits, steered vs unsteered."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        p = torch.softmax(model(input_ids=ids).logits[0, -1].float(), -1)
        with steer(model, site, vector):
            q = torch.softmax(model(input_ids=ids).logits[0, -1].float(), -1)
    return float((p * ((p + EPS).log() - (q + EPS).log())).sum())


def _directions(n: int, d: int, seed: int = 0) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_reached_alphas_hit_their_targets_and_unreachable_targets_are_recorded() -> None:
    model, tok, _ = load("tiny:gpt2")  # a random tiny model's KL saturates near 0.01 nats
    site, prompts = Site(0, "mlp"), [prompt_ids(tok, "i think that"), prompt_ids(tok, "the cat sat on the mat")]
    dirs = _directions(3, 64)
    b = Bisection(tolerance=0.001)
    index = torch.arange(3).repeat_interleave(4)
    targets = torch.tensor([0.002, 0.004, 0.006, 50.0]).repeat(3)
    cal = calibrate(model, site, prompts, dirs, index, targets, b, batch_size=5, pad_id=tok.pad_token_id)
    assert cal.reached.tolist() == [t < 1 for t in targets.tolist()], "50 nats is out of reach; the rest are hit"
    assert torch.isnan(cal.alpha[targets == 50]).all() and torch.isnan(cal.kl[targets == 50]).all()
    for j in torch.nonzero(cal.reached)[:, 0].tolist():
        vec = dirs[index[j]] * float(cal.alpha[j])
        kl = sum(_kl_alone(model, site, p, vec) for p in prompts) / len(prompts)  # mean over the prompts
        assert abs(kl - float(targets[j])) < b.tolerance
        assert kl == pytest.approx(float(cal.kl[j]), abs=1e-5)
    assert (cal.alpha[index == 0][:3].diff() > 0).all(), "a larger target needs a larger alpha"


def test_batched_bisection_equals_the_reference_per_row_bisection() -> None:
    model, tok, _ = load("tiny:llama")
    site, prompts = Site(0, "mlp"), [prompt_ids(tok, "i think that")]
    dirs = torch.cat([_directions(3, 64, seed=2), -_directions(3, 64, seed=2)])  # both signs
    probe = KLProbe(model, site, prompts, dirs, batch_size=64, pad_id=tok.pad_token_id)
    reach = probe(torch.zeros(2, dtype=torch.long), torch.tensor([3.0, 30.0], dtype=torch.float64))  # in the bracket
    index = torch.arange(6).repeat_interleave(3)
    targets = torch.tensor([*reach.tolist(), 1.0]).repeat(6)
    b = Bisection(tolerance=0.0005)
    forwards = probe.forwards
    batched = bisect(probe, index, targets, b)
    assert probe.forwards - forwards == b.steps, "one batched forward per bisection step"
    for j in range(len(targets)):
        alpha, kl = bisect_one(lambda a, j=j: float(probe(index[j : j + 1], torch.tensor([a], dtype=torch.float64))),
                               float(targets[j]), b)
        if alpha is None:
            assert math.isnan(batched.alpha[j]) and math.isnan(batched.kl[j])
        else:
            assert float(batched.alpha[j]) == pytest.approx(alpha, rel=1e-9)
            assert float(batched.kl[j]) == pytest.approx(kl, abs=1e-6)
    assert batched.reached.any() and not batched.reached.all()


@pytest.mark.parametrize("kind", ["mlp", "mlp_out", "resid"])
def test_kl_probe_started_at_the_steered_layer_equals_the_full_forward(tiny, kind: str) -> None:  # noqa: ANN001
    """Layers before the steered one replay their recorded output (left-padded prompts of several lengths,
    per-row prompt order): the KLs equal those of full forwards, and the model is left as it was."""
    model, tok, arch = tiny
    layer = n_layers(model) - 1
    assert layer >= 1, "the tiny models need two layers for this test"
    site = Site(layer, kind)
    prompts = [prompt_ids(tok, "i think that"), prompt_ids(tok, "the cat sat on the mat today"), prompt_ids(tok, "a")]
    dirs = _directions(4, site_dim(model, site), seed=3)
    index, alpha = torch.tensor([0, 1, 2, 3, 1]), torch.tensor([0.5, 2.0, 8.0, 30.0, 3.0], dtype=torch.float64)
    fast = KLProbe(model, site, prompts, dirs, batch_size=4, pad_id=tok.pad_token_id)
    full = KLProbe(model, site, prompts, dirs, batch_size=4, pad_id=tok.pad_token_id, skip_prefix=False)
    assert fast.prefix == layer and fast.recorded is not None and full.recorded is None
    got, want = fast(index, alpha), full(index, alpha)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    assert (want > 0).all(), arch
    assert not any("forward" in m.__dict__ for m in layers_of(model)), "replay_prefix restored every layer"
    rec = fast.recorded  # the replay is what runs: a zeroed record changes the KLs
    fast.recorded = rec * 0 if isinstance(rec, torch.Tensor) else tuple(
        r * 0 if isinstance(r, torch.Tensor) else r for r in rec)
    assert not torch.allclose(fast(index, alpha), want, rtol=1e-3, atol=1e-6)
