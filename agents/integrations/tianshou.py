"""Tianshou agent side (``pip install lm-gym[tianshou]``): the Transformer as Tianshou's actor and critic.

:class:`TokenActor` and :class:`TokenCritic` share one
:class:`agents.actor_critic.TransformerActorCritic` (the LM gives the logits, its value head V(s)); the actor
obeys ``obs.mask``. :func:`make_tianshou_ppo` puts them into Tianshou's PPO with defaults fit for an LM::

    envs = make_tianshou_envs(8, model="tiny", max_new_tokens=16)
    ppo = make_tianshou_ppo(TransformerActorCritic.from_pretrained("tiny"), envs.action_space[0])
    collector = Collector(ppo, envs, VectorReplayBuffer(1024, len(envs)))
    ppo.run_training(OnPolicyTrainerParams(training_collector=collector, ...))

Collection (the policy in eval mode) runs without gradients and only the new token of each env through the
actor-critic's KV cache; training forwards are full forwards, one per minibatch for actor and critic together.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import torch
from tianshou.algorithm import PPO
from tianshou.algorithm.modelfree.reinforce import DiscreteActorPolicy
from tianshou.algorithm.optim import AdamOptimizerFactory
from tianshou.utils.net.common import ActionReprNet
from torch import nn

from agents.actor_critic import TransformerActorCritic, token_batch
from agents.rollout_cache import RolloutCache
from lm_gym.integrations.tianshou import MASK_KEY
from lm_gym.logprobs import mask_logits

PPO_DEFAULTS = dict(
    gamma=1.0,  # episodic, reward at the end: no discount over the response
    gae_lambda=0.95,
    ent_coef=0.0,  # an entropy bonus over a whole vocabulary pulls towards noise
    eps_clip=0.2,
    vf_coef=0.5,
    max_grad_norm=1.0,
    max_batchsize=64,  # rows per no-grad forward when scoring values and old log-probs
)


class TokenActor(ActionReprNet):
    """π's logits over the vocabulary for Tianshou: ``obs -> (logits (B, V), state)``.

    Observations are Tianshou batches of left-padded ``input_ids`` / ``attention_mask`` (and ``mask``, the
    allowed tokens, when the env restricts them: disallowed tokens get probability 0). In eval mode
    (collection) the actor runs without gradients through the actor-critic's KV cache; in train mode with
    gradients it runs a full forward, whose critic hidden state a linked :class:`TokenCritic` reads for
    the same observations instead of running the LM again.

    :param actor_critic: the Transformer actor-critic (the logits are divided by its temperature).
    """

    def __init__(self, actor_critic: TransformerActorCritic):
        super().__init__()
        self.actor_critic = actor_critic
        self.rollout_cache = RolloutCache()  # a collector's episodes; new weights invalidate it by themselves
        self.shares_hidden = False  # set by a linked critic
        self._last_hidden: tuple[Any, torch.Tensor] | None = None

    def forward(self, obs, state=None, info=None) -> tuple[torch.Tensor, Any]:
        """(logits (B, V), ``state`` unchanged)."""
        ids, mask = token_batch(obs.input_ids, obs.attention_mask, self.actor_critic.lm.device)
        if self.training and torch.is_grad_enabled():
            logits, _, hidden = self.actor_critic.evaluate(ids, mask)
            logits = logits[:, -1]
            self._last_hidden = (obs, hidden[:, -1]) if self.shares_hidden else None
        else:
            with torch.no_grad():
                logits, _ = self.actor_critic.act(ids, mask, self.rollout_cache, values=False)
        return mask_logits(logits, token_mask(obs)), state

    def pop_hidden(self, obs) -> torch.Tensor | None:
        """The critic's hidden states of the last training forward if it read ``obs`` (this very batch), once."""
        last, self._last_hidden = self._last_hidden, None
        if last is not None and last[0] is obs:
            return last[1]
        return None


class TokenCritic(nn.Module):
    """V(s) for Tianshou: ``obs -> values (B,)``, from the value head of the actor's actor-critic.

    With gradients, right after the actor's training forward on the same observation batch (Tianshou's
    A2C/PPO update order), the values come from that forward's hidden states: one LM forward per minibatch.

    :param actor: the :class:`TokenActor` whose actor-critic (and training forward) to share.
    """

    def __init__(self, actor: TokenActor):
        super().__init__()
        self.actor = actor
        actor.shares_hidden = True

    def forward(self, obs, **kwargs) -> torch.Tensor:
        """V(s) (B,) of the observations."""
        actor_critic = self.actor.actor_critic
        hidden = self.actor.pop_hidden(obs) if torch.is_grad_enabled() else None
        if hidden is not None:
            return actor_critic.values_of(hidden)
        ids, mask = token_batch(obs.input_ids, obs.attention_mask, actor_critic.lm.device)
        return actor_critic.evaluate(ids, mask, logits=False).values[:, -1]


def make_tianshou_ppo(actor_critic: TransformerActorCritic, action_space: gym.spaces.Discrete, *, lr: float = 1e-5,
                      deterministic_eval: bool = False, **ppo_kwargs: Any) -> PPO:
    """Tianshou's PPO on one Transformer actor-critic, with LM-fit defaults (:data:`PPO_DEFAULTS`).

    :param actor_critic: the Transformer actor-critic; all its trainable parameters (LM, value head) get
        one Adam optimizer.
    :param action_space: the env's ``Discrete(V)`` action space (e.g. ``envs.action_space[0]``).
    :param lr: Adam's learning rate.
    :param deterministic_eval: evaluate with the argmax token instead of a sample.
    :param ppo_kwargs: keywords of ``tianshou.algorithm.PPO`` overriding the defaults (``gamma``,
        ``eps_clip``, ``ent_coef``, ``max_batchsize``, ...).
    """
    actor = TokenActor(actor_critic)
    policy = DiscreteActorPolicy(actor=actor, action_space=action_space, deterministic_eval=deterministic_eval)
    settings = {**PPO_DEFAULTS, **ppo_kwargs}
    return PPO(policy=policy, critic=TokenCritic(actor), optim=AdamOptimizerFactory(lr=lr), **settings)


def token_mask(obs) -> torch.Tensor | None:
    """The allowed-token mask (B, V) of a Tianshou observation batch, or ``None`` when it has none."""
    mask = obs.get(MASK_KEY, None)
    return None if mask is None else torch.as_tensor(mask)
