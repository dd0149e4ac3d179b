"""Fluency: how likely the reference LM finds the response."""

from __future__ import annotations

import torch

from lm_gym.rewards.base import Reward


class FluencyReward(Reward):
    """Mean per-token log-likelihood of the response under the reference LM (≤ 0; higher is more fluent).

    Reads ``context["ref_logprobs"]`` (one 1-D tensor per response, as :class:`LanguageModelEnv` passes
    them: the env's LM is the reference and scored every token as it was taken), so it costs no forward.
    """

    name = "fluency"

    def __call__(self, prompts, responses, ref_logprobs=None, **context) -> torch.Tensor:
        if ref_logprobs is None:
            raise ValueError("FluencyReward needs context['ref_logprobs'] (one tensor of token log-probs per response)")
        return torch.stack([lp.float().mean() if len(lp) else torch.tensor(0.0) for lp in ref_logprobs])
