"""Agreement, gold accuracy and arena scores against values worked out by hand."""

import math

import pytest

from lm_gym.feedback.quality import arena_scores, feedback_stats, gold_accuracy, krippendorff_alpha, rater_agreement
from lm_gym.feedback.store import NewItem


def test_krippendorff_alpha_matches_the_hand_computation():
    # two raters, four items: (+,+), (+,+), (-,-), (+,-). Coincidences: o(+,+)=4, o(-,-)=2, o(+,-)=o(-,+)=1;
    # n(+)=5, n(-)=3, n=8; alpha = 1 - (n-1) * D_o / (2 n(+) n(-)) = 1 - 7 * 2 / 30
    rows = [(1, 10, 1.0), (1, 11, 1.0), (2, 10, 1.0), (2, 11, 1.0), (3, 10, -1.0), (3, 11, -1.0),
            (4, 10, 1.0), (4, 11, -1.0), (5, 10, 1.0)]  # item 5 has one rater: not pairable
    alpha, items = krippendorff_alpha(rows)
    assert items == 4 and alpha == pytest.approx(1 - 14 / 30)
    assert krippendorff_alpha(rows[:2]) == (None, 1)


def test_agreement_leaves_each_rater_out_of_their_own_majority():
    rows = [(1, 1, 1.0), (1, 2, 1.0), (1, 3, -1.0), (2, 1, 1.0), (2, 2, 1.0), (2, 3, 1.0)]
    assert rater_agreement(rows) == {1: 1.0, 2: 1.0, 3: 0.5}
    assert gold_accuracy(rows, {2: 1.0, 1: -1.0}) == {1: 0.5, 2: 0.5, 3: 1.0}


def test_arena_win_rates_intervals_and_bradley_terry(feedback_store):
    items = feedback_store.add_items([NewItem("p", "x", "y", model_a="tuned", model_b="reference"),
                                      NewItem("p", "y", "x", model_a="reference", model_b="tuned")])
    stored = feedback_store.items()
    # tuned wins 8, loses 2, ties 1 (votes on both orders of the pair)
    rows = ([(items[0], r, 1.0) for r in range(5)] + [(items[1], r, -1.0) for r in range(5, 8)]
            + [(items[0], 8, -1.0), (items[1], 9, 1.0), (items[0], 10, 0.0)])
    scores = {row["model"]: row for row in arena_scores(rows, stored)}
    tuned = scores["tuned"]
    assert (tuned["wins"], tuned["losses"], tuned["ties"], tuned["comparisons"]) == (8, 2, 1, 11)
    assert tuned["win_rate"] == 0.8 and scores["reference"]["win_rate"] == 0.2
    z, n, p = 1.959964, 10, 0.8  # Wilson score interval
    centre, half = (p + z * z / (2 * n)) / (1 + z * z / n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    assert tuned["interval"] == pytest.approx((centre - half, centre + half), abs=1e-5)
    assert tuned["bradley_terry"] > 0 > scores["reference"]["bradley_terry"]
    # Bradley-Terry with a tie as a win each way: P(tuned beats reference) = 9/12 at the maximum likelihood
    gap = tuned["bradley_terry"] - scores["reference"]["bradley_terry"]
    assert 1 / (1 + math.exp(-gap)) == pytest.approx(9 / 12, abs=0.02)


def test_stats_count_raters_items_and_time(feedback_store):
    ids = feedback_store.add_items([NewItem("p", "r", gold=1.0), NewItem("q", "s")])
    ann, bob = feedback_store.invite("ann")[0], feedback_store.invite("bob")[0]
    feedback_store.record(ann, ids[0], "single", 1.0, seconds=3.0)
    feedback_store.record(ann, ids[1], "single", -1.0, seconds=5.0)
    feedback_store.record(bob, ids[0], "single", -1.0, seconds=10.0)
    feedback_store.record(bob, ids[1], "skip", None)
    stats = feedback_stats(feedback_store)
    by_name = {r["name"]: r for r in stats["raters"]}
    assert by_name["ann"]["median_seconds"] == 4.0 and by_name["ann"]["gold_accuracy"] == 1.0
    assert (by_name["bob"]["judgements"], by_name["bob"]["skips"], by_name["bob"]["gold_accuracy"]) == (1, 1, 0.0)
    assert stats["judgements_per_item"] == {1: 1, 2: 1} and stats["agreement"]["items"] == 1
    assert [(i["id"], i["judgements"], i["skips"], i["gold"]) for i in stats["per_item"]] == [
        (ids[0], 2, 0, 1.0), (ids[1], 1, 1, None)]
