"""Label writers shared by tasks: the run's LLM judge, or a small local model that completes few-shot prompts.

`writer(judge, model_id, device, max_new_tokens)` gives an object with a cached `complete(prompts, version)` and a
`name`: the judge itself when it can complete prompts (`--judge fake | openai:<model> | hf:<id>`), else (the
offline judge) the local model `model_id` behind the judge's SQLite cache. Answers are cached by (writer name,
prompt, decoding parameters, template version), so a rerun pays nothing.
"""

from __future__ import annotations

import copy
import logging
import os
import re
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import torch
from tqdm.auto import tqdm

from bench.judges.local import HFJudge

log = logging.getLogger(__name__)


def can_complete(judge: Any) -> bool:
    """Whether the judge writes text (an LLM judge); the offline grader refuses `complete`."""
    try:
        judge.complete([], "")
    except (ValueError, NotImplementedError, AttributeError, TypeError):
        return False
    return True


def local_name(model_id: str) -> str:
    """The cache name of the local labeler `model_id` (known without loading it)."""
    return f"hf:{model_id}/completion"


class LocalLabeler(HFJudge):
    """A local model that writes labels by plain completion of a few-shot prompt (no chat template): greedy,
    batched, `max_new_tokens` per label. Any `hf:` id works: an embedded one (smollm2-135m-gguf), a hub id or
    path, or `tiny:<arch>` in tests.

    The prompts of one call share the template's few-shot head; it runs through the model once and its KV cache
    is reused by every batch (left padding sits between head and rest; position ids follow the attention mask,
    so this equals running each prompt alone). When the head does not tokenize on its own exactly as inside the
    prompts, the plain path runs instead."""

    def __init__(self, model_id: str, device: str = "cpu", max_new_tokens: int = 10, batch_size: int = 16) -> None:
        super().__init__(model_id, device=device, max_new_tokens=max_new_tokens, batch_size=batch_size)
        self.name = local_name(model_id)

    def _format(self, prompt: str) -> str:
        return prompt

    def _stopping(self, prompt_len: int) -> Any:
        from transformers import StoppingCriteriaList

        return StoppingCriteriaList([FirstLine(self._tok, prompt_len)])

    def complete(self, prompts: list[str]) -> list[str | None]:
        head = shared_head(prompts)
        if not head:
            return super().complete(prompts)
        tok, model = self._tok, self._model
        special = not getattr(tok, "chat_template", None)  # as HFJudge: templated tokenizers add BOS themselves
        head_ids = tok(head, add_special_tokens=special)["input_ids"]
        tails = [p[len(head) :] for p in prompts]
        tail_ids = tok(tails, add_special_tokens=False)["input_ids"]
        whole = tok(prompts, add_special_tokens=special)["input_ids"]
        if any(head_ids + t != w for t, w in zip(tail_ids, whole, strict=True)):
            return super().complete(prompts)
        self.calls += len(prompts)
        head_t = torch.tensor([head_ids], device=self.device)
        with torch.no_grad():
            cache = model(input_ids=head_t, use_cache=True).past_key_values
        out: list[str | None] = []
        side, tok.padding_side = tok.padding_side, "left"
        try:
            for start in tqdm(range(0, len(prompts), self.batch_size), desc=self.name, leave=False,
                              disable=len(prompts) <= self.batch_size):
                enc = tok(tails[start : start + self.batch_size], return_tensors="pt", padding=True,
                          add_special_tokens=False).to(self.device)
                b = enc["input_ids"].shape[0]
                ids = torch.cat([head_t.expand(b, -1), enc["input_ids"]], 1)
                mask = torch.cat([torch.ones_like(head_t).expand(b, -1), enc["attention_mask"]], 1)
                past = copy.deepcopy(cache)
                past.batch_repeat_interleave(b)
                with torch.no_grad():
                    gen = model.generate(input_ids=ids, attention_mask=mask, past_key_values=past, do_sample=False,
                                         max_new_tokens=self.params["max_new_tokens"], pad_token_id=tok.pad_token_id,
                                         stopping_criteria=self._stopping(ids.shape[1]))
                out += tok.batch_decode(gen[:, ids.shape[1] :], skip_special_tokens=True)
        finally:
            tok.padding_side = side
        return out


class FirstLine:
    """A `generate` stopping criterion: a row is done once its new text has a non-blank line ended by a newline.

    Every reader of a completion (labels, sentences) keeps its first non-blank line, so decoding further only
    costs time: greedy rows are independent, so the kept line is the one an uncut decode gives (tested)."""

    def __init__(self, tokenizer: Any, prompt_len: int) -> None:
        self.tok, self.prompt_len = tokenizer, prompt_len

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        texts = self.tok.batch_decode(input_ids[:, self.prompt_len :], skip_special_tokens=True)
        done = [bool(re.search(r"\S[^\n]*\n", t)) for t in texts]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def shared_head(prompts: Sequence[str]) -> str:
    """The longest common prefix of `prompts` cut before its last blank line ('' for fewer than two prompts)."""
    if len(prompts) < 2:
        return ""
    common = os.path.commonprefix(list(prompts))
    return common[: max(common.rfind("\n\n"), 0)]


@lru_cache(maxsize=2)
def _loaded(model_id: str, device: str, batch_size: int) -> LocalLabeler:
    log.info("loading the local labeler %s", model_id)
    return LocalLabeler(model_id, device=device, batch_size=batch_size)


def local_labeler(model_id: str, device: str, max_new_tokens: int, batch_size: int = 16) -> LocalLabeler:
    """The local labeler, loaded once per process (every unit and task of a run shares the weights); each
    `max_new_tokens` gets its own light copy, whose value is part of its cache keys."""
    base = _loaded(model_id, device, batch_size)
    if base.params["max_new_tokens"] == max_new_tokens:
        return base
    out = copy.copy(base)
    out.params = {**base.params, "max_new_tokens": max_new_tokens}
    return out


def writer(judge: Any, model_id: str, device: str, max_new_tokens: int, batch_size: int = 16) -> Any:
    """The run's text writer: the judge if it completes prompts, else the local labeler behind its cache."""
    if can_complete(judge):
        return judge
    from bench.judge import JudgeCache, TemplateGrader

    cache = getattr(judge, "cache", None) or JudgeCache()
    return TemplateGrader(local_labeler(model_id, device, max_new_tokens, batch_size), cache)


def writer_name(judge: Any, model_id: str) -> str:
    """The name `writer(...)` would have, without loading a local model."""
    return judge.name if can_complete(judge) else local_name(model_id)


def complete_grouped(writer: Any, prompts: list[str], versions: list[str]) -> list[str | None]:
    """Cached completions, grouped by template version and sent shortest first (less padding per batch)."""
    out: list[str | None] = [None] * len(prompts)
    for version in dict.fromkeys(versions):
        idx = sorted((i for i, v in enumerate(versions) if v == version), key=lambda i: len(prompts[i]))
        for i, a in zip(idx, writer.complete([prompts[i] for i in idx], version), strict=True):
            out[i] = a
    return out


def clean_label(text: str | None) -> str | None:
    """The first non-empty line of a labeler's answer, without a `Label:`-style prefix, quotes or markdown
    (at most 200 characters); None for no answer."""
    if text is None:
        return None
    for line in text.strip().splitlines():
        line = re.sub(r"^\s*(label|description|answer|feature|summary)\s*:\s*", "", line.strip(" *#`"),
                      flags=re.IGNORECASE).strip(" *`")
        line = _unquote(line)
        if line:
            return line[:200]
    return None


def _unquote(line: str) -> str:
    """`line` without quotes around it, or without an unmatched quote at either end; inner quotes stay
    (`the word "colour"` keeps both of its quotes)."""
    while len(line) >= 2 and line[0] == line[-1] and line[0] in "\"'" and line[0] not in line[1:-1]:
        line = line[1:-1].strip()
    for q in "\"'":
        if line.count(q) % 2:
            if line.startswith(q):
                line = line[1:].strip()
            elif line.endswith(q) and q == '"':  # a trailing ' may be a possessive or an elision
                line = line[:-1].strip()
    return line
