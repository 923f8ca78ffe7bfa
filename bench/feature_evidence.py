"""What a feature's labels are written from (arXiv 2506.10920, reference `experiments/snmf_interp/`):

- input side, `top_tokens`: the feature's largest activations over the fit data (the train split), each with the
  token's context of +-`window` tokens from the same text. For SNMF they are the fitted coefficients Y kept by
  the fit (`top_codes_`, `top_prompt_`, `top_position_`), as the reference reads its fitted G; for any other
  method (or an SNMF fit cached before those were kept) the codes of `encode` over the train split, found with a
  running top-k over token chunks (never a [tokens, features] tensor). Codes <= 0 are discarded (reference).
- output side, `vocab_lists`: the unit direction's image through the rest of the model to the logits, for +d and
  -d separately, as the reference's `generate_vocab_proj.py` computes it (below).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench.activations import Activations
from bench.features import running_topk
from bench.protocols import FeatureMethod
from bench.sites import Site, arch_of, layers_of, to_module

log = logging.getLogger(__name__)
ENCODE_CHUNK = 4096


def top_codes(method: FeatureMethod, acts: Activations, features: Sequence[int], n_top: int) -> tuple[Tensor, Tensor]:
    """The `n_top` largest codes of each feature over `acts`, descending: (values [f, n_top], token index into
    `acts` [f, n_top]); index -1 (value -inf) pads a feature with fewer tokens."""
    feats = torch.tensor(list(features), dtype=torch.long)
    kept = getattr(method, "top_codes_", None)
    if kept is not None and kept.shape[1] >= min(n_top, len(acts)):
        found = _kept_tokens(method, acts, feats, n_top)
        if found is not None:
            return found
        log.warning("labels: the kept SNMF codes do not point into these activations; encoding them instead")
    vals, idx = running_topk(method, acts, feats.tolist(), n_top, ENCODE_CHUNK)
    pad = n_top - vals.shape[1]
    if pad > 0:
        vals = torch.cat([vals, torch.full((len(feats), pad), float("-inf"))], 1)
        idx = torch.cat([idx, torch.full((len(feats), pad), -1)], 1)
    return vals, idx


def _kept_tokens(method: Any, acts: Activations, feats: Tensor, n_top: int) -> tuple[Tensor, Tensor] | None:
    """The fit's own top codes mapped to token indices of `acts` by (prompt, position); None if any is absent."""
    vals = method.top_codes_[feats, :n_top].float().cpu()
    prompt, pos = method.top_prompt_[feats, :n_top].cpu(), method.top_position_[feats, :n_top].cpu()
    width = int(max(int(acts.position.max()), int(pos.max())) + 1) if len(acts) else 1
    keys = acts.prompt_idx.long() * width + acts.position.long()
    order = torch.argsort(keys)
    want = prompt * width + pos
    at = torch.searchsorted(keys[order], want.flatten()).clamp_max(len(keys) - 1)
    idx = order[at].reshape(want.shape)
    if not torch.equal(keys[idx], want):
        return None
    return vals, idx


class TextIndex:
    """The tokens of `acts` grouped by text in position order, to cut contexts without a scan per token."""

    def __init__(self, acts: Activations) -> None:
        width = int(acts.position.max()) + 1 if len(acts) else 1
        self.order = torch.argsort(acts.prompt_idx.long() * width + acts.position.long())  # [n] text-major order
        self.rank = torch.empty_like(self.order)
        self.rank[self.order] = torch.arange(len(self.order))
        self.prompt = acts.prompt_idx[self.order]
        self.ids = acts.token_ids[self.order]

    def context(self, index: int, window: int, tokenizer: Any) -> tuple[str, str, tuple[int, int]]:
        """(token, context, (start, end) of the token in the context) of token `index` of the activations: up to
        `window` tokens either side from the same text (BOS and padding are not in the activations). The token is
        decoded alone (GPT-2's leading space kept), the context as one piece of text, newlines as spaces."""
        at = int(self.rank[index])
        p = self.prompt[at]
        first = int(torch.searchsorted(self.prompt, p))
        last = int(torch.searchsorted(self.prompt, p, right=True))
        lo, hi = max(first, at - window), min(last, at + window + 1)
        ids = self.ids[lo:hi].tolist()
        k = at - lo
        before, upto, whole = (tokenizer.decode(ids[:k]), tokenizer.decode(ids[: k + 1]), tokenizer.decode(ids))
        span = (len(before), len(upto)) if upto.startswith(before) and whole.startswith(upto) else (0, 0)
        return tokenizer.decode([ids[k]]), whole.replace("\n", " ").replace("\r", " "), span


def marked(context: str, span: tuple[int, int], token: str) -> str:
    """`context` with the token at `span` wrapped as [[token]] (appended when its place is unknown)."""
    a, b = span
    if b <= a:
        return f"{context} [[{token.strip()}]]"
    lead = " " if context[a:b].startswith(" ") else ""
    return f"{context[:a]}{lead}[[{context[a:b].strip()}]]{context[b:]}".strip()


def vocab_lists(model: nn.Module, site: Site, directions: Tensor, n: int,
                chunk: int = 64) -> tuple[Tensor, Tensor]:
    """The `n` tokens each unit direction promotes most, for +d and -d separately, through the rest of the model.

    As the reference code (its `generate_vocab_proj.py`), with Hugging Face modules:
    - `mlp` site: h = W_down d without the MLP's output bias (the reference omits `b_out`); on Gemma h goes through
      the post-feed-forward norm first, and the sign is applied after that norm (the reference's
      `c = ln2_post(b_out + W_out z)`, then +-c); `resid` and `mlp_out` sites: h = d.
    - logits = unembed(final_norm(+-h)) of the lone vector, no residual stream: the final norm's own gain and bias
      are applied (GPT-2's `ln_f` bias included, as TransformerLens folds it into its unembedding bias), no final
      logit soft-capping (TransformerLens applies none here either).
    - scores: the logits minus their mean over the vocabulary (TransformerLens's `center_unembed`, so the scores
      the labeler sees are the reference's); not centred for models with final soft-capping (TransformerLens
      turns centring off for them). The ranking is the same either way.

    directions [f, d_site] -> (token ids [f, 2, n], scores [f, 2, n]); [:, 0] for +d, [:, 1] for -d, descending."""
    paths = arch_of(model)
    block = layers_of(model)[site.layer]
    norm, unembed = model.get_submodule(paths.final_norm), model.get_output_embeddings()
    center = not getattr(model.config, "final_logit_softcapping", None)
    dtype = next(model.parameters()).dtype
    n = min(n, unembed.weight.shape[0])
    ids, vals = [], []
    with torch.no_grad():
        for start in range(0, len(directions), chunk):
            h = F.normalize(directions[start : start + chunk].float(), dim=-1).to(dtype)  # [c, d_site]
            if site.kind == "mlp":
                down = block.get_submodule(paths.down)
                h = to_module(down, h)
                h = down(h) - down(torch.zeros_like(h[:1]))  # W_down d, without b_out
                if paths.mlp_out != paths.mlp:  # Gemma's post-feed-forward norm
                    post = block.get_submodule(paths.mlp_out)
                    h = post(to_module(post, h))
            signed = []
            for s in (1.0, -1.0):
                logits = unembed(to_module(unembed, norm(to_module(norm, s * h)))).float()  # [c, vocab]
                if center:
                    logits = logits - logits.mean(-1, keepdim=True)
                signed.append(logits.topk(n, dim=-1))
            ids.append(torch.stack([t.indices for t in signed], 1).cpu())
            vals.append(torch.stack([t.values for t in signed], 1).cpu())
    if not ids:
        return torch.zeros(0, 2, n, dtype=torch.long), torch.zeros(0, 2, n)
    return torch.cat(ids), torch.cat(vals)
