"""Estimators of the KL to the reference from the sampled tokens' log-probs (Schulman, "Approximating KL
divergence", 2020), and where a critic-free agent puts the KL (:data:`KL_PLACEMENTS`).

With r = π_ref(a) / π(a) for a ~ π: k1 = -log r is unbiased but can be negative per sample; k3 = (r - 1) - log r
is unbiased and never negative. The exact KL over the vocabulary is :attr:`lm_gym.logprobs.TokenLogprobs.kl`.
"""

from __future__ import annotations

import torch

KL_PLACEMENTS = ("reward", "loss", "full")  # k1 in the reward, k3 in the loss, the exact KL in the loss


def k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """log π(a) - log π_ref(a), elementwise."""
    return logprobs - ref_logprobs


def k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """π_ref(a)/π(a) - log(π_ref(a)/π(a)) - 1, elementwise (0 where the two agree)."""
    log_ratio = ref_logprobs - logprobs
    return torch.expm1(log_ratio) - log_ratio
