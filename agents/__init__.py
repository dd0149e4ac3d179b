"""lm-gym agents: the Transformer as the RL policy.

The agents build on :mod:`lm_gym`; :mod:`lm_gym` never imports them.
"""

from agents.callbacks import SampleResponsesCallback
from agents.export import export_pretrained
from agents.policy import MaskableTransformerActorCriticPolicy, TransformerActorCriticPolicy
from agents.ppo import LMPPO

__all__ = [
    "LMPPO", "MaskableTransformerActorCriticPolicy", "SampleResponsesCallback", "TransformerActorCriticPolicy",
    "export_pretrained",
]
