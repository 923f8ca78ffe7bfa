"""The offline judge's fluency NLL (`bench.judges.offline.mean_token_nll`): the chunked unembedding gives the mean
token NLL of the full-logits computation on every model family (soft-capping and right padding included)."""

from __future__ import annotations

import pytest
import torch

from bench.judges.offline import CHUNKED_NLL_TYPES, mean_token_nll
from bench.sites import ARCHS


def _full(model: torch.nn.Module, enc: dict[str, torch.Tensor]) -> torch.Tensor:
    logp = torch.log_softmax(model(**enc, use_cache=False).logits[:, :-1].float(), -1)
    token = -logp.gather(-1, enc["input_ids"][:, 1:, None])[..., 0]
    mask = enc["attention_mask"][:, 1:].float()
    return (token * mask).sum(1) / mask.sum(1).clamp(min=1)


@pytest.mark.parametrize("chunk", [3, 128])
def test_chunked_nll_equals_the_full_logits(tiny, chunk: int) -> None:  # noqa: ANN001
    model, _, arch = tiny
    g = torch.Generator().manual_seed(0)
    vocab = model.get_output_embeddings().weight.shape[0]
    ids = torch.randint(3, vocab, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # right padding, as the judge tokenizes
    mask[2, 2:] = 0  # a row with one predicted token
    enc = {"input_ids": ids, "attention_mask": mask}
    with torch.inference_mode():
        got, want = mean_token_nll(model, enc, chunk=chunk), _full(model, enc)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=arch)


def test_models_without_a_separate_head_take_the_full_path(tiny) -> None:  # noqa: ANN001
    model, _, _ = tiny

    class Whole(torch.nn.Module):  # a causal LM exposing neither backbone nor output embedding
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, **kw: torch.Tensor):  # noqa: ANN202
            return self.inner(**kw)

    ids = torch.randint(3, 50, (2, 5), generator=torch.Generator().manual_seed(1))
    enc = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.inference_mode():
        torch.testing.assert_close(mean_token_nll(Whole(), enc), _full(model, enc))


def _batch() -> dict[str, torch.Tensor]:
    ids = torch.randint(3, 50, (2, 6), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[0, 4:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def test_soft_capping_is_applied_like_the_model() -> None:
    from bench.models import load

    model, _, _ = load("tiny:gemma2")
    enc, cap = _batch(), model.config.final_logit_softcapping
    try:
        model.config.final_logit_softcapping = 0.3  # strong enough to change every NLL (the tiny logits are ~0.5)
        with torch.inference_mode():
            capped, full = mean_token_nll(model, enc), _full(model, enc)
            model.config.final_logit_softcapping = None
            uncapped = mean_token_nll(model, enc)
    finally:
        model.config.final_logit_softcapping = cap
    torch.testing.assert_close(capped, full, rtol=1e-5, atol=1e-5)
    assert (capped - uncapped).abs().min() > 1e-3


def test_only_the_supported_families_take_the_chunked_path(monkeypatch: pytest.MonkeyPatch) -> None:
    from bench.models import load

    assert set(ARCHS) == CHUNKED_NLL_TYPES
    model, _, _ = load("tiny:llama")
    calls: list[int] = []
    monkeypatch.setattr(model, "get_decoder", lambda: calls.append(1) or model.model)
    with torch.inference_mode():
        mean_token_nll(model, _batch())
        assert calls == [1]
        monkeypatch.setattr(model.config, "model_type", "cohere")  # scales its logits: must not be chunked
        torch.testing.assert_close(mean_token_nll(model, _batch()), _full(model, _batch()))
    assert calls == [1]
