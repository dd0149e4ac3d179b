"""TorchRL agent side (``pip install lm-gym[torchrl]``): the Transformer as TorchRL's actor and critic.

:func:`make_torchrl_actor_critic` turns a :class:`agents.actor_critic.TransformerActorCritic`
into a ``ProbabilisticActor`` (a categorical distribution over the latest token's logits, sampled by default,
log-prob returned) and a ``ValueOperator`` (``"state_value"``), ready for TorchRL's ``ClipPPOLoss`` and
``GAE`` (:func:`make_torchrl_gae` sets it up for a Transformer). Under ``torch.no_grad()`` (collectors,
``rollout`` inside ``no_grad``) the actor runs only the new token of each row through a KV cache; with
gradients every call is a full forward.
"""

from __future__ import annotations

import torch
from tensordict.nn import InteractionType, TensorDictModule
from torch import nn
from torchrl.envs import EnvBase
from torchrl.modules import ProbabilisticActor, ValueOperator
from torchrl.objectives.value import GAE

from agents.actor_critic import TransformerActorCritic, token_batch
from agents.rollout_cache import RolloutCache
from lm_gym.integrations.torchrl import ACTION_MASK_KEY, OBSERVATION_KEYS
from lm_gym.logprobs import mask_logits

LOG_PROB_KEY = "action_log_prob"


def make_torchrl_actor_critic(actor_critic: TransformerActorCritic, env: EnvBase | None = None
                              ) -> tuple[ProbabilisticActor, ValueOperator]:
    """A TorchRL actor and critic on one :class:`agents.actor_critic.TransformerActorCritic`.

    :param actor_critic: the Transformer actor-critic (its value head and, with ``value_head="separate"``,
        its critic LM give the values).
    :param env: a TorchRL env from :func:`make_torchrl_env`: its action spec goes to the actor, and its
        ``"action_mask"`` observation, when it has one, masks the actor's logits. ``None``: no spec, no mask.
    :return: ``(actor, value)``, see :func:`make_torchrl_actor` and :func:`make_torchrl_value`.
    """
    action_spec, mask_key = None, None
    if env is not None:
        action_spec = env.action_spec_unbatched if env.batch_size else env.action_spec
        mask_key = ACTION_MASK_KEY if ACTION_MASK_KEY in env.observation_spec.keys() else None
    actor = make_torchrl_actor(actor_critic, action_spec=action_spec, action_mask_key=mask_key)
    return actor, make_torchrl_value(actor_critic)


def make_torchrl_actor(actor_critic: TransformerActorCritic, *, action_spec=None,
                       action_mask_key: str | None = None) -> ProbabilisticActor:
    """π(a|s) as a TorchRL ``ProbabilisticActor``: ``input_ids``, ``attention_mask`` → ``logits`` → ``action``.

    The distribution is a categorical over the latest token's logits (already divided by the actor-critic's
    temperature); it is sampled by default (``set_exploration_type(DETERMINISTIC)`` takes the argmax), and
    the action's log-prob is written under ``"action_log_prob"`` (``LOG_PROB_KEY``).

    :param actor_critic: the Transformer actor-critic.
    :param action_spec: the env's (unbatched) action spec, or ``None``.
    :param action_mask_key: a bool (..., V) entry of allowed tokens to mask the logits with (disallowed
        tokens get probability 0), or ``None``. An entry missing from a tensordict masks nothing.
    """
    in_keys = [*OBSERVATION_KEYS, *([action_mask_key] if action_mask_key else [])]
    logits = TensorDictModule(LatestTokenLogits(actor_critic), in_keys=in_keys, out_keys=["logits"])
    return ProbabilisticActor(
        logits, in_keys=["logits"], out_keys=["action"], spec=action_spec,
        distribution_class=torch.distributions.Categorical, return_log_prob=True,
        log_prob_key=LOG_PROB_KEY, default_interaction_type=InteractionType.RANDOM,
    )


def make_torchrl_value(actor_critic: TransformerActorCritic) -> ValueOperator:
    """V(s) as a TorchRL ``ValueOperator``: ``input_ids``, ``attention_mask`` → ``state_value`` (..., 1).

    :param actor_critic: the Transformer actor-critic; V(s) is its value head on the critic's last hidden
        state at the latest token (one full forward of the critic backbone per call).
    """
    return ValueOperator(StateValue(actor_critic), in_keys=list(OBSERVATION_KEYS), out_keys=["state_value"])


def make_torchrl_gae(value: ValueOperator, *, gamma: float = 1.0, lmbda: float = 0.95) -> GAE:
    """TorchRL's GAE on the Transformer critic, writing ``"advantage"`` and ``"value_target"``.

    :param value: the critic from :func:`make_torchrl_value`. GAE runs it with ``deactivate_vmap=True``: a
        Transformer forward (data-dependent attention masking) cannot run under ``torch.vmap``, GAE's default.
    :param gamma: discount; 1 by default (episodic, the reward comes at the end of the response).
    :param lmbda: GAE's λ.
    """
    return GAE(gamma=gamma, lmbda=lmbda, value_network=value, deactivate_vmap=True)


class LatestTokenLogits(nn.Module):
    """The policy's logits (..., V) at the latest token of left-padded observations of any batch shape.

    :param actor_critic: the Transformer actor-critic.
    """

    def __init__(self, actor_critic: TransformerActorCritic):
        super().__init__()
        self.actor_critic = actor_critic
        self.rollout_cache = RolloutCache()  # a collector's episodes; new weights invalidate it by themselves

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                action_mask: torch.Tensor | None = None) -> torch.Tensor:
        ids, mask = token_batch(input_ids, attention_mask, self.actor_critic.lm.device)
        logits, _ = self.actor_critic.act(ids, mask, self.rollout_cache, values=False)
        return mask_logits(logits.reshape(*input_ids.shape[:-1], -1), action_mask)


class StateValue(nn.Module):
    """V(s) (..., 1) at the latest token of left-padded observations of any batch shape.

    :param actor_critic: the Transformer actor-critic.
    """

    def __init__(self, actor_critic: TransformerActorCritic):
        super().__init__()
        self.actor_critic = actor_critic

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        ids, mask = token_batch(input_ids, attention_mask, self.actor_critic.lm.device)
        values = self.actor_critic.evaluate(ids, mask, logits=False).values[:, -1]
        return values.reshape(*input_ids.shape[:-1], 1)
