"""lm-gym agents: the Transformer as the RL policy.

The agents build on :mod:`lm_gym`; :mod:`lm_gym` never imports them.
"""

from agents.export import export_pretrained
from agents.policy import MaskableTransformerActorCriticPolicy, TransformerActorCriticPolicy
from agents.ppo import LMPPO

__all__ = ["LMPPO", "MaskableTransformerActorCriticPolicy", "TransformerActorCriticPolicy", "export_pretrained"]
