"""The reward protocol: score a batch of (prompt, response) texts at once.

Every reward is called as ``reward(prompts, responses, **context) -> torch.Tensor`` of shape (B,).
``context`` may carry token ids and per-token reference log-probs (see :class:`LanguageModelEnv`).
:meth:`Reward.evaluate` returns the total and its named components for logging; composite rewards
override it so that each component is computed once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch


class RewardOutput(NamedTuple):
    """A batch of rewards: ``total`` (B,) and its named components, each (B,)."""

    total: torch.Tensor
    components: dict[str, torch.Tensor]


class Reward:
    """Base class of batch rewards. Subclasses implement ``__call__`` and set ``name``.

    ``nonfinite`` says what to do with NaN or infinite scores: ``"raise"`` (default: an error naming the
    reward and the response) or a number to put in their place.
    """

    name: str = "reward"
    nonfinite: str | float = "raise"

    def __call__(self, prompts: Sequence[str], responses: Sequence[str], **context) -> torch.Tensor:
        raise NotImplementedError

    def evaluate(self, prompts: Sequence[str], responses: Sequence[str], **context) -> RewardOutput:
        """Score the batch; check shape and finiteness; return the total and ``{name: total}``."""
        total = check_scores(self.name, self(prompts, responses, **context), responses, self.nonfinite)
        return RewardOutput(total, {self.name: total})

    def bind(self, model, tokenizer) -> None:
        """Called by the env with its own LM, for rewards that score with it (judge, fluency, LM encoder)."""


class FunctionReward(Reward):
    """Wrap a Python function of texts as a reward.

    :param fn: ``fn(prompts, responses, **context)`` returning B numbers (list, array or tensor). With
        ``batched=False`` it is called as ``fn(prompt, response)`` once per pair instead.
    :param name: the component name in logs; default the function's name.
    :param batched: whether ``fn`` takes whole batches.
    :param nonfinite: ``"raise"`` or a number that replaces NaN/infinite scores.

    Example, sentiment with VADER (``pip install lm-gym[sentiment]``)::

        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
        analyzer = SentimentIntensityAnalyzer()
        sentiment = FunctionReward(lambda p, r: analyzer.polarity_scores(r)["compound"], "sentiment", batched=False)
    """

    def __init__(self, fn: Callable, name: str | None = None, batched: bool = True, nonfinite: str | float = "raise"):
        if not callable(fn):
            raise TypeError(f"reward {fn!r:.60} is not callable")
        self.fn = fn
        self.name = name or getattr(fn, "__name__", type(fn).__name__)
        self.batched = batched
        self.nonfinite = nonfinite

    def __call__(self, prompts, responses, **context) -> torch.Tensor:
        if self.batched:
            scores = self.fn(list(prompts), list(responses), **context)
        else:
            scores = [self.fn(p, r) for p, r in zip(prompts, responses)]
        return torch.as_tensor(scores, dtype=torch.float32).reshape(-1)


def as_reward(reward) -> Reward:
    """Accept a :class:`Reward` or any callable scoring ``(prompts, responses, **context)``."""
    return reward if isinstance(reward, Reward) else FunctionReward(reward)


def check_scores(name: str, scores, responses: Sequence[str], nonfinite: str | float = "raise") -> torch.Tensor:
    """Validate a reward's output: shape (B,) and finite (or NaN/inf replaced by the number ``nonfinite``)."""
    scores = torch.as_tensor(scores, dtype=torch.float32).detach()
    if scores.shape != (len(responses),):
        raise ValueError(f"reward {name!r} returned shape {tuple(scores.shape)}; expected ({len(responses)},)")
    bad = ~torch.isfinite(scores)
    if bool(bad.any()):
        if nonfinite != "raise":
            return torch.where(bad, torch.as_tensor(float(nonfinite), device=scores.device), scores)
        i = int(bad.nonzero()[0])
        raise ValueError(
            f"reward {name!r} returned {scores[i].item()} for response {responses[i]!r:.200}; "
            "fix the reward or set its nonfinite= option to a replacement value"
        )
    return scores
