"""Scoring 64 responses: the design's literal per-item loop vs FeedbackReward, and the model rewards.

The literal loop (``for feedback in feedback_data: if is_similar(x, feedback.prompt): ...``) embeds the
texts it compares on every iteration, as written; where it would run for more than a minute it is timed on
a sample of items and extrapolated linearly (marked "extrapolated"). FeedbackReward embeds the feedback
set once (timed separately: "setup") and scores a batch with matrix products. Feedback sets of 1k/10k/100k
items are drawn from the HH-RLHF sample's prompts and responses (repeated texts are embedded once).
Run from the project root: ``python -m benchmarks.reward_throughput``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import time
import warnings

import numpy as np
import torch
from transformers import AutoModelForSequenceClassification

from benchmarks.machine import describe_machine
from lm_gym import load_model
from lm_gym.data import DataWarning, FeedbackExample, default_feedback, load_preferences
from lm_gym.rewards import FeedbackReward, LMJudgeReward, RewardModelReward, SentenceEncoder

BATCH = 64
THRESHOLD = 0.5


def literal_loop(encoder, feedback, prompt: str, response: str) -> float:
    """The design's reward as written: one pass over the feedback data, embedding as it goes."""
    cosine = torch.nn.functional.cosine_similarity
    total, count = 0.0, 0
    for item in feedback:
        x, x_i = encoder.encode([prompt, item.prompt])
        if cosine(x, x_i, dim=0) >= THRESHOLD:  # is_similar(x, feedback.prompt)
            y, y_i = encoder.encode([response, item.response])
            total += item.feedback * float(cosine(y, y_i, dim=0))
            count += 1
    return total / count if count else 0.0


def feedback_set(size: int, pool: list[FeedbackExample]) -> list[FeedbackExample]:
    """``size`` items cycling through prompts and responses of the pool (a realistic share of repeats)."""
    rng = np.random.default_rng(0)
    prompts = [item.prompt for item in pool]
    return [
        FeedbackExample(prompts[i % len(prompts)], pool[int(rng.integers(len(pool)))].response, float(rng.choice([-1, 1])))
        for i in range(size)
    ]


def time_literal(encoder, feedback, queries, budget_items: int) -> tuple[float, bool]:
    """Seconds for 64 responses x all items, measured on ``budget_items`` item visits if fewer than all."""
    total_visits = len(queries) * len(feedback)
    sample = feedback[:budget_items] if total_visits > budget_items else feedback
    started = time.perf_counter()
    literal_loop(encoder, sample, *queries[0])
    per_visit = (time.perf_counter() - started) / len(sample)
    return per_visit * total_visits, total_visits > budget_items


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/hh-rlhf/harmless-base-dev.jsonl.gz")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    parser.add_argument("--loop-sample", type=int, default=200, help="item visits timed for the literal loop")
    args = parser.parse_args()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        pairs = load_preferences(args.data)
    pool = [FeedbackExample(p.prompt, r, 1.0) for p in pairs for r in (p.chosen, p.rejected)] + list(default_feedback())
    shipped = default_feedback()
    queries = [(item.prompt, item.response) for item in shipped[:BATCH]]
    encoder = SentenceEncoder()
    print(f"machine: {describe_machine()}\nbatch: {BATCH} responses; encoder all-MiniLM-L6-v2; threshold {THRESHOLD}\n")
    print("| feedback items | literal loop s | FeedbackReward setup s | FeedbackReward per batch s | speed-up |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as cache, cold_embedding_cache(cache):
        for size in args.sizes:
            feedback = feedback_set(size, pool)
            loop_seconds, extrapolated = time_literal(encoder, feedback, queries, args.loop_sample)
            started = time.perf_counter()
            reward = FeedbackReward(feedback, encoder=encoder, context_threshold=THRESHOLD)
            reward._prepare()
            setup = time.perf_counter() - started
            reward([q for q, _ in queries], [r for _, r in queries])
            started = time.perf_counter()
            for _ in range(3):
                reward([q for q, _ in queries], [r for _, r in queries])
            per_batch = (time.perf_counter() - started) / 3
            mark = " (extrapolated)" if extrapolated else ""
            print(f"| {size:,} | {loop_seconds:,.0f}{mark} | {setup:.1f} | {per_batch:.3f} | {loop_seconds / per_batch:,.0f}x |")
    model_rewards(queries)


@contextlib.contextmanager
def cold_embedding_cache(directory: str):
    """Point the lm-gym cache at an empty directory (so setup is the real first-time cost), then restore it."""
    saved = os.environ.get("LM_GYM_CACHE")
    os.environ["LM_GYM_CACHE"] = directory
    try:
        yield
    finally:
        if saved is None:
            del os.environ["LM_GYM_CACHE"]
        else:
            os.environ["LM_GYM_CACHE"] = saved


def model_rewards(queries) -> None:
    """Per-batch time of RewardModelReward (default model backbone) and LMJudgeReward (default model)."""
    model, tokenizer = load_model("default", device="cpu")
    prompts, responses = [q for q, _ in queries], [r for _, r in queries]
    with tempfile.TemporaryDirectory() as directory:
        backbone = AutoModelForSequenceClassification.from_pretrained(
            str(model.name_or_path), num_labels=1, dtype=torch.float32
        )
        backbone.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
        rewards = {"RewardModelReward (SmolLM2-135M backbone)": RewardModelReward(directory, device="cpu"),
                   "LMJudgeReward (SmolLM2-135M, the env's LM)": LMJudgeReward(model=model, tokenizer=tokenizer)}
        print(f"\n| model reward | seconds per batch of {BATCH} |\n|---|---|")
        for label, reward in rewards.items():
            reward(prompts[:4], responses[:4])
            started = time.perf_counter()
            reward(prompts, responses)
            print(f"| {label} | {time.perf_counter() - started:.2f} |")


if __name__ == "__main__":
    main()
