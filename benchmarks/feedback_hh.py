"""How often FeedbackReward prefers the human-chosen response on held-out HH-RLHF pairs.

Builds FeedbackReward from the first 800 pairs of the HH-RLHF harmlessness sample (chosen +1, rejected -1)
and scores both responses of the remaining pairs; reports wins, ties and losses for a few settings.
Run from the project root: ``python -m benchmarks.feedback_hh [--data PATH]``.
"""

from __future__ import annotations

import argparse
import time
import warnings

from benchmarks.machine import describe_machine
from lm_gym.data import DataWarning, load_preferences, pairs_to_feedback
from lm_gym.rewards import FeedbackReward

DEFAULT_DATA = "../shared/data/hh-rlhf/harmless-base-dev.jsonl.gz"
SETTINGS = [(8, 0.5), (8, 0.2), (32, 0.2), (32, 0.0)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=DEFAULT_DATA)
    parser.add_argument("--train", type=int, default=800)
    args = parser.parse_args()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        pairs = load_preferences(args.data)
    train, held_out = pairs[: args.train], pairs[args.train :]
    prompts = [pair.prompt for pair in held_out]
    print(f"machine: {describe_machine()}")
    print(f"{pairs.report.summary()}")
    print(f"feedback items: {2 * len(train)} from {len(train)} pairs; held out: {len(held_out)} pairs\n")
    print("| top_m | context_threshold | chosen > rejected | ties | chosen < rejected | mean r_f chosen | mean r_f rejected | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    for top_m, threshold in SETTINGS:
        started = time.perf_counter()
        reward = FeedbackReward(pairs_to_feedback(train), top_m=top_m, context_threshold=threshold)
        chosen = reward(prompts, [pair.chosen for pair in held_out])
        rejected = reward(prompts, [pair.rejected for pair in held_out])
        seconds = time.perf_counter() - started
        wins, ties = int((chosen > rejected).sum()), int((chosen == rejected).sum())
        n = len(held_out)
        print(f"| {top_m} | {threshold} | {wins} ({wins / n:.1%}) | {ties} ({ties / n:.1%}) | {n - wins - ties} "
              f"({(n - wins - ties) / n:.1%}) | {chosen.mean():.4f} | {rejected.mean():.4f} | {seconds:.1f} |")
    print("\nencoder: all-MiniLM-L6-v2 (sentence-transformers, inputs cut at its 256-token limit); similarity: cosine")


if __name__ == "__main__":
    main()
