"""Verifiable tasks: prompts plus a checker, for RL on answers a program can check.

A task makes training and held-out problems (disjoint) and checks a response's final answer, in the format
its prompts ask for: between ``<answer>`` and ``</answer>``, or the last number written
(:mod:`lm_gym.tasks.answers`). Its reward gives 1 for a
correct answer, 0.1 for a wrong one in the format and 0 otherwise (:class:`lm_gym.tasks.base.TaskReward`).

In three lines::

    env = gymnasium.make("LanguageModelEnv-v0", task="addition")       # prompts and checker
    task = lm_gym.tasks.make_task("reasoning-gym:leg_counting")        # pip install lm-gym[reasoning]
    accuracy = lm_gym.tasks.evaluate_task(model, tokenizer, task)      # held out, with 95% intervals

A task with ``tools`` (``"calculator"``) is played as multi-turn episodes in which the env runs the agent's
tool calls; :func:`evaluate_tool_task` measures its accuracy and tool use the same way.

Built in (:mod:`lm_gym.tasks.builtin`): ``"addition"`` (two 2-digit numbers) and ``"multiplication"`` (2 digits
times 1), answered with a number, which the default model solves 5-60% of the time before training, and
``"reverse"`` (a 3-4 letter string, in ``<answer>`` tags), which it never does; ``"calculator"`` (3-digit
multiplication with a ``calculator`` tool, :mod:`lm_gym.tasks.tool_tasks`); any reasoning-gym dataset as
``"reasoning-gym:NAME"``.
"""

from __future__ import annotations

from lm_gym.tasks.answers import ANSWER_FORMAT, extract_answer, numbers_equal, parse_number
from lm_gym.tasks.base import Problem, Task, TaskReward
from lm_gym.tasks.builtin import Addition, Arithmetic, Multiplication, Reverse
from lm_gym.tasks.evaluation import TaskAccuracy, evaluate_task, wilson_interval
from lm_gym.tasks.tool_evaluation import evaluate_tool_task
from lm_gym.tasks.tool_tasks import CalculatorArithmetic, calculator

BUILT_IN = {"addition": Addition, "multiplication": Multiplication, "reverse": Reverse,
            "calculator": CalculatorArithmetic}
REASONING_GYM_PREFIX = "reasoning-gym:"
TRAIN_PROBLEMS = 2000  # training problems an env made with task= draws its prompts from


def make_task(task, **options) -> Task:
    """A :class:`Task` from its name (``"addition"``, ``"reverse"``, ``"reasoning-gym:NAME"``) and its
    options (e.g. ``digits=3``), or ``task`` itself when it is one."""
    if isinstance(task, Task):
        if options:
            raise ValueError(f"options {sorted(options)} go to make_task with a task name, not with {task!r}")
        return task
    if not isinstance(task, str):
        raise TypeError(f"task={task!r:.80}; expected a task name or an lm_gym.tasks.Task")
    if task.startswith(REASONING_GYM_PREFIX):
        from lm_gym.tasks.reasoning_gym import ReasoningGymTask

        return ReasoningGymTask(task[len(REASONING_GYM_PREFIX):], **options)
    if task not in BUILT_IN:
        raise ValueError(f"unknown task {task!r}; expected one of {sorted(BUILT_IN)} or "
                         f"'{REASONING_GYM_PREFIX}<dataset>' (pip install 'lm-gym[reasoning]')")
    return BUILT_IN[task](**options)


__all__ = [
    "ANSWER_FORMAT", "Addition", "Arithmetic", "BUILT_IN", "CalculatorArithmetic", "Multiplication", "Problem", "Reverse", "TRAIN_PROBLEMS",
    "Task", "TaskAccuracy",
    "TaskReward", "calculator", "evaluate_task", "evaluate_tool_task", "extract_answer", "make_task", "numbers_equal", "parse_number",
    "wilson_interval",
]
