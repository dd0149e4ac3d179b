"""Exports of the store in the formats the trainers read, with filters that report what they drop.

- ``feedback``: JSONL rows ``{"prompt", "response", "feedback"}`` (:func:`lm_gym.data.load_feedback`,
  ``FeedbackReward``), one per single-response item.
- ``preferences``: JSONL rows ``{"prompt", "chosen", "rejected"}`` (:func:`lm_gym.data.load_preferences`,
  ``train_reward_model``, ``lm-gym rlhf``), one per compared pair.
- ``dataset``: a Hugging Face ``datasets`` directory with a ``feedback`` and a ``preferences`` split.

Chat prompts become HH-RLHF transcripts (``"\\n\\nHuman: ...\\n\\nAssistant:"``), which
:func:`lm_gym.data.chat_prompt` turns back into messages. Filters run in this order: raters below the
agreement or gold-accuracy threshold lose their judgements, items with fewer than ``min_ratings`` votes
go, each item's votes are aggregated (majority or mean), then exact duplicates go. Each step counts what it
dropped in the :class:`ExportReport`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from lm_gym.feedback.quality import gold_accuracy, judgements, majority_value, rater_agreement
from lm_gym.feedback.store import FeedbackStore

AGGREGATIONS = ("majority", "mean")
SIGNAL_VALUES = {"like": 1.0, "dislike": -1.0}


@dataclass(frozen=True)
class ExportFilters:
    """What an export keeps.

    :param min_ratings: least number of votes (judgements and like/dislike signals) an item needs.
    :param aggregate: ``"majority"`` (the most frequent vote; a tie between the top two drops the item) or
        ``"mean"`` (the mean vote: graded feedback in [-1, 1]; for a pair its sign picks the winner).
    :param min_agreement: drop the judgements of raters whose agreement with the other raters' majority is
        below this (raters with no shared items are kept).
    :param min_gold_accuracy: drop the judgements of raters whose accuracy on gold items is below this.
    :param dedupe: drop rows that repeat an earlier row's prompt and response(s) exactly.
    :param signals: count like/dislike signals of deployed applications as votes.
    """

    min_ratings: int = 1
    aggregate: str = "majority"
    min_agreement: float | None = None
    min_gold_accuracy: float | None = None
    dedupe: bool = True
    signals: bool = True

    def __post_init__(self):
        if self.aggregate not in AGGREGATIONS:
            raise ValueError(f"aggregate={self.aggregate!r}; expected one of {list(AGGREGATIONS)}")
        if self.min_ratings < 1:
            raise ValueError(f"min_ratings must be >= 1, got {self.min_ratings}")
        for name in ("min_agreement", "min_gold_accuracy"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")


@dataclass
class ExportReport:
    """What an export read, wrote and dropped (``dropped``: reason -> count, every reason named)."""

    format: str
    items: int = 0
    written: int = 0
    dropped: dict[str, int] = field(default_factory=dict)

    def drop(self, reason: str, count: int = 1) -> None:
        if count:
            self.dropped[reason] = self.dropped.get(reason, 0) + count

    def summary(self) -> str:
        """One line: rows written out of items read, then each reason with its count."""
        parts = "; ".join(f"{count} {reason}" for reason, count in self.dropped.items()) or "nothing"
        return f"{self.format}: {self.written} rows from {self.items} items; dropped {parts}"


def prompt_for_export(prompt_json: str) -> str:
    """A stored prompt as text: strings unchanged, chat messages as an HH-RLHF transcript ending in
    ``"\\n\\nAssistant:"`` (a system message leads the first human turn)."""
    prompt = json.loads(prompt_json)
    if isinstance(prompt, str):
        return prompt
    system = "\n\n".join(m["content"] for m in prompt if m["role"] == "system")
    chunks = []
    for message in prompt:
        if message["role"] == "system":
            continue
        content = message["content"]
        if system and message["role"] == "user":
            content, system = f"{system}\n\n{content}", ""
        chunks.append(f"\n\n{'Human' if message['role'] == 'user' else 'Assistant'}: {content}")
    return "".join(chunks) + "\n\nAssistant:"


def item_votes(store: FeedbackStore, filters: ExportFilters, report: ExportReport) -> dict[int, list[float]]:
    """Each item's votes after the rater filters: rater judgements, and like/dislike signals."""
    ratings = store.ratings()
    report.drop("skips (no judgement)", sum(r.value is None for r in ratings))
    rows = judgements(ratings)
    dropped_raters = _filtered_raters(store, rows, filters)
    votes: dict[int, list[float]] = {}
    for reason, raters in dropped_raters.items():
        report.drop(f"judgements by raters {reason} (raters {', '.join(map(str, sorted(raters)))})",
                    sum(rater in raters for _, rater, _ in rows))
    excluded = set().union(*dropped_raters.values())
    for item, rater, value in rows:
        if rater not in excluded:
            votes.setdefault(item, []).append(value)
    for signal in store.signals():
        if signal.signal not in SIGNAL_VALUES:
            report.drop(f"{signal.signal} signals (carry no rating)")
        elif filters.signals:
            votes.setdefault(signal.item_id, []).append(SIGNAL_VALUES[signal.signal])
        else:
            report.drop("like/dislike signals (signals=False)")
    return votes


def _filtered_raters(store: FeedbackStore, rows, filters: ExportFilters) -> dict[str, set[int]]:
    dropped = {}
    if filters.min_agreement is not None:
        low = {r for r, a in rater_agreement(rows).items() if a is not None and a < filters.min_agreement}
        if low:
            dropped[f"below agreement {filters.min_agreement}"] = low
    if filters.min_gold_accuracy is not None:
        gold = {item.id: item.gold for item in store.items() if item.gold is not None}
        low = {r for r, a in gold_accuracy(rows, gold).items() if a is not None and a < filters.min_gold_accuracy}
        low -= set().union(*dropped.values())
        if low:
            dropped[f"below gold accuracy {filters.min_gold_accuracy}"] = low
    return dropped


def aggregate(values: list[float], how: str) -> float | None:
    """The item's value from its votes: the majority (None on a tie) or the mean."""
    return majority_value(values) if how == "majority" else sum(values) / len(values)


def _kept_items(store: FeedbackStore, kind: str, filters: ExportFilters, report: ExportReport):
    """(item, aggregated value) of the items of ``kind`` that pass ``min_ratings`` and aggregation."""
    votes = item_votes(store, filters, report)
    for item in store.items():
        report.items += 1
        if item.kind != kind:
            other = "--format preferences" if item.kind == "pair" else "--format feedback"
            report.drop(f"{item.kind} items (this format holds {kind} items; export those with {other})")
            continue
        values = votes.get(item.id, [])
        if len(values) < filters.min_ratings:
            report.drop(f"items with fewer than {filters.min_ratings} votes")
            continue
        value = aggregate(values, filters.aggregate)
        if value is None:
            report.drop("items whose votes tie (no majority)")
            continue
        yield item, value


def feedback_rows(store: FeedbackStore, filters: ExportFilters = ExportFilters()) -> tuple[list[dict], ExportReport]:
    """Rows for :func:`lm_gym.data.load_feedback` and the report of what was dropped."""
    report, rows, seen = ExportReport("feedback"), [], set()
    for item, value in _kept_items(store, "single", filters, report):
        row = {"prompt": prompt_for_export(item.prompt), "response": item.response_a, "feedback": value}
        if _duplicate(filters, seen, (row["prompt"], row["response"]), report):
            continue
        rows.append(row)
    report.written = len(rows)
    return rows, report


def preference_rows(store: FeedbackStore, filters: ExportFilters = ExportFilters()) -> tuple[list[dict], ExportReport]:
    """Rows for :func:`lm_gym.data.load_preferences` and the report of what was dropped."""
    report, rows, seen = ExportReport("preferences"), [], set()
    for item, value in _kept_items(store, "pair", filters, report):
        if value == 0:
            report.drop("pairs judged a tie (no preference)")
            continue
        chosen, rejected = (item.response_a, item.response_b) if value > 0 else (item.response_b, item.response_a)
        if chosen.strip() == rejected.strip():
            report.drop("pairs with identical responses")
            continue
        row = {"prompt": prompt_for_export(item.prompt), "chosen": chosen, "rejected": rejected}
        if _duplicate(filters, seen, (row["prompt"], frozenset((chosen, rejected))), report):
            continue
        rows.append(row)
    report.written = len(rows)
    return rows, report


def _duplicate(filters: ExportFilters, seen: set, key, report: ExportReport) -> bool:
    if not filters.dedupe:
        return False
    if key in seen:
        report.drop("exact duplicates of an earlier row")
        return True
    seen.add(key)
    return False


def export(store: FeedbackStore, fmt: str, out: str | Path, filters: ExportFilters = ExportFilters()) -> list[ExportReport]:
    """Write the ``feedback`` or ``preferences`` JSONL file, or the ``dataset`` directory, to ``out``.

    :param fmt: ``"feedback"``, ``"preferences"`` or ``"dataset"``.
    :return: the report of each table written.
    """
    out = Path(out)
    if fmt == "dataset":
        return _export_dataset(store, out, filters)
    makers = {"feedback": feedback_rows, "preferences": preference_rows}
    if fmt not in makers:
        raise ValueError(f"format {fmt!r}; expected feedback, preferences or dataset")
    rows, report = makers[fmt](store, filters)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    return [report]


def _export_dataset(store: FeedbackStore, out: Path, filters: ExportFilters) -> list[ExportReport]:
    import datasets

    feedback, feedback_report = feedback_rows(store, filters)
    pairs, pair_report = preference_rows(store, filters)
    features = {
        "feedback": datasets.Features({"prompt": datasets.Value("string"), "response": datasets.Value("string"),
                                       "feedback": datasets.Value("float64")}),
        "preferences": datasets.Features({name: datasets.Value("string") for name in ("prompt", "chosen", "rejected")}),
    }
    splits = {"feedback": feedback, "preferences": pairs}
    datasets.DatasetDict({name: datasets.Dataset.from_list(rows, features=features[name])
                          for name, rows in splits.items()}).save_to_disk(str(out))
    return [feedback_report, pair_report]
