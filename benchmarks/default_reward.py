"""How the default env reward ranks good over bad responses to prompts it has no feedback for.

Splits the shipped feedback set by prompt: the pairs of the first 10 prompts of each category build the
FeedbackReward; the pairs of the other 5 per category are scored. Reports how often each part of the
default reward (r_f, fluency r_m, and the blend at alpha = 0.5) scores the good response above the bad one.
Run from the project root: ``python -m benchmarks.default_reward``.
"""

from __future__ import annotations

import json
from collections import defaultdict
from importlib import resources

import torch

from benchmarks.machine import describe_machine
from lm_gym import load_model
from lm_gym.data import FeedbackExample
from lm_gym.rewards import BlendedReward, FeedbackReward, FluencyReward


def split_by_prompt() -> tuple[list[FeedbackExample], list[tuple[str, str, str]]]:
    """(feedback items of 10 prompts per category, (prompt, good, bad) of the other 5 per category)."""
    rows = [json.loads(line) for line in resources.files("lm_gym.data").joinpath("feedback.jsonl").open()]
    categories = {json.loads(line)["id"]: json.loads(line)["category"]
                  for line in resources.files("lm_gym.data").joinpath("prompts.jsonl").open()}
    seen: dict[str, list[str]] = defaultdict(list)
    for row in rows:
        ids = seen[categories[row["prompt_id"]]]
        if row["prompt_id"] not in ids:
            ids.append(row["prompt_id"])
    train_ids = {pid for ids in seen.values() for pid in ids[:10]}
    train = [FeedbackExample(r["prompt"], r["response"], float(r["feedback"])) for r in rows if r["prompt_id"] in train_ids]
    by_prompt = defaultdict(dict)
    for r in rows:
        if r["prompt_id"] not in train_ids:
            by_prompt[r["prompt"]][r["feedback"]] = r["response"]
    return train, [(prompt, pair[1], pair[-1]) for prompt, pair in by_prompt.items()]


def main() -> None:
    train, held_out = split_by_prompt()
    model, tokenizer = load_model("default", device="cpu")
    feedback, fluency = FeedbackReward(train), FluencyReward(model, tokenizer)
    blend = BlendedReward(feedback, fluency, alpha=0.5)
    prompts = [p for p, _, _ in held_out]
    good = blend.evaluate(prompts, [g for _, g, _ in held_out])
    bad = blend.evaluate(prompts, [b for _, _, b in held_out])
    print(f"machine: {describe_machine()}")
    print(f"feedback items: {len(train)}; held-out prompts: {len(held_out)} (good vs bad response each)\n")
    print("| reward | good > bad | mean on good | mean on bad |\n|---|---|---|---|")
    parts = {**{name: (good.components[name], bad.components[name]) for name in good.components},
             "blend (alpha = 0.5)": (good.total, bad.total)}
    normalised = BlendedReward(feedback, fluency, alpha=0.5, normalize=True)
    both = normalised.evaluate(prompts * 2, [g for _, g, _ in held_out] + [b for _, _, b in held_out]).total
    parts["blend, components standardised (normalize=True)"] = (both[: len(held_out)], both[len(held_out) :])
    for name, (g, b) in parts.items():
        wins = int((g > b).sum())
        print(f"| {name} | {wins}/{len(held_out)} ({wins / len(held_out):.0%}) | {g.mean():.3f} | {b.mean():.3f} |")
    print("\n| FeedbackReward context_threshold | good > bad | ties (both 0: no similar prompt) |\n|---|---|---|")
    for threshold in (0.5, 0.4, 0.3, 0.2, 0.1, 0.0):
        reward = FeedbackReward(train, context_threshold=threshold)
        g, b = reward(prompts, [x for _, x, _ in held_out]), reward(prompts, [x for _, _, x in held_out])
        wins, ties = int((g > b).sum()), int((g == b).sum())
        print(f"| {threshold} | {wins}/{len(held_out)} ({wins / len(held_out):.0%}) | {ties} |")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
