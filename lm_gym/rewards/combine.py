"""Blending rewards: ``WeightedSum`` of components and the design's ``BlendedReward`` r = α·r_f + (1-α)·r_m."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lm_gym.rewards.base import Reward, RewardOutput, as_reward, check_scores


class RunningMeanStd:
    """Running mean and variance of a stream of scores (parallel-update formula)."""

    def __init__(self, epsilon: float = 1e-4):
        self.mean, self.var, self.count = 0.0, 1.0, epsilon

    def update(self, scores: torch.Tensor) -> None:
        """Fold a batch of scores into the statistics."""
        batch_mean, batch_var, n = float(scores.mean()), float(scores.var(unbiased=False)), scores.numel()
        delta, total = batch_mean - self.mean, self.count + n
        self.mean += delta * n / total
        self.var = (self.var * self.count + batch_var * n + delta**2 * self.count * n / total) / total
        self.count = total

    def normalise(self, scores: torch.Tensor) -> torch.Tensor:
        """Scores standardised with the current statistics."""
        return (scores - self.mean) / (self.var**0.5 + 1e-8)


class WeightedSum(Reward):
    """r = Σ_k w_k · r_k over named component rewards; ``info["reward_components"]`` reports each r_k.

    :param terms: ``[(weight, reward), ...]``; rewards may be plain callables.
    :param normalize: standardise each component with its running mean and std (updated on every batch)
        before weighting. Off by default: components keep their own scale.
    :param name: the name of the total.
    """

    def __init__(self, terms: Sequence[tuple[float, object]], normalize: bool = False, name: str = "weighted_sum"):
        if not terms:
            raise ValueError("WeightedSum needs at least one (weight, reward) term")
        self.weights = [float(weight) for weight, _ in terms]
        self.rewards = [as_reward(reward) for _, reward in terms]
        self.names = _unique_names([reward.name for reward in self.rewards])
        self.normalize, self.name = normalize, name
        self.statistics = [RunningMeanStd() for _ in self.rewards]

    def bind(self, reference) -> None:
        """Bind every component to the env's reference model."""
        for reward in self.rewards:
            reward.bind(reference)

    def refresh(self) -> None:
        """Refresh every component (between rollouts)."""
        for reward in self.rewards:
            reward.refresh()

    def evaluate(self, prompts, responses, **context) -> RewardOutput:
        """Score every component once; return the weighted total and the raw components (with the parts of a
        component that has several, such as a task's ``correct`` and ``formatted``)."""
        total, components = torch.zeros(len(responses)), {}
        for weight, reward, name, stats in zip(self.weights, self.rewards, self.names, self.statistics):
            output = reward.evaluate(prompts, responses, **context)
            scores = check_scores(name, output.total, responses, reward.nonfinite).cpu()
            components[name] = scores
            if len(output.components) > 1:
                for part, values in output.components.items():
                    components.setdefault(part, values.cpu())
            if self.normalize:
                stats.update(scores)
                scores = stats.normalise(scores)
            total = total + weight * scores
        return RewardOutput(total, components)

    def __call__(self, prompts, responses, **context) -> torch.Tensor:
        return self.evaluate(prompts, responses, **context).total


class BlendedReward(WeightedSum):
    """The design's blend of human feedback and a model reward: r = α·r_f + (1-α)·r_m.

    :param feedback_reward: r_f, usually a :class:`lm_gym.rewards.FeedbackReward`.
    :param model_reward: r_m: a reward model, the LM as judge, fluency, or any reward.
    :param alpha: weight of r_f, in [0, 1].
    :param normalize: standardise r_f and r_m with running statistics before blending (off by default).
    """

    def __init__(self, feedback_reward, model_reward, alpha: float = 0.5, normalize: bool = False):
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha={alpha} is outside [0, 1]")
        super().__init__([(alpha, feedback_reward), (1.0 - alpha, model_reward)], normalize, name="blended")
        self.alpha = alpha


def _unique_names(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    unique = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        unique.append(name if seen[name] == 1 else f"{name}_{seen[name]}")
    return unique
