"""Shaping terms, to add with :class:`WeightedSum`: missing EOS, length and repetition penalties.

Each is off unless you add it, and each reads what the env passes in the reward context
(``response_ids``, ``stopped``: whether the response ended with a stop token).
"""

from __future__ import annotations

import torch

from lm_gym.rewards.base import Reward


class MissingEOSPenalty(Reward):
    """-1 for a response cut at the length limit without a stop token, 0 otherwise."""

    name = "missing_eos"

    def __call__(self, prompts, responses, stopped=None, **context) -> torch.Tensor:
        if stopped is None:
            raise ValueError("MissingEOSPenalty needs context['stopped'] (the env passes it)")
        return torch.tensor([0.0 if s else -1.0 for s in stopped])


class LengthPenalty(Reward):
    """-(tokens beyond ``target``) / ``target``: 0 up to the target length, growing linearly past it.

    :param target: response length (tokens) that is free of penalty.
    """

    name = "length"

    def __init__(self, target: int = 32):
        if target < 1:
            raise ValueError(f"target must be >= 1, got {target}")
        self.target = target

    def __call__(self, prompts, responses, response_ids=None, **context) -> torch.Tensor:
        if response_ids is None:
            raise ValueError("LengthPenalty needs context['response_ids'] (the env passes it)")
        return torch.tensor([-max(len(ids) - self.target, 0) / self.target for ids in response_ids], dtype=torch.float32)


class RepetitionPenalty(Reward):
    """-(fraction of repeated n-grams) in the response tokens: 0 for no repeats, towards -1 for loops.

    :param n: n-gram size.
    """

    name = "repetition"

    def __init__(self, n: int = 3):
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        self.n = n

    def __call__(self, prompts, responses, response_ids=None, **context) -> torch.Tensor:
        if response_ids is None:
            raise ValueError("RepetitionPenalty needs context['response_ids'] (the env passes it)")
        return torch.tensor([-self._repeated(ids) for ids in response_ids], dtype=torch.float32)

    def _repeated(self, ids: list[int]) -> float:
        grams = [tuple(ids[i : i + self.n]) for i in range(len(ids) - self.n + 1)]
        return 1.0 - len(set(grams)) / len(grams) if grams else 0.0
