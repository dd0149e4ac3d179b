"""Advantages: per-token rewards with the KL penalty, generalised advantage estimation over token segments
(PPO's, with a critic), and the critic-free estimators over whole episodes (GRPO, Dr. GRPO, RLOO, REINFORCE++).

Per-token tensors are (S, T): S segments (pieces of episodes) padded to T tokens, with ``mask`` marking real
tokens. A segment's last real token is where it ends: at an EOS (terminated: nothing to bootstrap), at the
length limit or the end of a rollout (truncated: bootstrap with the value of the next state).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

GROUP_ESTIMATORS = ("grpo", "dr_grpo", "rloo")  # sequence advantages relative to the episode's prompt group
ESTIMATORS = (*GROUP_ESTIMATORS, "reinforce++")


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


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, eps: float = 1e-4, over=None) -> torch.Tensor:
    """Standardise the real entries of ``values`` (mean 0, std 1); padding stays 0.

    ``over`` = (values, mask) whose statistics standardise (default: ``values``' own), so that the parts of a
    batch are standardised as the whole would be. Divides by sqrt(var + eps): a std floor of 0.01, far below
    that of advantages built from normalised rewards. When a rollout holds no reward signal (every advantage
    ~0, as with a fresh zero value head and no reward) rounding noise stays tiny instead of being blown up
    into unit-size random advantages, which Adam would turn into full-size random steps.
    """
    reference, reference_mask = over if over is not None else (values, mask)
    count = reference_mask.sum()
    mean = (reference * reference_mask).sum() / count
    var = (((reference - mean) * reference_mask) ** 2).sum() / (count - 1).clamp(min=1)
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


def returns_to_go(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """G_t = Σ_{s ≥ t} r_s within each episode (γ = 1), zero on padding."""
    masked = rewards * mask
    return (masked.flip(1).cumsum(1).flip(1)) * mask


def group_ids(groups: Sequence) -> torch.Tensor:
    """(S,) consecutive ints 0..K-1 numbering the distinct entries of ``groups`` (any hashable ids)."""
    index: dict = {}
    return torch.tensor([index.setdefault(group, len(index)) for group in groups], dtype=torch.long)


def group_advantages(returns: torch.Tensor, groups: Sequence, estimator: str, eps: float = 1e-4) -> torch.Tensor:
    """(S,) sequence advantages of S episodes with returns (S,), each in the prompt group ``groups[i]``:

    - ``"grpo"``: (R - mean of the group) / (std of the group + eps), the sample std (n - 1);
    - ``"dr_grpo"``: R - mean of the group (Dr. GRPO: no division by the std, which weights groups of nearly
      equal rewards up);
    - ``"rloo"``: R - mean of the other episodes of the group (the leave-one-out baseline),
      = G/(G - 1) · (R - mean of the group).

    Every group needs at least 2 episodes; a group whose returns are all equal gets advantages 0.
    """
    if estimator not in GROUP_ESTIMATORS:
        raise ValueError(f"estimator={estimator!r}; expected one of {GROUP_ESTIMATORS}")
    index = group_ids(groups).to(returns.device)
    count = torch.zeros(int(index.max()) + 1 if len(index) else 0, dtype=returns.dtype, device=returns.device)
    count.index_add_(0, index, torch.ones_like(returns))
    if len(count) and int(count.min()) < 2:
        raise ValueError(f"{estimator} compares the episodes of a prompt group and needs at least 2 per group; got "
                         f"a group of {int(count.min())} (give the env group_size >= 2)")
    total = torch.zeros_like(count).index_add_(0, index, returns)
    mean, size = (total / count)[index], count[index]
    if estimator == "rloo":
        return (returns - mean) * size / (size - 1)
    centred = returns - mean
    if estimator == "dr_grpo":
        return centred
    variance = torch.zeros_like(count).index_add_(0, index, centred**2)[index] / (size - 1)
    return centred / (variance.sqrt() + eps)


def uniform_groups(returns: torch.Tensor, groups: Sequence, tolerance: float = 1e-6) -> torch.Tensor:
    """(S,) True on the episodes of groups whose returns are all equal (within ``tolerance``): no signal
    for a group-relative estimator."""
    index = group_ids(groups).to(returns.device)
    size = int(index.max()) + 1 if len(index) else 0
    high = torch.full((size,), -torch.inf, dtype=returns.dtype, device=returns.device).scatter_reduce(
        0, index, returns, "amax")
    low = torch.full((size,), torch.inf, dtype=returns.dtype, device=returns.device).scatter_reduce(
        0, index, returns, "amin")
    return ((high - low) <= tolerance)[index]
