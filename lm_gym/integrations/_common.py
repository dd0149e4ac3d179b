"""What the adapters share: the allowed-token mask (as an observation entry, applied to logits), numeric infos."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces

REF_LOGPROB_KEY = "ref_logprob"


class TokenMaskObservation(gym.ObservationWrapper):
    """Adds the env's allowed-token mask, a bool (V,) array, to every observation under ``key``.

    The mask is constant over an env's life (``allowed_token_ids``); libraries that read legal actions from
    the observation (Tianshou's ``obs.mask``, TorchRL's ``"action_mask"``) find it there.

    :param env: a :class:`lm_gym.LanguageModelEnv` (possibly wrapped).
    :param key: the observation key of the mask.
    """

    def __init__(self, env: gym.Env, key: str):
        super().__init__(env)
        self.key = key
        self.token_mask = env.unwrapped.action_masks()
        self.observation_space = with_token_mask(env.observation_space, key, len(self.token_mask))

    def observation(self, observation: dict) -> dict:
        """The observation with the allowed-token mask added."""
        return {**observation, self.key: self.token_mask.copy()}


class NumericInfos(gym.Wrapper):
    """A single env whose infos hold only ``ref_logprob`` (float32), the same keys at every step.

    Libraries that stack infos into arrays or tensors (TorchRL, Tianshou's buffers) cannot hold the text
    entries of an episode's last step (prompt, response: ``env.render()`` and the reward's context still give
    them), nor keys present on some steps only. Reset infos are empty.
    """

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        """Reset the env; the info is empty."""
        observation, _ = self.env.reset(seed=seed, options=options)
        return observation, {}

    def step(self, action):
        """Step the env; the info keeps ``ref_logprob`` only."""
        observation, reward, terminated, truncated, info = self.env.step(action)
        numeric = {REF_LOGPROB_KEY: np.float32(info[REF_LOGPROB_KEY])} if REF_LOGPROB_KEY in info else {}
        return observation, reward, terminated, truncated, numeric


def with_token_mask(space: spaces.Dict, key: str, vocab_size: int) -> spaces.Dict:
    """``space`` with a bool (V,) entry ``key`` added."""
    return spaces.Dict({**space.spaces, key: spaces.Box(0, 1, shape=(vocab_size,), dtype=np.bool_)})


def token_batch(input_ids, attention_mask, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask), int64 (B, L) on ``device``, from token observations (arrays or tensors) of any batch shape."""
    ids, mask = (torch.as_tensor(x, device=device) for x in (input_ids, attention_mask))
    return ids.reshape(-1, ids.shape[-1]).long(), mask.reshape(-1, mask.shape[-1]).long()


def masked_logits(logits: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
    """``logits`` with the disallowed tokens (``token_mask`` False) at the dtype's lowest value (π = 0 there).

    :param logits: action logits (..., V).
    :param token_mask: bool-like (..., V) mask broadcastable to ``logits``, or ``None`` (every token allowed).
    """
    if token_mask is None:
        return logits
    allowed = torch.as_tensor(token_mask, device=logits.device).bool()
    return logits.masked_fill(~allowed, torch.finfo(logits.dtype).min)
