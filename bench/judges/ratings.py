"""Ratings: the items graders rate, their 0-2 ratings, the parser of a judge's `Rating: N` answer, and the
harmonic mean that combines them. A rating that cannot be parsed is None (unscored), never 0."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

ASPECTS = ("concept", "instruction", "fluency")
_RATING = re.compile(r"rating\s*[:=]?\s*\**\s*\[*\s*(-?\d+(?:\.\d+)?)", re.IGNORECASE)


def parse_rating(text: str | None, low: float = 0.0, high: float = 2.0) -> float | None:
    """The last `Rating: N` (or `Rating: [[N]]`) in `text`, or a bare number as the whole answer; None when absent
    or outside [low, high]. None means unscored; it is never read as 0."""
    if text is None:
        return None
    found = _RATING.findall(text)
    raw = found[-1] if found else text.strip().strip(".*[]")
    try:
        value = float(raw)
    except ValueError:
        return None
    return value if low <= value <= high else None


def harmonic_mean(values: Sequence[float | None]) -> float | None:
    """Harmonic mean of ratings: None if any is None, 0 if any is 0."""
    if not values or any(v is None for v in values):
        return None
    if any(v == 0 for v in values):  # type: ignore[comparison-overlap]
        return 0.0
    return len(values) / sum(1.0 / v for v in values)  # type: ignore[operator]


@dataclass(frozen=True)
class Item:
    """One steered generation to grade. `examples` (texts of the concept) are used by the offline grader."""

    instruction: str
    concept: str  # the concept's one-line description
    response: str
    examples: tuple[str, ...] = ()


@dataclass(frozen=True)
class Ratings:
    """Three 0-2 ratings (None = unscored) and the raw judge answers they were parsed from."""

    concept: float | None
    instruction: float | None
    fluency: float | None
    answers: Mapping[str, str | None] = field(default_factory=dict)

    @property
    def score(self) -> float | None:
        """The unit score: harmonic mean of the three ratings."""
        return harmonic_mean([self.concept, self.instruction, self.fluency])


@dataclass(frozen=True)
class FeatureRatings:
    """A text rated against a feature's label: concept and fluency (0-2; None = unscored, e.g. no label)."""

    concept: float | None
    fluency: float | None
    answers: Mapping[str, str | None] = field(default_factory=dict)

    @property
    def score(self) -> float | None:
        """The paper's per-generation score: harmonic mean of concept and fluency (0 if either is 0)."""
        return harmonic_mean([self.concept, self.fluency])


def parse_ratings(answers: Mapping[str, Sequence[str | None]]) -> list[Ratings]:
    """One `Ratings` per item from the judge's answers per aspect (`answers[aspect][i]`, one list per ASPECTS)."""
    n = len(answers[ASPECTS[0]])
    return [Ratings(*(parse_rating(answers[a][i]) for a in ASPECTS), answers={a: answers[a][i] for a in ASPECTS})
            for i in range(n)]


def parse_feature_ratings(concept: Mapping[int, str | None], fluency: Sequence[str | None]) -> list[FeatureRatings]:
    """One `FeatureRatings` per text from its fluency answer and, for the texts with a label (`concept`'s keys,
    indices into `fluency`), its concept answer; a text without a label is unscored for concept."""
    return [FeatureRatings(parse_rating(concept[i]) if i in concept else None, parse_rating(fluency[i]),
                           {"concept": concept.get(i), "fluency": fluency[i]}) for i in range(len(fluency))]
