"""Labels of every feature (the paper's feature-centric protocol, step 1; arXiv 2506.10920).

Each selected feature (every feature, or a seeded sample of `max_features`: `bench.feature_labels.select_features`)
gets an input-side label from its top activating tokens of the fit data and one output-side label per sign from
the vocabulary its direction promotes (`bench.feature_labels`). The labels are the artifact `feature_steering` and
`feature_detection` read through `ctx.labels`; they are stored under the cache, so whichever task asks first pays.

Records, per feature (`feature` = its index): `input_labelled`, `output_labelled_pos`, `output_labelled_neg`
(1 = labelled, 0 = unlabelled: no positive activation, a no-theme answer or no parseable answer) and `labelled`
(the share of the three labels present; the headline). Samples (`kind: feature_label`): the labels, the top tokens
with contexts, the vocabulary lists and the labeler's raw answers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar

from bench import Context, FeatureMethod, Score, register_task
from bench.feature_labels import SIGNS, FeatureLabel, LabelSettings, label_features, select_features

log = logging.getLogger(__name__)


@register_task("feature_labels")
@dataclass
class FeatureLabels:
    """Label every feature from its top activating tokens (input side) and its promoted vocabulary (output side)."""

    max_features: int = 8  # 0 = every feature (the paper); else a seeded sample, the same in every feature task
    n_top: int = 25  # top activating tokens per feature (input side; the reference's 25)
    window: int = 15  # tokens of context either side, from the same text (the reference's 15)
    n_show: int = 10  # of those, shown to the labeler (the reference's 10)
    n_vocab: int = 75  # vocabulary tokens per sign (output side; the reference's 75 for SNMF)
    n_vocab_show: int = 25  # of those, shown to the labeler with their scores (the reference's 25)
    labeler: str = "gemma-3-270m-gguf"  # local model labelling under the offline judge (bench.labeler_choice)
    max_new_tokens: int = 16  # label length (tokens) of the local labeler
    local_window: int = 5  # tokens either side of a top token shown to the local labeler (short prompts)
    batch_size: int = 64  # prompts per decoding batch of the local labeler

    needs_judge: ClassVar[bool] = True
    main_metric: ClassVar[str] = "labelled"

    def __post_init__(self) -> None:
        if self.max_features < 0:
            raise ValueError(f"feature_labels.max_features must be >= 0 (0 = every feature), got {self.max_features}")
        _ = self.settings  # validates the label settings

    @property
    def settings(self) -> LabelSettings:
        names = {f.name for f in fields(LabelSettings)}
        return LabelSettings(**{k: v for k, v in asdict(self).items() if k in names})

    def requires(self, cfg: Any) -> tuple[str, ...]:
        """For `bench.preflight`: the local labeler's model, which writes the labels under the offline judge."""
        return (f"model:{self.labeler}",) if cfg.judge == "offline" else ()

    def cost(self, n_concepts: int, n_instructions: int) -> dict[str, float]:
        """Labels written per unit (input + two signs per feature), or per feature when every feature is labelled
        (the dictionary size is known only after the fit)."""
        if self.max_features:
            return {"label_generations": 3.0 * self.max_features}
        return {"label_generations_per_feature": 3.0}

    def run(self, method: FeatureMethod, ctx: Context) -> Iterator[Score]:
        t0 = time.perf_counter()
        features = select_features(method.directions_.shape[0], self.max_features, ctx.seed)
        get = getattr(ctx, "labels", None)
        labels = get(method, features) if get is not None else label_features(method, features, ctx, self.settings)
        for f in features:
            label = labels[f]
            ctx.samples({"kind": "feature_label", "site": str(method.site), **sample(label)})
            flags = [label.input is not None, *(label.output.get(s) is not None for s in SIGNS)]
            yield Score("input_labelled", float(flags[0]), feature=f)
            yield Score("output_labelled_pos", float(flags[1]), feature=f)
            yield Score("output_labelled_neg", float(flags[2]), feature=f)
            yield Score("labelled", sum(flags) / 3, feature=f)
        log.info("feature_labels %s: %d features, %d distinct input labels, in %.1fs", method.site, len(features),
                 len({labels[f].input for f in features} - {None}), time.perf_counter() - t0)


def sample(label: FeatureLabel) -> dict[str, Any]:
    """A samples.jsonl row of one feature's labels and evidence."""
    return {"feature": label.feature, "input_label": label.input,
            "output_label_pos": label.output.get("+"), "output_label_neg": label.output.get("-"),
            "top_tokens": [asdict(t) for t in label.top_tokens],
            "vocab_pos": [list(p) for p in label.vocab.get("+", ())],
            "vocab_neg": [list(p) for p in label.vocab.get("-", ())], "answers": label.answers}
