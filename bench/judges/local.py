"""Local judges: the deterministic keyword judge of the tests and a local Hugging Face chat model."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from typing import Any

from tqdm.auto import tqdm

_SECTION = re.compile(r"<(concept|instruction|response)>(.*?)</\1>", re.DOTALL)
_STOP = frozenset({
    "about", "above", "after", "again", "also", "because", "been", "before", "being", "below", "between", "both",
    "could", "does", "doing", "during", "each", "from", "further", "have", "having", "here", "into", "itself",
    "just", "more", "most", "only", "other", "over", "same", "should", "some", "such", "than", "that", "their",
    "them", "then", "there", "these", "they", "this", "those", "through", "under", "until", "very", "what", "when",
    "where", "which", "while", "whom", "will", "with", "would", "your", "text", "written", "sentence", "words",
})


def _content_words(text: str) -> set[str]:
    return {w for w in re.findall(r"[a-z]{4,}", text.lower()) if w not in _STOP}


_TOKEN_LINE = re.compile(r"^Token: `(.*?)` \|", re.MULTILINE)  # a feature-label template's evidence lines
_DESCRIPTION = re.compile(r"<description>(.*?)</description>", re.DOTALL)  # a sentence-generation template
_PREVIOUS = re.compile(r"<previous>(.*?)</previous>", re.DOTALL)
FAKE_NEUTRAL = ("The bus arrived ten minutes late this morning.", "She folded the towels and put them away.",
                "Our neighbours painted their fence last weekend.", "He wrote the date at the top of the page.",
                "The library closes early on public holidays.", "They walked along the river after lunch.")


def _fake_text(prompt: str) -> str | None:
    """Feature labels: the most frequent shown token (ties: the first shown), NO THEME when every token is blank.
    Sentences: an activating one names the description; a neutral one is the next of FAKE_NEUTRAL."""
    tokens = _TOKEN_LINE.findall(prompt)
    if tokens:
        counts = Counter(t.strip().lower() for t in tokens if t.strip())
        if not counts:
            return "Analysis: every token is blank.\nResults: NO THEME"
        return f"Analysis: the most frequent token.\nResults: {counts.most_common(1)[0][0]}"
    description = _DESCRIPTION.search(prompt)
    if description is None:
        return None
    previous = _PREVIOUS.search(prompt)
    k = len([line for line in (previous.group(1) if previous else "").splitlines() if line.strip(" -")])
    if "unrelated" in prompt:
        return FAKE_NEUTRAL[k % len(FAKE_NEUTRAL)]
    return f"Example {k + 1} is about {description.group(1).strip()}."


def fake_answer(prompt: str) -> str:
    """The fake judge's deterministic answer to a rendered template (keyword rules). Steering: concept 2 if a
    content word of the concept occurs in the response, else 0; instruction 2 if a content word of the
    instruction does, else 0; fluency 2 if at least 70% of the response's words are distinct, 1 if 40%, else 0
    (and 0 for fewer than 3 words). Feature labels and sentences: see `_fake_text`. Any other prompt gets an
    answer without a rating."""
    text = _fake_text(prompt)
    if text is not None:
        return text
    sections = dict(_SECTION.findall(prompt))
    response = sections.get("response")
    if response is None:
        return "I cannot rate this."
    if "concept" in sections:
        hit = _content_words(sections["concept"]) & _content_words(response)
        return f"Keywords found: {sorted(hit)}.\nRating: {2 if hit else 0}"
    if "instruction" in sections:
        hit = _content_words(sections["instruction"]) & _content_words(response)
        return f"Keywords found: {sorted(hit)}.\nRating: {2 if hit else 0}"
    words = response.lower().split()
    distinct = len(set(words)) / max(len(words), 1)
    rating = 0 if len(words) < 3 else 2 if distinct >= 0.7 else 1 if distinct >= 0.4 else 0
    return f"Distinct words: {distinct:.2f}.\nRating: {rating}"


class FakeJudge:
    """Deterministic keyword judge for tests (see `fake_answer`); `calls` doubles as the cache assertion."""

    def __init__(self, answer: Callable[[str], str | None] = fake_answer) -> None:
        self.name = self.model = "fake"
        self.params: dict[str, Any] = {"rules": "keywords-v1"}
        self.calls = 0
        self._answer = answer

    def complete(self, prompts: list[str]) -> list[str | None]:
        self.calls += len(prompts)
        return [self._answer(p) for p in prompts]


class HFJudge:
    """A local transformers chat model as judge (`hf:<path or id>`, or an embedded id such as
    `hf:smollm2-135m-gguf`): the chat template when the tokenizer has one, greedy decoding, batched."""

    def __init__(self, model_id: str, device: str = "cpu", max_new_tokens: int = 64, batch_size: int = 8) -> None:
        from bench.fastlinear import use_fast_linears
        from bench.models import EMBEDDED, load

        if model_id in EMBEDDED or model_id.startswith("tiny:"):
            self._model, self._tok, _ = load(model_id, device)
        else:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            self._model = AutoModelForCausalLM.from_pretrained(model_id, dtype="auto").eval().to(device)
            use_fast_linears(self._model)
            self._tok = AutoTokenizer.from_pretrained(model_id)
            if self._tok.pad_token is None:
                self._tok.pad_token = self._tok.eos_token
        self.model, self.name, self.device = model_id, f"hf:{model_id}", device
        self.params = {"do_sample": False, "max_new_tokens": max_new_tokens}
        self.batch_size = batch_size
        self.calls = 0

    def _stopping(self, prompt_len: int) -> Any:
        """Stopping criteria of `generate` for prompts of `prompt_len` tokens (None: max_new_tokens only)."""
        return None

    def _format(self, prompt: str) -> str:
        if getattr(self._tok, "chat_template", None):
            return self._tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                 add_generation_prompt=True)
        return prompt

    def complete(self, prompts: list[str]) -> list[str | None]:
        import torch

        self.calls += len(prompts)
        out: list[str | None] = []
        side, self._tok.padding_side = self._tok.padding_side, "left"
        try:
            for start in tqdm(range(0, len(prompts), self.batch_size), desc=self.name, leave=False,
                              disable=len(prompts) <= self.batch_size):
                texts = [self._format(p) for p in prompts[start : start + self.batch_size]]
                templated = bool(getattr(self._tok, "chat_template", None))  # the template adds BOS itself
                enc = self._tok(texts, return_tensors="pt", padding=True,
                                add_special_tokens=not templated).to(self.device)
                with torch.no_grad():
                    gen = self._model.generate(**enc, do_sample=False, max_new_tokens=self.params["max_new_tokens"],
                                               pad_token_id=self._tok.pad_token_id,
                                               stopping_criteria=self._stopping(enc["input_ids"].shape[1]))
                out += self._tok.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        finally:
            self._tok.padding_side = side
        return out
