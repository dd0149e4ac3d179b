"""The Transformer as actor and critic, free of any RL library.

The LM head gives the action logits (divided by ``temperature``: the same logits for sampling and for
log-probs); a value head on a last hidden state gives V(s). The stable-baselines3 policies
(:mod:`agents.policy`) and the RLlib, TorchRL and Tianshou adapters (:mod:`lm_gym.integrations`) are thin
shells around one :class:`TransformerActorCritic`.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from agents.cached_lm import CachedLM
from lm_gym.models import resolve_model

PARTS = ("body", "head", "value")


class TransformerActorCritic(nn.Module):
    """A causal LM read as π(·|s) at the latest token, and a linear value head V(s).

    Observations are left-padded ``(ids, mask)`` batches whose last column is the latest token. Without
    gradients (rollouts) :meth:`read_latest` runs only new tokens through a KV cache; with gradients every
    call is a full forward. Dropout stays off in train mode.

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
        self.policy_lm = CachedLM(lm, tokenizer.pad_token_id)
        self.value_lm = None if value_backbone is None else CachedLM(value_backbone, tokenizer.pad_token_id)
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

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, keep: int, actor: bool = True):
        """:meth:`read_positions` (the training forward, which ``DistributedDataParallel`` wraps)."""
        return self.read_positions(ids, mask, keep, actor)

    def read_latest(self, ids: torch.Tensor, mask: torch.Tensor, values: bool = True):
        """(action logits (B, V), values (B, 1) or None) at the latest position of each observation.

        Without gradients through the incremental KV cache; with gradients, a full forward.
        ``values=False`` skips a separate critic's forward (values None), for callers that score it later.
        """
        if torch.is_grad_enabled():
            logits, value = self.read_positions(ids, mask, keep=1)
            return logits[:, -1], value[:, -1:]
        logits, hidden = self.policy_lm.incremental(ids, mask)
        if self.value_lm is not None:
            if not values:
                return logits / self.temperature, None
            hidden = self.value_lm.incremental(ids, mask)[1]
        return logits / self.temperature, self.value_net_head(hidden)

    def read_positions(self, ids: torch.Tensor, mask: torch.Tensor, keep: int, actor: bool = True):
        """(action logits (B, keep, V), values (B, keep)) at the last ``keep`` positions, in one forward.

        With ``actor=False`` the policy LM runs without gradients (only the critic can learn).
        """
        logits, hidden = self._logits_and_hidden(ids, mask, keep, actor)
        return logits, self.values_of(hidden)

    def read_hidden(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(action logits (B, V), the critic's last hidden state (B, H)) at the latest position, one forward
        per backbone; :meth:`values_of` turns the hidden state into V(s) without another forward."""
        logits, hidden = self._logits_and_hidden(ids, mask, keep=1)
        return logits[:, -1], hidden[:, -1]

    def _logits_and_hidden(self, ids, mask, keep: int, actor: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits / temperature (B, keep, V), the critic's hidden states (B, keep, H)): one full forward of
        each backbone."""
        with torch.set_grad_enabled(actor and torch.is_grad_enabled()):
            logits, hidden = self.policy_lm.full(ids, mask, keep)
        if self.value_lm is not None:
            hidden = self.value_lm.full(ids, mask, keep)[1]
        return logits / self.temperature, hidden

    def values_of(self, hidden: torch.Tensor) -> torch.Tensor:
        """V(s) (...) from the critic's hidden states (..., H)."""
        return self.value_net_head(hidden)[..., 0]

    def final_values(self, ids: torch.Tensor, mask: torch.Tensor, keep: int = 1) -> torch.Tensor:
        """V at the last ``keep`` positions of each sequence, (B,) for ``keep=1`` else (B, keep), in one full
        forward of the critic's backbone only."""
        hidden = (self.value_lm or self.policy_lm).full(ids, mask, keep=keep)[1]
        values = self.values_of(hidden)
        return values[:, -1] if keep == 1 else values

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

    def reset_cache(self) -> None:
        """Forget the rollout caches (the weights changed)."""
        self.policy_lm.reset_cache()
        if self.value_lm is not None:
            self.value_lm.reset_cache()

    def train(self, mode: bool = True) -> "TransformerActorCritic":
        """Switch modes; dropout stays off in the LMs, and the rollout caches are dropped."""
        super().train(mode)
        self.lm.eval()
        if self.value_backbone is not None:
            self.value_backbone.eval()
        self.reset_cache()
        return self


def apply_lora(model, lora):
    """Wrap ``model`` with LoRA adapters (``lora``: a peft ``LoraConfig`` or a dict of its fields)."""
    from peft import LoraConfig, get_peft_model

    config = lora if isinstance(lora, LoraConfig) else LoraConfig(task_type="CAUSAL_LM", **dict(lora))
    return get_peft_model(model, config)
