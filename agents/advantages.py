"""Per-token rewards with the KL penalty, and generalised advantage estimation over token segments.

All tensors are (S, T): S segments (pieces of episodes) padded to T tokens, with ``mask`` marking real
tokens. A segment's last real token is where it ends: at an EOS (terminated: nothing to bootstrap), at the
length limit or the end of a rollout (truncated: bootstrap with the value of the next state).
"""

from __future__ import annotations

import torch


def kl_shaped_rewards(
    scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, kl_coef: float
) -> torch.Tensor:
    """r_t = -kl_coef * (log π(a_t|s_t) - log π_ref(a_t|s_t)) + score_t, zero on padding.

    ``scores`` holds the env's rewards per token (the sequence reward sits on the episode's last token).
    """
    return (scores - kl_coef * (logprobs - ref_logprobs)) * mask


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, next_values: torch.Tensor,
    gamma: float = 1.0, lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns) by GAE(γ, λ) inside each segment.

    :param next_values: (S,) value of the state after each segment's last token: V(s') when the segment
        was truncated, 0 when it terminated.
    """
    segments, steps = rewards.shape
    lengths = mask.sum(dim=1).long()
    advantages = torch.zeros_like(rewards)
    running = torch.zeros(segments, dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(steps)):
        last = lengths - 1 == t
        following = torch.where(last, next_values, values[:, t + 1] if t + 1 < steps else next_values)
        delta = rewards[:, t] + gamma * following - values[:, t]
        running = torch.where(last, delta, delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
    return advantages, (advantages + values) * mask


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """Standardise the real entries of ``values`` (mean 0, std 1); padding stays 0.

    Divides by sqrt(var + eps): a std floor of 0.01, far below that of advantages built from normalised
    rewards. When a rollout holds no reward signal (every advantage ~0, as with a fresh zero value head and
    no reward) rounding noise stays tiny instead of being blown up into unit-size random advantages,
    which Adam would turn into full-size random steps.
    """
    count = mask.sum()
    mean = (values * mask).sum() / count
    var = (((values - mean) * mask) ** 2).sum() / (count - 1).clamp(min=1)
    return (values - mean) * torch.rsqrt(var + eps) * mask


def adaptive_kl_coef(kl_coef: float, kl: float, kl_target: float, tokens: int, horizon: int) -> float:
    """The adaptive KL controller (Ziegler et al., 2019): move β towards the one that gives ``kl_target``.

    β ← β · (1 + clip(kl / kl_target - 1, -0.2, 0.2) · tokens / horizon), with ``kl`` the measured mean KL
    per episode over the ``tokens`` tokens just collected.
    """
    error = min(max(kl / kl_target - 1.0, -0.2), 0.2)
    return kl_coef * (1.0 + error * tokens / horizon)


class KLController:
    """β of the per-token KL penalty: fixed, or moved towards ``target`` once per rollout (:meth:`update`).

    :param coef: the starting β.
    :param target: the mean KL per episode to aim for; ``None`` keeps β fixed.
    :param horizon: horizon (in tokens) of the adaptive controller (:func:`adaptive_kl_coef`).
    """

    def __init__(self, coef: float, target: float | None = None, horizon: int = 10_000):
        self.coef, self.target, self.horizon = float(coef), target, horizon

    def update(self, kl: float, tokens: int) -> float:
        """Adapt β to a rollout's mean KL per episode over its ``tokens`` tokens (no-op without a target)."""
        if self.target is not None:
            self.coef = adaptive_kl_coef(self.coef, kl, self.target, tokens, self.horizon)
        return self.coef
