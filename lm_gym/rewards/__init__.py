"""Rewards: batch scorers of (prompt, response) texts. See :mod:`lm_gym.rewards.base` for the protocol.

- human feedback: :class:`FeedbackReward`
- model rewards: :class:`RewardModelReward`, :class:`LMJudgeReward`, :class:`FluencyReward`, :class:`FunctionReward`
- blends: :class:`BlendedReward` (r = α·r_f + (1-α)·r_m), :class:`WeightedSum`
- shaping: :class:`MissingEOSPenalty`, :class:`LengthPenalty`, :class:`RepetitionPenalty`
"""

from lm_gym.rewards.base import FunctionReward, Reward, RewardOutput, as_reward, check_scores
from lm_gym.rewards.combine import BlendedReward, RunningMeanStd, WeightedSum
from lm_gym.rewards.encoders import LMEncoder, SentenceEncoder
from lm_gym.rewards.feedback import FeedbackReward
from lm_gym.rewards.model_rewards import FluencyReward, LMJudgeReward, RewardModelReward
from lm_gym.rewards.shaping import LengthPenalty, MissingEOSPenalty, RepetitionPenalty


def default_reward() -> Reward:
    """The env's default: ``BlendedReward(FeedbackReward("default"), FluencyReward(), alpha=0.5)``."""
    return BlendedReward(FeedbackReward("default"), FluencyReward(), alpha=0.5)


__all__ = [
    "BlendedReward", "FeedbackReward", "FluencyReward", "FunctionReward", "LMEncoder", "LMJudgeReward",
    "LengthPenalty", "MissingEOSPenalty", "RepetitionPenalty", "Reward", "RewardModelReward", "RewardOutput",
    "RunningMeanStd", "SentenceEncoder", "WeightedSum", "as_reward", "check_scores", "default_reward",
]
