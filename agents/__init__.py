"""lm-gym agents: the Transformer as the RL policy.

The agents build on :mod:`lm_gym`; nothing in :mod:`lm_gym` imports them. The optional RL library adapters
in :mod:`agents.integrations` build on :class:`TransformerActorCritic`.
"""

from agents.actor_critic import TransformerActorCritic
from agents.callbacks import SampleResponsesCallback
from agents.critic_free import GRPO, RLOO, CriticFreePPO, ReinforcePlusPlus
from agents.export import export_pretrained
from agents.policy import MaskableTransformerActorCriticPolicy, TransformerActorCriticPolicy
from agents.ppo import LMPPO
from agents.reward_model import RewardModel, evaluate_reward_model, train_reward_model
from agents.sft import sft

__all__ = [
    "GRPO", "LMPPO", "RLOO", "CriticFreePPO", "MaskableTransformerActorCriticPolicy", "ReinforcePlusPlus", "RewardModel",
    "SampleResponsesCallback",
    "TransformerActorCritic", "TransformerActorCriticPolicy", "evaluate_reward_model", "export_pretrained", "sft",
    "train_reward_model",
]
