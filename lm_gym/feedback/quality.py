"""Quality of the collected judgements: agreement between raters, accuracy on gold items, time per item, and
the arena's model scores (win rates with 95% intervals, Bradley-Terry strengths).

The functions take plain rows (``(item_id, rater_id, value)`` triples) so the exports can reuse them;
:func:`feedback_stats` reads a store and puts everything together for the admin page and ``stats``.
"""

from __future__ import annotations

import statistics
from collections import Counter, defaultdict

import choix
import krippendorff
import numpy as np
from scipy.stats import binomtest

from lm_gym.feedback.schema import Item, Rating, Signal
from lm_gym.feedback.store import FeedbackStore

Judgement = tuple[int, int, float]  # (item_id, rater_id, value): skips (value None) left out


def judgements(ratings: list[Rating]) -> list[Judgement]:
    """The ratings that judge (skips left out) as ``(item, rater, value)``."""
    return [(r.item_id, r.rater_id, r.value) for r in ratings if r.value is not None]


def krippendorff_alpha(rows: list[Judgement]) -> tuple[float | None, int]:
    """Krippendorff's alpha (nominal) over the items judged by two or more raters, and how many those are;
    alpha is None when fewer than two such items or only one value occurs."""
    by_item = defaultdict(dict)
    for item, rater, value in rows:
        by_item[item][rater] = value
    shared = [item for item, votes in by_item.items() if len(votes) >= 2]
    values = {v for item in shared for v in by_item[item].values()}
    if len(shared) < 2 or len(values) < 2:
        return None, len(shared)
    raters = sorted({rater for item in shared for rater in by_item[item]})
    data = np.full((len(raters), len(shared)), np.nan)
    for column, item in enumerate(shared):
        for rater, value in by_item[item].items():
            data[raters.index(rater), column] = value
    return float(krippendorff.alpha(reliability_data=data, level_of_measurement="nominal")), len(shared)


def rater_agreement(rows: list[Judgement]) -> dict[int, float | None]:
    """Each rater's agreement: the fraction of their judgements that equal the majority of the *other*
    raters of the same item (items where the others tie or nobody else judged do not count)."""
    by_item = defaultdict(list)
    for item, rater, value in rows:
        by_item[item].append((rater, value))
    hits, counted = Counter(), Counter()
    for votes in by_item.values():
        for rater, value in votes:
            majority = majority_value([v for r, v in votes if r != rater])
            if majority is not None:
                counted[rater] += 1
                hits[rater] += value == majority
    raters = {rater for _, rater, _ in rows}
    return {rater: hits[rater] / counted[rater] if counted[rater] else None for rater in raters}


def majority_value(values: list[float]) -> float | None:
    """The most frequent value, or None when there is none or the top two tie."""
    ranked = Counter(values).most_common(2)
    if not ranked or (len(ranked) == 2 and ranked[0][1] == ranked[1][1]):
        return None
    return ranked[0][0]


def gold_accuracy(rows: list[Judgement], gold: dict[int, float]) -> dict[int, float | None]:
    """Each rater's fraction of correct judgements on gold items (None when they judged none)."""
    hits, counted = Counter(), Counter()
    for item, rater, value in rows:
        if item in gold:
            counted[rater] += 1
            hits[rater] += value == gold[item]
    return {rater: hits[rater] / counted[rater] if counted[rater] else None for _, rater, _ in rows}


def arena_scores(rows: list[Judgement], items: list[Item]) -> list[dict]:
    """Per model of the arena pairs: comparisons, wins, losses, ties, win rate over decided comparisons with
    its 95% Wilson interval, and the Bradley-Terry strength (log scale, mean 0; a tie counts as one win
    each way)."""
    pairs = {item.id: (item.model_a, item.model_b) for item in items
             if item.kind == "pair" and item.model_a and item.model_b and item.model_a != item.model_b}
    models = sorted({m for pair in pairs.values() for m in pair})
    if len(models) < 2:
        return []
    index = {model: i for i, model in enumerate(models)}
    tally = {model: Counter() for model in models}
    outcomes = []  # (winner, loser) indices for choix
    for item, _, value in rows:
        if item not in pairs:
            continue
        a, b = pairs[item]
        if value == 0:
            tally[a]["ties"] += 1
            tally[b]["ties"] += 1
            outcomes += [(index[a], index[b]), (index[b], index[a])]
            continue
        winner, loser = (a, b) if value > 0 else (b, a)
        tally[winner]["wins"] += 1
        tally[loser]["losses"] += 1
        outcomes.append((index[winner], index[loser]))
    strengths = choix.ilsr_pairwise(len(models), outcomes, alpha=0.01) if outcomes else np.zeros(len(models))
    return [_model_row(model, tally[model], float(strengths[index[model]])) for model in models]


def _model_row(model: str, tally: Counter, strength: float) -> dict:
    wins, losses, ties = tally["wins"], tally["losses"], tally["ties"]
    decided = wins + losses
    interval = binomtest(wins, decided).proportion_ci(0.95, method="wilson") if decided else None
    return {"model": model, "comparisons": decided + ties, "wins": wins, "losses": losses, "ties": ties,
            "win_rate": wins / decided if decided else None,
            "interval": (interval.low, interval.high) if interval else (None, None), "bradley_terry": strength}


def feedback_stats(store: FeedbackStore) -> dict:
    """Everything the admin page and ``lm-gym feedback stats`` show, as plain data."""
    items, ratings = store.items(), store.ratings()
    rows = judgements(ratings)
    gold = {item.id: item.gold for item in items if item.gold is not None}
    agreement, accuracy = rater_agreement(rows), gold_accuracy(rows, gold)
    alpha, shared = krippendorff_alpha(rows)
    per_item = Counter(item for item, _, _ in rows)
    skips = Counter(r.item_id for r in ratings if r.value is None)
    by_rater = defaultdict(list)
    for rating in ratings:
        by_rater[rating.rater_id].append(rating)
    return {
        "n_items": len(items), "n_ratings": len(ratings), "n_signals": store.count(Signal),
        "raters": [_rater_row(rater, by_rater[rater.id], agreement, accuracy) for rater in store.raters()
                   if rater.role == "rater"],
        "agreement": {"alpha": alpha, "items": shared},
        "judgements_per_item": dict(sorted(Counter(per_item.get(item.id, 0) for item in items).items())),
        "per_item": [{"id": item.id, "kind": item.kind, "judgements": per_item.get(item.id, 0),
                      "skips": skips.get(item.id, 0), "gold": item.gold} for item in items],
        "gold_items": len(gold),
        "arena": {"models": arena_scores(rows, items)},
    }


def _rater_row(rater, own: list[Rating], agreement: dict, accuracy: dict) -> dict:
    seconds = [r.seconds for r in own if r.seconds is not None and r.value is not None]
    return {"id": rater.id, "name": rater.name, "judgements": sum(r.value is not None for r in own),
            "skips": sum(r.value is None for r in own), "agreement": agreement.get(rater.id),
            "gold_accuracy": accuracy.get(rater.id),
            "median_seconds": statistics.median(seconds) if seconds else None}
