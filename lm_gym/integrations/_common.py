"""What the env-side adapters share: the allowed-token mask as an observation entry, numeric infos."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
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
