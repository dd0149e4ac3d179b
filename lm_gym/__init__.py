"""lm-gym: a causal language model as a Gymnasium environment.

``import lm_gym`` registers ``LanguageModelEnv-v0``::

    import gymnasium as gym
    import lm_gym

    env = gym.make("LanguageModelEnv-v0")           # embedded SmolLM2-135M-Instruct
    env = gym.make("LanguageModelEnv-v0", model="tiny", max_new_tokens=16)
    envs = gym.make_vec("LanguageModelEnv-v0", num_envs=32)  # one batched forward per step
"""

import os

import gymnasium
import torch

from lm_gym.config import EnvConfig, MultiTurn
from lm_gym.env import LanguageModelEnv
from lm_gym.models import ModelNotFoundError, cache_dir, load_model
from lm_gym.reference import ReferenceModel
from lm_gym.rewards import BlendedReward, FeedbackReward, FluencyReward, FunctionReward, Reward
from lm_gym.vector_env import LanguageModelVectorEnv

__version__ = "0.1.0"

ENV_ID = "LanguageModelEnv-v0"

if ENV_ID not in gymnasium.registry:
    gymnasium.register(
        id=ENV_ID, entry_point="lm_gym.env:LanguageModelEnv", vector_entry_point="lm_gym.vector_env:LanguageModelVectorEnv"
    )


def _one_torch_thread_after_fork() -> None:
    """In a forked child (``AsyncVectorEnv``'s default on Linux), run torch's CPU ops on one thread.

    Torch's CPU thread pool is GNU OpenMP, which does not survive ``fork``: once the parent has run a parallel
    op, a child's first parallel op waits forever at the pool's barrier for threads that only the parent has.
    One thread per child never enters the pool (and N env workers do not oversubscribe the cores).
    """
    torch.set_num_threads(1)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_one_torch_thread_after_fork)

__all__ = [
    "BlendedReward",
    "ENV_ID",
    "EnvConfig",
    "FeedbackReward",
    "FluencyReward",
    "FunctionReward",
    "LanguageModelEnv",
    "LanguageModelVectorEnv",
    "ModelNotFoundError",
    "MultiTurn",
    "ReferenceModel",
    "Reward",
    "cache_dir",
    "load_model",
]
