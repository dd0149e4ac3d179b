"""The reward protocol: score a batch of (prompt, response) texts at once.

Every reward is called as ``reward(prompts, responses, **context) -> torch.Tensor`` of shape (B,).
``context`` may carry token ids and per-token reference log-probs (see :class:`LanguageModelEnv`).
:meth:`Reward.evaluate` returns the total and its named components for logging; composite rewards
override it so that each component is computed once.
"""

from __future__ import annotations

import inspect
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

    def bind(self, reference) -> None:
        """Called by the env with its :class:`lm_gym.reference.ReferenceModel`, for rewards that score with the
        reference LM (judge, fluency, LM encoder); others ignore it."""

    def refresh(self) -> None:
        """Called between rollouts (never during one), for rewards over data that grows while training runs
        (a live feedback store takes in new ratings here); others ignore it."""


class FunctionReward(Reward):
    """Wrap a Python function of texts as a reward.

    :param fn: ``fn(prompts, responses, **context)`` returning B numbers (list, array or tensor). It gets only
        the context keywords its signature names (all of them with ``**context``; see :class:`Reward`). With
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
        self.context_keys = accepted_keywords(fn) if batched else frozenset()

    def __call__(self, prompts, responses, **context):
        if not self.batched:
            return [self.fn(p, r) for p, r in zip(prompts, responses)]
        if self.context_keys is not None:
            context = {key: value for key, value in context.items() if key in self.context_keys}
        return self.fn(list(prompts), list(responses), **context)


def accepted_keywords(fn: Callable) -> frozenset[str] | None:
    """The keyword names ``fn`` takes after ``(prompts, responses)``; None when it takes ``**kwargs`` (all)."""
    try:
        parameters = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # a builtin without a signature: pass everything
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    positional = [p for p in parameters if p.kind in (inspect.Parameter.POSITIONAL_ONLY,
                                                      inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    if len(positional) < 2 and not any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in parameters):
        raise TypeError(f"reward function {getattr(fn, '__name__', fn)!r} takes {len(positional)} positional "
                        "arguments; expected fn(prompts, responses, **context)")
    return frozenset(p.name for p in parameters[2:] if p.kind is not inspect.Parameter.VAR_POSITIONAL)


def as_reward(reward) -> Reward:
    """Accept a :class:`Reward` or any callable scoring ``(prompts, responses, **context)``."""
    return reward if isinstance(reward, Reward) else FunctionReward(reward)


def check_scores(name: str, scores, responses: Sequence[str], nonfinite: str | float = "raise") -> torch.Tensor:
    """Validate a reward's output: B real numbers (list, array or tensor), finite (or NaN/inf replaced by the
    number ``nonfinite``); a float32 (B,) tensor. Anything else raises an error naming the reward."""
    try:
        scores = torch.as_tensor(scores, dtype=torch.float32).detach()
    except (TypeError, ValueError, RuntimeError) as err:
        where = f" for responses such as {responses[0]!r:.120}" if len(responses) else ""
        raise TypeError(
            f"reward {name!r} returned {scores!r:.120} ({type(scores).__name__}){where}; expected "
            f"{len(responses)} real numbers (a list, numpy array or tensor of shape ({len(responses)},))"
        ) from err
    if scores.dim() != 1 and scores.numel() == len(responses):
        scores = scores.reshape(-1)  # a scalar for one response, or (B, 1)
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
