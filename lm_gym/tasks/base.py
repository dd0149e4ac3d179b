"""A verifiable task: problems with known answers, and a reward that checks a response's final answer.

A :class:`Task` makes its problems for a split (``"train"`` or ``"eval"``, never overlapping), reads the
final answer out of a response in the format its prompts ask for (:meth:`Task.extract_answer`, by default the
``<answer>`` span) and checks it (:meth:`Task.is_correct`). :meth:`Task.reward` is the reward an env scores
responses with: 1 for a correct final answer, ``format_credit`` (default 0.1) for an answer in the format
that is wrong, 0 for a response without one (:mod:`lm_gym.tasks.answers`). Its components, which the env puts into
``info["reward_components"]``, are ``correct`` and ``formatted`` (each 0 or 1).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lm_gym.rewards.base import Reward, RewardOutput
from lm_gym.tasks import answers

SPLITS = ("train", "eval")


@dataclass(frozen=True)
class Problem:
    """One problem: the ``prompt`` text (the answer format included), its ``answer`` and whatever the
    task's checker needs (``data``)."""

    prompt: str
    answer: str
    data: Any = None


class Task:
    """Problems plus a checker (see the module docstring). Subclasses implement :meth:`make_problems` and
    :meth:`is_correct`, and set ``name``."""

    name: str = "task"
    format_credit: float = 0.1
    tools: tuple = ()  # callables the agent may call while it solves a problem (lm_gym.tools)

    def make_problems(self, split: str, count: int, at_most: bool = False) -> list[Problem]:
        """``count`` problems of ``split``, the same ones every time; with ``at_most``, all of the split's
        problems when it has fewer than ``count``, else an error."""
        raise NotImplementedError

    def is_correct(self, problem: Problem, answer: str) -> bool:
        """Whether ``answer`` (the extracted final answer) solves ``problem``."""
        raise NotImplementedError

    def extract_answer(self, response: str) -> str | None:
        """The final answer of ``response`` in the format the prompts ask for: the last ``<answer>`` span."""
        return answers.extract_answer(response)

    def problems(self, split: str, count: int, at_most: bool = False) -> list[Problem]:
        """``count`` problems of ``split`` (``"train"`` or ``"eval"``, disjoint); a task with fewer distinct
        problems raises, unless ``at_most`` asks for up to ``count`` (then all it has)."""
        if split not in SPLITS:
            raise ValueError(f"split={split!r}; expected one of {SPLITS}")
        if count < 1:
            raise ValueError(f"count must be a positive number of problems, got {count}")
        return self.make_problems(split, count, at_most)

    def reward(self, problems: Sequence[Problem]) -> "TaskReward":
        """The reward that checks responses to ``problems`` (found by their prompt text)."""
        return TaskReward(self, problems)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class TaskReward(Reward):
    """1 for a correct final answer, the task's ``format_credit`` for a wrong one in the answer format, 0
    without one; components ``correct`` and ``formatted``.

    :param task: the :class:`Task` whose checker decides.
    :param problems: the problems whose prompts the env gives; a prompt not among them raises.
    """

    def __init__(self, task: Task, problems: Sequence[Problem]):
        self.task, self.name = task, task.name
        self.by_prompt: dict[str, Problem] = {}
        for problem in problems:
            self.by_prompt.setdefault(problem.prompt, problem)

    def check(self, prompt: str, response: str) -> tuple[bool, bool]:
        """(correct, formatted) of ``response`` to the problem of ``prompt``."""
        problem = self.by_prompt.get(prompt)
        if problem is None:
            raise KeyError(f"the prompt {prompt!r:.120} is not one of the {len(self.by_prompt)} problems of task "
                           f"{self.task.name!r} this reward checks")
        answer = self.task.extract_answer(response)
        return answer is not None and self.task.is_correct(problem, answer), answer is not None

    def evaluate(self, prompts, responses, **context) -> RewardOutput:
        checks = [self.check(p, r) for p, r in zip(prompts, responses)]
        correct = torch.tensor([float(c) for c, _ in checks])
        formatted = torch.tensor([float(f) for _, f in checks])
        total = torch.where(correct.bool(), 1.0, self.task.format_credit * formatted)
        return RewardOutput(total, {"correct": correct, "formatted": formatted})

    def __call__(self, prompts, responses, **context) -> torch.Tensor:
        return self.evaluate(prompts, responses).total
