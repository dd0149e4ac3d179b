"""RLlib env side: the LM env registered with Ray Tune, with RLlib's action-masking observations.

:func:`register_env` registers :func:`make_env` (``LanguageModelEnv`` keywords as RLlib's ``env_config``; with
``num_envs``, as in RLlib's ``"vector_entry_point"`` mode, the batched vector env). With
``allowed_token_ids`` in the env config, observations follow RLlib's action-masking convention:
``{"action_mask": (V,) 0/1, "observations": {"input_ids", "attention_mask"}}``.

The agent side (the Transformer as an RLModule, its learner and ``ppo_config``) is
:mod:`agents.integrations.rllib`.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from ray.tune.registry import register_env as tune_register_env

from lm_gym.env import LanguageModelEnv
from lm_gym.vector_env import LanguageModelVectorEnv

ENV_NAME = "LanguageModelEnv-v0"
MASK_KEY, OBS_KEY = "action_mask", "observations"


# --- env ------------------------------------------------------------------------------------------------


def mask_space(observation_space: spaces.Space, vocab_size: int) -> spaces.Dict:
    """RLlib's action-masking observation space around ``observation_space``."""
    return spaces.Dict({MASK_KEY: spaces.Box(0, 1, shape=(vocab_size,), dtype=np.int8), OBS_KEY: observation_space})


class ActionMaskObservation(gym.ObservationWrapper):
    """Observations ``{"action_mask": env.action_masks(), "observations": obs}`` of a :class:`LanguageModelEnv`.

    :param env: the env (made with ``allowed_token_ids``).
    """

    def __init__(self, env: gym.Env):
        super().__init__(env)
        self.observation_space = mask_space(env.observation_space, env.action_space.n)
        self.action_mask = env.unwrapped.action_masks().astype(np.int8)  # fixed for the env's life

    def observation(self, observation):
        return {MASK_KEY: self.action_mask.copy(), OBS_KEY: observation}


class VectorActionMaskObservation(gym.vector.VectorObservationWrapper):
    """:class:`ActionMaskObservation` for a :class:`LanguageModelVectorEnv` (masks batched per row).

    :param env: the vector env (made with ``allowed_token_ids``).
    """

    def __init__(self, env: gym.vector.VectorEnv):
        super().__init__(env)
        self.single_observation_space = mask_space(env.single_observation_space, env.single_action_space.n)
        self.observation_space = gym.vector.utils.batch_space(self.single_observation_space, env.num_envs)
        self.action_masks = env.unwrapped.action_masks().astype(np.int8)  # fixed for the env's life

    def observations(self, observations):
        return {MASK_KEY: self.action_masks.copy(), OBS_KEY: observations}


def make_env(env_config: dict) -> gym.Env:
    """A :class:`LanguageModelEnv` from RLlib's ``env_config`` (its keywords).

    RLlib adds ``num_envs`` in its ``"vector_entry_point"`` vectorize mode: then a batched
    :class:`LanguageModelVectorEnv` (one forward per step for all rows). With ``allowed_token_ids`` the
    observations carry the action mask (see the module docstring).

    :param env_config: ``LanguageModelEnv`` keywords (plus ``num_envs``); an RLlib ``EnvContext`` is fine.
    """
    kwargs = dict(env_config)
    masked = kwargs.get("allowed_token_ids") is not None
    if "num_envs" in kwargs:
        env = LanguageModelVectorEnv(**kwargs)
        return VectorActionMaskObservation(env) if masked else env
    env = LanguageModelEnv(**kwargs)
    return ActionMaskObservation(env) if masked else env


def register_env(name: str = ENV_NAME) -> str:
    """Register :func:`make_env` with Ray Tune under ``name`` (what ``config.environment(name)`` takes).

    :param name: the env name; RLlib's registry takes precedence over gymnasium's id of the same name.
    :return: ``name``.
    """
    tune_register_env(name, make_env)
    return name


def split_observation(obs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(input ids, attention mask, action mask or None) of a batched (possibly action-masked) observation."""
    action_mask = None
    if MASK_KEY in obs:
        obs, action_mask = obs[OBS_KEY], obs[MASK_KEY]
    return obs["input_ids"], obs["attention_mask"], action_mask
