"""BOS in activation collection: prepended for every model (GPT-2 included, as TransformerLens does in the paper's
reference code), never kept in A."""

from __future__ import annotations

import torch

from bench.activations import adds_bos, collect, tokenize
from bench.hooks import read
from bench.models import load
from bench.sites import Site

TEXTS = ["the cat sat on the mat", "a bird"]


def test_tiny_gpt2_tokenizer_adds_no_bos_like_gpt2() -> None:
    _, tok, _ = load("tiny:gpt2")
    assert tok.bos_token_id is not None and not adds_bos(tok)
    _, gemma_tok, _ = load("tiny:gemma2")
    assert adds_bos(gemma_tok)


def test_collection_prepends_bos_on_gpt2_and_drops_it_from_a() -> None:
    model, tok, _ = load("tiny:gpt2")
    site = Site(1, "resid")
    got = collect(model, tok, TEXTS, [site], batch_size=2, max_len=16)[site]
    bos = tok.bos_token_id
    assert bos not in got["token_ids"].tolist(), "BOS must not be in A"
    plain = tok(TEXTS[0], add_special_tokens=False)["input_ids"]
    rows = got["prompt_idx"] == 0
    assert got["token_ids"][rows].tolist() == plain, "every real token is kept, BOS only is dropped"
    assert got["position"][rows].tolist() == list(range(1, len(plain) + 1)), "positions count the BOS"
    with torch.no_grad():
        without = read(model, {"input_ids": torch.tensor([plain])}, [site])[site][0]  # [len, d]
        with_bos = read(model, {"input_ids": torch.tensor([[bos, *plain]])}, [site])[site][0]
    first = got["x"][rows][0]
    torch.testing.assert_close(first, with_bos[1], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(first, without[0], atol=1e-3), "the first real token must not be the attention sink"


def test_a_tokenizer_that_adds_bos_gets_no_second_one() -> None:
    _, tok, _ = load("tiny:gemma2")
    enc = tokenize(tok, TEXTS, max_len=16)
    assert (enc["input_ids"][:, 0] == tok.bos_token_id).all()
    assert (enc["input_ids"][:, 1] != tok.bos_token_id).all()
    assert not enc["keep"][:, 0].any()


def test_bos_counts_within_max_len() -> None:
    _, tok, _ = load("tiny:gpt2")
    enc = tokenize(tok, ["the cat sat on the mat and the dog"], max_len=4)
    assert enc["input_ids"].shape[1] == 4 and int(enc["keep"].sum()) == 3
