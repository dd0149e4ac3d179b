"""Accuracy of a model on a task's held-out problems: greedy and pass@k, with 95% Wilson intervals."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from tqdm import tqdm

from lm_gym.chat import encode_prompt, has_chat_template
from lm_gym.episode_rules import resolve_stop_tokens
from lm_gym.sampling import sample_continuations
from lm_gym.tasks.base import Task

Z_95 = 1.959963984540054


def wilson_interval(successes: int, total: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval of a success rate (95% by default); (0, 1) for no trials."""
    if total == 0:
        return 0.0, 1.0
    rate = successes / total
    centre = (rate + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(rate * (1 - rate) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class TaskAccuracy:
    """``correct`` of ``total`` problems solved, with the rate and its 95% Wilson interval."""

    correct: int
    total: int

    @property
    def rate(self) -> float:
        return self.correct / self.total if self.total else float("nan")

    @property
    def interval(self) -> tuple[float, float]:
        return wilson_interval(self.correct, self.total)

    def __str__(self) -> str:
        low, high = self.interval
        return f"{self.rate:.1%} ({self.correct}/{self.total}; 95% interval {low:.1%}-{high:.1%})"


@torch.no_grad()
def evaluate_task(model, tokenizer, task: Task, problems: int = 200, samples: int = 8, max_new_tokens: int = 64,
                  system_prompt: str | None = None, max_prompt_tokens: int = 256, batch_size: int = 64,
                  temperature: float = 1.0, seed: int = 0) -> dict:
    """Greedy accuracy and pass@``samples`` of ``model`` on ``problems`` held-out problems of ``task``.

    Prompts are encoded as the env encodes them (the chat template when the tokenizer has one, ``system_prompt``
    before each); each response ends at a stop token or after ``max_new_tokens``. pass@k counts a problem solved
    when any of its ``samples`` responses, sampled at ``temperature`` with per-row seeds, is correct.

    Returns ``{"greedy": TaskAccuracy, "pass@k": TaskAccuracy, "formatted": float, "responses": [...]}``,
    the last holding (prompt, greedy response, correct) per problem; with ``samples=0``, greedy only (no
    ``"pass@k"``).
    """
    held_out = task.problems("eval", problems)
    reward = task.reward(held_out)
    use_template = has_chat_template(tokenizer)
    contexts = []
    for problem in held_out:
        ids = encode_prompt(tokenizer, problem.prompt, use_template, system_prompt)
        if len(ids) > max_prompt_tokens:
            raise ValueError(f"a prompt of task {task.name!r} is {len(ids)} tokens, more than max_prompt_tokens="
                             f"{max_prompt_tokens}: {problem.prompt!r:.100}")
        contexts.append(ids)
    stops = torch.as_tensor(resolve_stop_tokens(tokenizer, model, None), device=model.device)

    def respond(rows: list[list[int]], heat: float, first_seed: int) -> list[str]:
        texts = []
        for start in tqdm(range(0, len(rows), batch_size), desc=f"{task.name} (T={heat:g})", disable=None, leave=False):
            chunk = rows[start : start + batch_size]
            generators = [torch.Generator(device=model.device).manual_seed(first_seed + start + i)
                          for i in range(len(chunk))]
            outputs = sample_continuations(model, chunk, [max_new_tokens] * len(chunk), generators, heat, stops,
                                           tokenizer.pad_token_id, max(map(len, chunk)) + max_new_tokens)
            texts += [tokenizer.decode([t for t in out if t not in stops.tolist()], skip_special_tokens=True)
                      for out in outputs]
        return texts

    prompts = [p.prompt for p in held_out]
    greedy = respond(contexts, 0.0, seed)
    greedy_checks = [reward.check(p, r) for p, r in zip(prompts, greedy)]
    result = {
        "greedy": TaskAccuracy(sum(c for c, _ in greedy_checks), len(prompts)),
        "formatted": sum(f for _, f in greedy_checks) / len(prompts),
        "responses": [(p, r, c) for p, r, (c, _) in zip(prompts, greedy, greedy_checks)],
    }
    if samples:
        sampled = respond([c for c in contexts for _ in range(samples)], temperature, seed + 1_000_000)
        solved = [any(reward.check(prompts[i], sampled[i * samples + j])[0] for j in range(samples))
                  for i in range(len(prompts))]
        result[f"pass@{samples}"] = TaskAccuracy(sum(solved), len(prompts))
    return result
