"""The Transformer as a stable-baselines3 actor-critic policy.

A thin SB3 shell around :class:`agents.actor_critic.TransformerActorCritic` (LM-head logits as actions, a
value head for V(s)). Pretrained weights are kept (no orthogonal init); per-part learning rates survive
SB3's learning-rate schedule; rollouts run one new token per env row through a KV cache.
"""

from __future__ import annotations

from typing import Any

import torch
from sb3_contrib.common.maskable.policies import MaskableActorCriticPolicy
from stable_baselines3.common.distributions import CategoricalDistribution
from stable_baselines3.common.policies import ActorCriticPolicy

from agents.actor_critic import PARTS, TransformerActorCritic, token_batch
from agents.reward_model import critic_start
from agents.rollout_cache import RolloutCache


def scaled_lr(optimizer_class: type[torch.optim.Optimizer]) -> type[torch.optim.Optimizer]:
    """A subclass of ``optimizer_class`` that multiplies each group's lr by its ``lr_scale`` at every step.

    SB3 sets every group's lr to the schedule's value before each update; the scale keeps the per-part
    ratios (body, head, value) that the policy was built with.
    """

    class ScaledLR(optimizer_class):
        def step(self, closure=None):
            base = [group["lr"] for group in self.param_groups]
            for group in self.param_groups:
                group["lr"] = group["lr"] * group.get("lr_scale", 1.0)
            try:
                return super().step(closure)
            finally:
                for group, lr in zip(self.param_groups, base):
                    group["lr"] = lr

    ScaledLR.__name__ = f"ScaledLR{optimizer_class.__name__}"
    return ScaledLR


class TransformerPolicyMixin:
    """What the plain and the maskable Transformer policies share (see the module docstring).

    Policy keywords (``policy_kwargs``):

    :param model: ``"default"``, ``"tiny"``, a directory, a hub id, or a loaded causal LM.
    :param tokenizer: with a loaded model whose tokenizer cannot be loaded from ``name_or_path``.
    :param value_head: ``"shared"`` (a linear head on the policy LM's last hidden state) or ``"separate"``
        (a linear head on its own copy of the LM, or on ``value_model``).
    :param value_model: the backbone of a separate value head: a causal LM (name, path or loaded), or a
        reward model (:class:`agents.RewardModel` or its saved directory), whose transformer becomes the
        critic's backbone and whose head, rescaled to standardised rewards, initialises the value head.
    :param lora: ``None`` (full fine-tuning) or LoRA settings (peft ``LoraConfig`` or a dict of its fields).
    :param temperature: π(a|s) = softmax(logits / temperature).
    :param learning_rates: ``{"body", "head", "value"}`` initial learning rates; missing parts use SB3's
        ``learning_rate``. The schedule scales all of them alike.
    :param device: device of the LM; default CUDA when available.
    :param precision: ``"auto"``, ``"bf16"`` or ``"fp32"`` (see :mod:`lm_gym.precision`): the LM's forwards
        run under bf16 autocast on float32 master weights, or in float32; default ``$LM_GYM_PRECISION``,
        else ``"auto"``.
    """

    def __init__(
        self, observation_space, action_space, lr_schedule, *, model="default", tokenizer=None,
        value_head: str = "shared", value_model=None, lora=None, temperature: float = 1.0,
        learning_rates: dict | None = None, device=None, precision=None, **kwargs,
    ):
        self._setup_transformer(dict(
            model=model, tokenizer=tokenizer, value_head=value_head, value_model=value_model, lora=lora,
            temperature=temperature, learning_rates=learning_rates, device=device, precision=precision,
        ))
        kwargs["ortho_init"] = False
        super().__init__(observation_space, action_space, lr_schedule, **kwargs)  # then SB3 calls _build

    def _setup_transformer(self, transformer_kwargs: dict) -> None:
        unknown = set(transformer_kwargs["learning_rates"] or {}) - set(PARTS)
        if unknown:
            raise ValueError(f"learning_rates has unknown parts {sorted(unknown)}; expected among {PARTS}")
        self.transformer_kwargs = transformer_kwargs
        settings = {k: v for k, v in transformer_kwargs.items() if k != "learning_rates"}
        # nn.Module forbids assigning submodules before its __init__; _build (called by SB3's __init__) does it.
        settings["value_model"], settings["value_init"] = critic_start(settings["value_model"], settings["device"])
        self._networks = {"actor_critic": TransformerActorCritic.from_pretrained(**settings)}

    def _build(self, lr_schedule) -> None:
        """Take the networks, and build the optimizer over LM body, LM head and value head with their own rates."""
        self.actor_critic = self.__dict__.pop("_networks")["actor_critic"]
        self.rollout_cache = RolloutCache()  # SB3's loops act through forward(), which tells no episode ends
        base = lr_schedule(1)
        rates = {part: (self.transformer_kwargs["learning_rates"] or {}).get(part, base) for part in PARTS}
        groups = [
            {"params": params, "lr": base, "lr_scale": rates[part] / base if base else 1.0, "name": part}
            for part, params in self.actor_critic.parameter_groups().items() if params
        ]
        kwargs = dict(self.optimizer_kwargs)
        if self.optimizer_class in (torch.optim.Adam, torch.optim.AdamW) and self.actor_critic.lm.device.type in ("cpu", "cuda"):
            kwargs.setdefault("fused", True)  # one kernel for all parameters: 3x faster steps on a 135M model
        self.optimizer = scaled_lr(self.optimizer_class)(groups, lr=base, **kwargs)

    # --- the two ways into the actor-critic ---------------------------------------------------------------

    def _act(self, obs, values: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Rollouts: (action logits (B, V), values (B, 1) or None) at the latest position, through the policy's
        rollout cache (see :meth:`agents.actor_critic.TransformerActorCritic.act`)."""
        logits, value = self.actor_critic.act(*self._tokens(obs), self.rollout_cache, values)
        return logits, None if value is None else value[:, None]

    def _evaluate_latest(self, obs, logits: bool = True) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Training: (action logits (B, V) or None, values (B, 1)) at the latest position, one full forward."""
        evaluation = self.actor_critic.evaluate(*self._tokens(obs), logits=logits)
        return None if evaluation.logits is None else evaluation.logits[:, -1], evaluation.values[:, -1:]

    def _tokens(self, obs) -> tuple[torch.Tensor, torch.Tensor]:
        """(input ids, attention mask) of a batch of dict observations, int64 on the LM's device (SB3 hands over
        floats)."""
        return token_batch(obs["input_ids"], obs["attention_mask"], self.actor_critic.lm.device)

    def predict_values(self, obs) -> torch.Tensor:
        """V(s) (B, 1) for a batch of observations (one forward of the critic's backbone, no cache)."""
        return self._evaluate_latest(obs, logits=False)[1]

    def _get_constructor_parameters(self) -> dict[str, Any]:
        data = super()._get_constructor_parameters()
        data.update(self.transformer_kwargs)
        return data


class TransformerActorCriticPolicy(TransformerPolicyMixin, ActorCriticPolicy):
    """SB3 ``ActorCriticPolicy`` whose network is a causal LM (for ``PPO``, ``A2C``)."""

    def forward(self, obs, deterministic: bool = False):
        """Sample (or take the most likely) token: (actions, values, log π(actions))."""
        logits, values = self._act(obs)
        distribution = self.action_dist.proba_distribution(action_logits=logits)
        actions = distribution.get_actions(deterministic=deterministic)
        return actions, values, distribution.log_prob(actions)

    def evaluate_actions(self, obs, actions):
        """(values, log π(actions), entropy) with gradients, for the PPO/A2C losses."""
        logits, values = self._evaluate_latest(obs)
        distribution = self.action_dist.proba_distribution(action_logits=logits)
        return values, distribution.log_prob(actions), distribution.entropy()

    def get_distribution(self, obs) -> CategoricalDistribution:
        """π(·|s) as an SB3 distribution."""
        return self.action_dist.proba_distribution(action_logits=self._act(obs, values=False)[0])


class MaskableTransformerActorCriticPolicy(TransformerPolicyMixin, MaskableActorCriticPolicy):
    """The Transformer policy for ``sb3_contrib.MaskablePPO``: disallowed tokens get probability 0.

    ``LMPPO`` takes it too (it masks tokens from the env's ``action_masks()`` itself, with either policy).
    """

    def __init__(self, *args, use_sde: bool = False, **kwargs):
        if use_sde:  # stock PPO and LMPPO pass use_sde; the maskable base class has no such keyword
            raise ValueError("use_sde=True (gSDE) is for continuous actions; token actions are discrete")
        super().__init__(*args, **kwargs)

    def _masked(self, logits, action_masks):
        distribution = self.action_dist.proba_distribution(action_logits=logits)
        if action_masks is not None:
            distribution.apply_masking(action_masks)
        return distribution

    def forward(self, obs, deterministic: bool = False, action_masks=None):
        """Sample an allowed token: (actions, values, log π(actions))."""
        logits, values = self._act(obs)
        distribution = self._masked(logits, action_masks)
        actions = distribution.get_actions(deterministic=deterministic)
        return actions, values, distribution.log_prob(actions)

    def evaluate_actions(self, obs, actions, action_masks=None):
        """(values, log π(actions), entropy) under the mask, with gradients."""
        logits, values = self._evaluate_latest(obs)
        distribution = self._masked(logits, action_masks)
        return values, distribution.log_prob(actions), distribution.entropy()

    def get_distribution(self, obs, action_masks=None):
        """π(·|s) under the mask."""
        return self._masked(self._act(obs, values=False)[0], action_masks)
