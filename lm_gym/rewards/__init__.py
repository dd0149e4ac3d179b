"""Rewards: batch scorers of (prompt, response) texts. See :mod:`lm_gym.rewards.base` for the protocol."""

from lm_gym.rewards.base import FunctionReward, Reward, RewardOutput, as_reward, check_scores
from lm_gym.rewards.fluency import FluencyReward

__all__ = ["FluencyReward", "FunctionReward", "Reward", "RewardOutput", "as_reward", "check_scores"]
