"""Batched collection of activations at sites, with an explicit token mask (padding and special tokens dropped, never
zeroed): all at once in memory (`collect`) or a window of texts at a time (`windows`, what the shard store writes)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from bench.hooks import read
from bench.sites import Site


def adds_bos(tokenizer: Any) -> bool:
    """Whether `tokenizer` itself starts a text with its BOS token (Gemma, Llama: yes; GPT-2: no)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]


def tokenize(tokenizer: Any, texts: Sequence[str], max_len: int) -> dict[str, Tensor]:
    """Right-padded batch with `attention_mask` and `keep` = real, non-special tokens (BOS/EOS/padding out).

    Every text starts with BOS when the tokenizer has one, as TransformerLens (the paper's reference code) does for
    every model, GPT-2 included: a tokenizer that does not add it itself (GPT-2's) gets it prepended here, so the
    first real token is not the attention sink. BOS counts within `max_len` and is never kept."""
    prepend = not adds_bos(tokenizer) and getattr(tokenizer, "bos_token_id", None) is not None
    enc = tokenizer(
        list(texts),
        return_tensors="pt",
        padding=True,
        truncation=True,
        max_length=max_len - 1 if prepend else max_len,
        return_special_tokens_mask=True,
    )
    special = enc.pop("special_tokens_mask").bool()
    if prepend:
        ones = torch.ones(len(special), 1, dtype=enc["attention_mask"].dtype)
        enc["input_ids"] = torch.cat([ones.to(enc["input_ids"].dtype) * tokenizer.bos_token_id, enc["input_ids"]], 1)
        enc["attention_mask"] = torch.cat([ones, enc["attention_mask"]], 1)
        special = torch.cat([torch.ones(len(special), 1, dtype=torch.bool), special], 1)
        enc.pop("token_type_ids", None)
    enc["keep"] = enc["attention_mask"].bool() & ~special
    return dict(enc)


def collect(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    sites: Sequence[Site],
    batch_size: int = 16,
    max_len: int = 128,
    dtype: torch.dtype = torch.float32,
    desc: str = "activations",
) -> dict[Site, dict[str, Tensor]]:
    """Read `sites` over `texts` in batches: {site: {x [n_tokens, d], prompt_idx, position, token_ids}}, in memory.

    Tokens are selected by an explicit mask (padding and special tokens dropped, never zeroed). For data larger than
    memory, `ActivationCache.get` writes the same tokens to a shard store as it goes."""
    ((_, _, got),) = windows(model, tokenizer, texts, sites, batch_size, max_len, dtype, desc, window=len(texts))
    return got


def windows(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    sites: Sequence[Site],
    batch_size: int = 16,
    max_len: int = 128,
    dtype: torch.dtype = torch.float32,
    desc: str = "activations",
    start: int = 0,
    window: int = 256,
    sites_for: Any = None,
) -> Iterator[tuple[int, int, dict[Site, dict[str, Tensor]]]]:
    """Collection in windows of `window` texts from text `start`: (first text, end text, {site: columns}) per window,
    tokens in (prompt, position) order. Inside a window texts are batched by length (less padding).
    `sites_for(first, end)` may name fewer sites for a window (a resumed store that is further along)."""
    device = next((p.device for p in model.parameters() if p.device.type != "meta"), None)  # meta: offloaded
    if device is None:
        raise ValueError("every weight of the model is on the meta device (offloaded by accelerate); give "
                         "--device-map at least one real device")
    tokenizer.padding_side = "right"
    bar = tqdm(total=-(-(len(texts) - start) // batch_size), desc=desc, unit="batch", leave=False, disable=None)
    for first in range(start, len(texts), max(window, 1)):
        end = min(first + window, len(texts))
        here = list(sites_for(first, end)) if sites_for is not None else list(sites)
        parts: dict[Site, list[Tensor]] = {s: [] for s in here}
        meta: dict[str, list[Tensor]] = {"prompt_idx": [], "position": [], "token_ids": []}
        order = sorted(range(first, end), key=lambda i: len(texts[i]))  # length-sorted batches pad less
        for b in range(0, len(order), batch_size):
            rows = order[b : b + batch_size]
            enc = tokenize(tokenizer, [texts[i] for i in rows], max_len)
            keep = enc.pop("keep")
            batch = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
            out = read(model, batch, here)
            b_idx, pos = keep.nonzero(as_tuple=True)
            for site in here:  # under a device map each site's layer may live on its own device
                x = out[site]
                parts[site].append(x[b_idx.to(x.device), pos.to(x.device)].to("cpu", dtype))
            meta["prompt_idx"].append(torch.tensor(rows, dtype=torch.long)[b_idx])
            meta["position"].append(pos)
            meta["token_ids"].append(enc["input_ids"][b_idx, pos])
            bar.update(1)
        cols = {k: torch.cat(v).long() for k, v in meta.items()}
        order_back = torch.argsort(cols["prompt_idx"] * (max_len + 1) + cols["position"], stable=True)
        cols = {k: v[order_back].contiguous() for k, v in cols.items()}
        yield first, end, {s: {"x": torch.cat(parts[s])[order_back].contiguous(), **cols} for s in here}
    bar.close()
