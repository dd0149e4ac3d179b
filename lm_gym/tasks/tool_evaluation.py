"""Accuracy of a model on a tool task's held-out problems, each played as one multi-turn episode with the
task's tools: the model writes its turns (greedy, or sampled at a temperature), the env runs its tool calls
and inserts their results, and the task's checker scores the final answer."""

from __future__ import annotations

from collections import Counter

import numpy as np
import torch
from tqdm import tqdm

from lm_gym.config import EnvConfig
from lm_gym.episode_rules import TokenEpisodes
from lm_gym.sampling import sample_tokens
from lm_gym.tasks.base import Task
from lm_gym.tasks.evaluation import TaskAccuracy


@torch.no_grad()
def evaluate_tool_task(model, tokenizer, task: Task, problems: int = 200, max_new_tokens: int = 64,
                       system_prompt: str | None = None, max_prompt_tokens: int = 512, batch_size: int = 32,
                       temperature: float = 0.0, seed: int = 0, max_turns: int = 3, context_tokens: int = 1024) -> dict:
    """Accuracy and tool use of ``model`` on ``problems`` held-out problems of a task with ``tools``.

    Each problem is one episode of at most ``max_turns`` agent turns of ``max_new_tokens`` each, in
    ``context_tokens`` in all; turns are greedy with ``temperature=0``.

    Returns ``{"accuracy": TaskAccuracy, "called": TaskAccuracy (episodes with at least one tool call),
    "valid_calls": TaskAccuracy (calls that ran without an error, of all calls), "errors": {kind: count},
    "episodes": [...]}``, the last holding each episode's ``turns`` (texts, tool calls and results) and
    whether it was correct.
    """
    if not task.tools:
        raise ValueError(f"task {task.name!r} has no tools: use lm_gym.tasks.evaluate_task")
    held_out = task.problems("eval", problems)
    config = EnvConfig(model=model, tokenizer=tokenizer, prompts=[p.prompt for p in held_out],
                       reward=task.reward(held_out), tools=list(task.tools), system_prompt=system_prompt,
                       max_new_tokens=max_new_tokens, max_prompt_tokens=max_prompt_tokens,
                       multi_turn=dict(max_turns=max_turns, context_tokens=context_tokens))
    rows = min(batch_size, len(held_out))
    episodes = TokenEpisodes.from_config(config, rows)
    played = []
    for start in tqdm(range(0, len(held_out), rows), desc=f"{task.name} episodes", disable=None, leave=False):
        prompts = [p.prompt for p in held_out[start : start + rows]]
        played += play_episodes(episodes, prompts, temperature, seed + start)
    calls = [call for episode in played for call in episode["tool_calls"]]
    errors = dict(Counter(call["error"] for call in calls if call["error"]))
    return {"accuracy": TaskAccuracy(sum(e["correct"] for e in played), len(played)),
            "called": TaskAccuracy(sum(bool(e["tool_calls"]) for e in played), len(played)),
            "valid_calls": TaskAccuracy(sum(not call["error"] for call in calls), len(calls)),
            "errors": errors, "episodes": played}


def play_episodes(episodes: TokenEpisodes, prompts: list[str], temperature: float, seed: int) -> list[dict]:
    """Play one episode per prompt in the first rows of ``episodes``, the env's LM choosing every token (row i
    seeded with ``seed + i``)."""
    rows = list(range(len(prompts)))
    episodes.reset_rows(rows, [np.random.default_rng(seed + row) for row in rows], prompts)
    generators = [torch.Generator(device=episodes.device).manual_seed(seed + row)
                  for row in range(episodes.batch.num_rows)]
    active = torch.zeros(episodes.batch.num_rows, dtype=torch.bool, device=episodes.device)
    active[rows] = True
    finals: list[dict | None] = [None] * len(prompts)
    while bool(active.any()):
        actions, _ = sample_tokens(episodes.batch.next_logprobs, temperature, greedy=temperature == 0,
                                   generators=generators)
        result = episodes.step(actions, active)
        for row in (active & (result.terminated | result.truncated)).nonzero().squeeze(1).tolist():
            finals[row] = episode_record(result.turn_ends[row].info())
            active[row] = False
    return finals


def episode_record(info: dict) -> dict:
    """An ended episode's turns, its tool calls, and whether its final answer was correct."""
    calls = [call for turn in info["turns"] for call in turn.get("tool_calls", [])]
    correct = info["reward_components"].get("correct", 0.0) == 1.0  # a turn cut short has no checked answer
    return {"turns": info["turns"], "tool_calls": calls, "correct": correct}
