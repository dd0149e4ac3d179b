"""The Transformer as actor and critic, free of any RL library.

The LM head gives the action logits (divided by ``temperature``: the same logits for sampling and for
log-probs); a value head on a last hidden state gives V(s). The stable-baselines3 policies
(:mod:`agents.policy`) and the RLlib, TorchRL and Tianshou adapters (:mod:`agents.integrations`) are thin
shells around one :class:`TransformerActorCritic`.
"""

from __future__ import annotations

import copy
from typing import NamedTuple

import torch
from torch import nn

from agents.rollout_cache import RolloutCache
from lm_gym.models import resolve_model
from lm_gym.padding import mask_positions

PARTS = ("body", "head", "value")


class Evaluation(NamedTuple):
    """What :meth:`TransformerActorCritic.evaluate` gives at the last ``keep`` positions of each sequence."""

    logits: torch.Tensor | None  # (B, keep, V) float32 action logits, already divided by the temperature
    values: torch.Tensor  # (B, keep) V(s)
    hidden: torch.Tensor  # (B, keep, H) the critic's last hidden states (V = values_of(hidden))


class TransformerActorCritic(nn.Module):
    """A causal LM read as π(·|s) at the latest token, and a linear value head V(s).

    Observations are left-padded ``(ids, mask)`` batches whose last column is the latest token. Two ways in:
    :meth:`act` (rollouts: the latest position, only new tokens through a caller's
    :class:`agents.rollout_cache.RolloutCache`) and :meth:`evaluate` (training: given positions, one full
    forward). Dropout stays off in train mode.

    :param lm: the policy's causal LM (possibly PEFT-wrapped).
    :param tokenizer: its tokenizer (the pad id pads batches).
    :param value_backbone: ``None`` (the value head reads the policy LM's hidden state) or a separate LM.
    :param value_init: ``(weight, bias)`` to start the value head from; default zeros (V = 0 at the start,
        so the first advantages hold no random baseline).
    :param temperature: π(a|s) = softmax(logits / temperature).
    """

    def __init__(self, lm, tokenizer, value_backbone=None, value_init=None, temperature: float = 1.0):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.lm, self.value_backbone, self.tokenizer, self.temperature = lm, value_backbone, tokenizer, temperature
        hidden = (value_backbone or lm).config.get_text_config().hidden_size
        self.value_net_head = nn.Linear(hidden, 1).to(lm.device)
        with torch.no_grad():
            weight, bias = value_init if value_init is not None else (0.0, 0.0)
            self.value_net_head.weight.copy_(torch.as_tensor(weight).expand_as(self.value_net_head.weight))
            self.value_net_head.bias.copy_(torch.as_tensor(bias).expand_as(self.value_net_head.bias))

    @classmethod
    def from_pretrained(
        cls, model="default", tokenizer=None, *, value_head: str = "shared", value_model=None, value_init=None,
        lora=None, temperature: float = 1.0, device=None,
    ) -> "TransformerActorCritic":
        """Load (or take) the LM and build the actor-critic; the keywords are the SB3 policy's (see there).

        ``value_model`` is the separate critic's causal LM (a name, path or loaded model; default a copy of the
        policy LM) and ``value_init`` the value head's starting ``(weight, bias)``;
        :func:`agents.reward_model.critic_start` turns a reward model into both.
        """
        if value_head not in ("shared", "separate"):
            raise ValueError(f"value_head={value_head!r}; expected 'shared' or 'separate'")
        lm, tokenizer = resolve_model(model, tokenizer, device, None)
        lm = apply_lora(lm, lora) if lora else lm.requires_grad_(True)
        backbone = None
        if value_head == "separate":
            backbone = copy.deepcopy(lm) if value_model is None else resolve_model(value_model, None, device, None)[0]
            backbone.requires_grad_(True)
        return cls(lm, tokenizer, backbone, value_init, temperature)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, keep: int = 1, actor: bool = True) -> Evaluation:
        """:meth:`evaluate` (the training forward, which ``DistributedDataParallel`` wraps)."""
        return self.evaluate(ids, mask, keep, actor)

    def act(self, ids: torch.Tensor, mask: torch.Tensor, cache: RolloutCache, values: bool = True
            ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Rollouts: (action logits (B, V), values (B,) or None) at the latest position of each observation.

        Without gradients, through ``cache`` (only each row's new token runs); with gradients, a full forward
        (:meth:`evaluate`). ``values=False`` skips a separate critic's forward, for callers that score it later.
        """
        if torch.is_grad_enabled():
            logits, value, _ = self.evaluate(ids, mask)
            return logits[:, -1], value[:, -1]
        logits, hidden = cache.latest(self.lm, self.tokenizer.pad_token_id, ids, mask)
        if self.value_backbone is not None:
            if not values:
                return logits / self.temperature, None
            hidden = cache.latest(self.value_backbone, self.tokenizer.pad_token_id, ids, mask)[1]
        return logits / self.temperature, self.values_of(hidden)

    def evaluate(self, ids: torch.Tensor, mask: torch.Tensor, keep: int = 1, actor: bool = True,
                 logits: bool = True) -> Evaluation:
        """Training: logits, values and the critic's hidden states at the last ``keep`` positions, in one full
        forward of each backbone (see :class:`Evaluation`).

        With ``actor=False`` the policy LM runs without gradients (only the critic can learn); with
        ``logits=False`` only the critic's backbone runs (logits None).
        """
        action_logits = None
        if logits or self.value_backbone is None:
            with torch.set_grad_enabled(actor and torch.is_grad_enabled()):
                action_logits, hidden = full_forward(self.lm, ids, mask, keep)
            action_logits = action_logits / self.temperature if logits else None
        if self.value_backbone is not None:
            hidden = full_forward(self.value_backbone, ids, mask, keep)[1]
        return Evaluation(action_logits, self.values_of(hidden), hidden)

    def values_of(self, hidden: torch.Tensor) -> torch.Tensor:
        """V(s) (...) from the critic's hidden states (..., H)."""
        return self.value_net_head(hidden)[..., 0]

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """The trainable parameters by part: LM ``body``, LM ``head`` (output embedding) and ``value``."""
        head_ids = {id(p) for p in self.lm.get_output_embeddings().parameters()}
        value = list(self.value_net_head.parameters())
        if self.value_backbone is not None:
            value += [p for p in self.value_backbone.parameters() if p.requires_grad]
        trainable = [p for p in self.lm.parameters() if p.requires_grad]
        return {
            "body": [p for p in trainable if id(p) not in head_ids],
            "head": [p for p in trainable if id(p) in head_ids],
            "value": value,
        }

    def train(self, mode: bool = True) -> "TransformerActorCritic":
        """Switch modes; dropout stays off in the LMs."""
        super().train(mode)
        self.lm.eval()
        if self.value_backbone is not None:
            self.value_backbone.eval()
        return self


def token_batch(input_ids, attention_mask, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask), int64 (B, L) on ``device``, from token observations (arrays or tensors) of any batch shape."""
    ids, mask = (torch.as_tensor(x, device=device) for x in (input_ids, attention_mask))
    return ids.reshape(-1, ids.shape[-1]).long(), mask.reshape(-1, mask.shape[-1]).long()


def full_forward(model, ids: torch.Tensor, mask: torch.Tensor, keep: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (B, keep, V), last hidden states (B, keep, H)), float32, at the last ``keep`` positions of
    left-padded sequences: one forward (with gradients when enabled)."""
    out = model(
        input_ids=ids, attention_mask=mask, position_ids=mask_positions(mask), use_cache=False, logits_to_keep=keep,
        output_hidden_states=True,
    )
    return out.logits.float(), out.hidden_states[-1][:, -keep:].float()


def apply_lora(model, lora):
    """Wrap ``model`` with LoRA adapters (``lora``: a peft ``LoraConfig`` or a dict of its fields)."""
    from peft import LoraConfig, get_peft_model

    config = lora if isinstance(lora, LoraConfig) else LoraConfig(task_type="CAUSAL_LM", **dict(lora))
    return get_peft_model(model, config)
