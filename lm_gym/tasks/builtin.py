"""Small tasks that need no extra package: two-number arithmetic (addition, multiplication) and reversing a
short string.

Each problem goes to the ``"eval"`` split or the ``"train"`` split by a hash of what it asks (a fifth are
held out), so no held-out problem is ever trained on; within a split, problems are drawn from a fixed seed.
"""

from __future__ import annotations

import string
import zlib

import numpy as np

from lm_gym.tasks.answers import ANSWER_FORMAT, NUMBER_FORMAT, last_number, numbers_equal
from lm_gym.tasks.base import Problem, Task

HELD_OUT_EVERY = 5  # one problem in 5 belongs to the eval split
STALE_DRAWS = 20  # draws per problem asked for, without a new one, after which a split counts as exhausted


def split_of(key: str) -> str:
    """The split a problem belongs to, from a stable hash of ``key`` (what it asks)."""
    return "eval" if zlib.crc32(key.encode()) % HELD_OUT_EVERY == 0 else "train"


class SampledTask(Task):
    """A task whose problems are drawn at random and assigned to a split by :func:`split_of`."""

    seed: int = 0

    def draw(self, rng: np.random.Generator) -> tuple[str, Problem]:
        """One random problem and the key that decides its split."""
        raise NotImplementedError

    def make_problems(self, split: str, count: int, at_most: bool = False) -> list[Problem]:
        """Distinct problems in the order drawn; the split is taken to hold no more once ``STALE_DRAWS`` per
        problem asked for have found nothing new (a problem drawn 1 time in N is then missed with chance
        about exp(-STALE_DRAWS · count / N))."""
        rng = np.random.default_rng([self.seed, 0 if split == "train" else 1])
        problems: dict[str, Problem] = {}
        stale = 0
        while stale < STALE_DRAWS * count:
            key, problem = self.draw(rng)
            stale += 1
            if split_of(key) == split and key not in problems:
                problems[key], stale = problem, 0
                if len(problems) == count:
                    return list(problems.values())
        if at_most:
            return list(problems.values())
        raise ValueError(f"task {self.name!r} has {len(problems)} distinct {split} problems, fewer than the {count} "
                         "asked for; ask for fewer (or at_most=True)")


class Arithmetic(SampledTask):
    """"What is a OP b? Answer with a number." for a of ``digits[0]`` digits and b of ``digits[1]`` (in either
    order with ``either_order``); the last number of the response is the answer, compared as an exact number
    (:func:`last_number`)."""

    OPERATIONS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
    instruction = NUMBER_FORMAT  # what the prompt asks for after the question

    def __init__(self, operation: str = "+", digits: tuple[int, int] = (2, 2), seed: int = 0, name: str | None = None,
                 either_order: bool = False):
        if operation not in self.OPERATIONS:
            raise ValueError(f"operation={operation!r}; expected one of {sorted(self.OPERATIONS)}")
        if len(digits) != 2 or not all(1 <= d <= 12 for d in digits):
            raise ValueError(f"digits={digits!r}; expected two digit counts from 1 to 12")
        self.operation, self.digits, self.seed, self.either_order = operation, tuple(digits), seed, either_order
        self.name = name or f"arithmetic{operation}"

    def draw(self, rng):
        a, b = (int(rng.integers(10 ** (d - 1) if d > 1 else 0, 10**d)) for d in self.digits)
        if self.either_order and rng.random() < 0.5:
            a, b = b, a
        key = f"{a}{self.operation}{b}"
        answer = self.OPERATIONS[self.operation](a, b)
        return key, Problem(self.prompt(f"{a} {self.operation} {b}"), str(answer))

    def prompt(self, expression: str) -> str:
        """The question about ``expression`` ("47 + 38"), with the task's instruction."""
        return f"What is {expression}? {self.instruction}"

    def extract_answer(self, response):
        return last_number(response)

    def is_correct(self, problem, answer):
        return numbers_equal(answer, problem.answer)


class Addition(Arithmetic):
    """Two-digit addition, "What is 47 + 38?": the default model solves about 12% greedily."""

    def __init__(self, digits: tuple[int, int] = (2, 2), seed: int = 0):
        super().__init__("+", digits, seed, "addition")


class Multiplication(Arithmetic):
    """A two-digit number times a one-digit one, in either order, "What is 47 * 8?": the default model solves
    about 28% greedily."""

    def __init__(self, digits: tuple[int, int] = (2, 1), seed: int = 0):
        super().__init__("*", digits, seed, "multiplication", either_order=True)


class Reverse(SampledTask):
    """"Reverse the letters of 'abc'." for random lowercase strings of ``min_length`` to ``max_length``
    letters; the answer must be the reversed string exactly (case and surrounding quotes aside)."""

    def __init__(self, min_length: int = 3, max_length: int = 4, seed: int = 0):
        if not 1 <= min_length <= max_length <= 40:
            raise ValueError(f"lengths {min_length}..{max_length}; expected 1 <= min_length <= max_length <= 40")
        self.min_length, self.max_length, self.seed, self.name = min_length, max_length, seed, "reverse"

    def draw(self, rng):
        length = int(rng.integers(self.min_length, self.max_length + 1))
        word = "".join(rng.choice(list(string.ascii_lowercase), size=length))
        return word, Problem(f"Reverse the letters of '{word}'. {ANSWER_FORMAT}", word[::-1])

    def is_correct(self, problem, answer):
        return answer.strip().strip("'\"").lower() == problem.answer
