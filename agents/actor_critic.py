"""The Transformer as actor and critic, free of any RL library.

The LM head gives the action logits (divided by ``temperature``: the same logits for sampling and for
log-probs); a value head on a last hidden state gives V(s). The stable-baselines3 policies
(:mod:`agents.policy`) and the RLlib, TorchRL and Tianshou adapters (:mod:`agents.integrations`) are thin
shells around one :class:`TransformerActorCritic`.

Precision (:mod:`lm_gym.precision`): trainable weights are float32 (the master weights); in bf16 the LM
forwards run under autocast, a frozen LoRA base may hold bf16 weights, and the logits, log-probs, entropy,
values and hidden states this module returns are float32 in every precision.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import NamedTuple

import torch
from torch import nn

from agents.rollout_cache import RolloutCache
from lm_gym.logprobs import CHUNK_POSITIONS, check_output_logits, last_hidden_states, output_logits, token_logprobs
from lm_gym.models import adapters_disabled, resolve_model
from lm_gym.precision import Precision, autocast_off, resolve_precision

PARTS = ("body", "head", "value")


class Evaluation(NamedTuple):
    """What :meth:`TransformerActorCritic.evaluate` gives at the last ``keep`` positions of each sequence."""

    logits: torch.Tensor | None  # (B, keep, V) float32 action logits, already divided by the temperature
    values: torch.Tensor  # (B, keep) float32 V(s)
    hidden: torch.Tensor  # (B, keep, H) float32 the critic's last hidden states (V = values_of(hidden))


class TokenEvaluation(NamedTuple):
    """What the training forward (:meth:`TransformerActorCritic.forward`) gives for the tokens it scores."""

    logprobs: torch.Tensor  # (B, T) float32 log π(token | state), 0 where not scored
    entropy: torch.Tensor  # (B, T) float32 entropy of π at the state, 0 where not scored
    values: torch.Tensor  # (B, T) float32 V(state before the token)
    kl: torch.Tensor | None = None  # (B, T) float32 exact KL(π ‖ π_ref) at the state, with a reference


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
    :param precision: ``"auto"``, ``"bf16"`` or ``"fp32"`` (see :mod:`lm_gym.precision`): bf16 runs the
        forwards under autocast; default ``$LM_GYM_PRECISION``, else ``"auto"``.
    :param chunk: positions per output-head chunk of the training forward (:mod:`lm_gym.logprobs`).
    """

    def __init__(self, lm, tokenizer, value_backbone=None, value_init=None, temperature: float = 1.0,
                 precision=None, chunk: int = CHUNK_POSITIONS):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        for name, model in (("lm", lm), ("value_backbone", value_backbone)):
            require_float32_training(model, name)
        self.lm, self.value_backbone, self.tokenizer, self.temperature = lm, value_backbone, tokenizer, temperature
        self.precision, self.chunk = resolve_precision(precision, lm.device), chunk
        check_output_logits(lm)
        hidden = (value_backbone or lm).config.get_text_config().hidden_size
        self.value_net_head = nn.Linear(hidden, 1).to(lm.device)
        with torch.no_grad():
            weight, bias = value_init if value_init is not None else (0.0, 0.0)
            self.value_net_head.weight.copy_(torch.as_tensor(weight).expand_as(self.value_net_head.weight))
            self.value_net_head.bias.copy_(torch.as_tensor(bias).expand_as(self.value_net_head.bias))

    @classmethod
    def from_pretrained(
        cls, model="default", tokenizer=None, *, value_head: str = "shared", value_model=None, value_init=None,
        lora=None, temperature: float = 1.0, device=None, precision=None,
    ) -> "TransformerActorCritic":
        """Load (or take) the LM and build the actor-critic; the keywords are the SB3 policy's (see there).

        ``value_model`` is the separate critic's causal LM (a name, path or loaded model; default a copy of the
        policy LM) and ``value_init`` the value head's starting ``(weight, bias)``;
        :func:`agents.reward_model.critic_start` turns a reward model into both. An LM loaded here is float32,
        except the frozen base of a LoRA policy, which gets the precision's dtype.
        """
        if value_head not in ("shared", "separate"):
            raise ValueError(f"value_head={value_head!r}; expected 'shared' or 'separate'")
        precision = resolve_precision(precision, device)
        lm, tokenizer = resolve_model(model, tokenizer, device, precision.dtype if lora else None)
        lm = apply_lora(lm, lora) if lora else lm.requires_grad_(True)
        backbone = None
        if value_head == "separate":
            backbone = copy.deepcopy(lm) if value_model is None else resolve_model(value_model, None, device, None)[0]
            backbone.requires_grad_(True)
        return cls(lm, tokenizer, backbone, value_init, temperature, precision)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, tokens: torch.Tensor, columns: torch.Tensor,
                valid: torch.Tensor, allowed=None, actor: bool = True, entropy: bool = True,
                entropy_grad: bool = False, reference=None, keep: int | None = None) -> TokenEvaluation:
        """The training forward (which ``DistributedDataParallel`` wraps): log π, entropy and V(s) of given
        tokens, one forward of each backbone, the output head over the valid tokens only, in chunks.

        :param ids: (B, W) left-padded sequences; ``mask`` their attention mask.
        :param tokens: (B, T) the tokens to score.
        :param columns: (B, T) where the state before each token lies among the last ``keep`` positions of
            ``ids``.
        :param valid: (B, T) bool, the tokens to score (log-prob and entropy are 0 elsewhere).
        :param allowed: the (V,) allowed-token mask the tokens were sampled under, or None.
        :param actor: False: the policy LM runs without gradients (only the critic can learn).
        :param entropy: compute the entropy (else it is returned as zeros); ``entropy_grad``: it carries a
            gradient (for an entropy bonus), else it is a statistic.
        :param reference: a :class:`lm_gym.reference.ReferenceModel`: also the exact KL(π ‖ π_ref) over the
            vocabulary at each scored state (one more forward, of the reference, without gradients).
        :param keep: how many of the last positions hold the tokens and the states before them; default T + 1
            (each sequence ends with its tokens; more where the env put tokens of its own between them).
        """
        keep = tokens.shape[1] + 1 if keep is None else keep
        with self.precision.autocast(ids.device), full_sequence_attention(self.lm, self.precision):
            with torch.set_grad_enabled(actor and torch.is_grad_enabled()):
                hidden = last_hidden_states(self.lm, ids, mask, keep)
            critic = hidden if self.value_backbone is None else last_hidden_states(self.value_backbone, ids, mask, keep)
            at = lambda states: states.gather(1, columns[..., None].expand(-1, -1, states.shape[-1]))  # noqa: E731
            against = None
            if reference is not None:
                with torch.no_grad(), adapters_disabled(reference.model):
                    against = reference.model, at(last_hidden_states(reference.model, ids, mask, keep))[valid]
            scored = token_logprobs(self.lm, at(hidden)[valid], tokens[valid], temperature=self.temperature,
                                    allowed=allowed, entropy=entropy, entropy_grad=entropy_grad, chunk=self.chunk,
                                    reference=against)
        per_token = lambda values: torch.zeros(tokens.shape, device=ids.device).masked_scatter(valid, values)  # noqa: E731
        entropies = per_token(scored.entropy) if entropy else torch.zeros(tokens.shape, device=ids.device)
        kl = None if scored.kl is None else per_token(scored.kl)
        return TokenEvaluation(per_token(scored.logprobs), entropies, self.values_of(at(critic)), kl)

    def act(self, ids: torch.Tensor, mask: torch.Tensor, cache: RolloutCache, values: bool = True
            ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Rollouts: (action logits (B, V), values (B,) or None) at the latest position of each observation.

        Without gradients, through ``cache`` (only each row's new token runs); with gradients, a full forward
        (:meth:`evaluate`). ``values=False`` skips a separate critic's forward, for callers that score it later.
        """
        if torch.is_grad_enabled():
            logits, value, _ = self.evaluate(ids, mask)
            return logits[:, -1], value[:, -1]
        dtype = self.precision.dtype if self.precision.reduced else None  # bf16: a copy (agents.rollout_cache)
        with autocast_off(ids.device):
            logits, hidden = cache.latest(self.lm, self.tokenizer.pad_token_id, ids, mask, dtype)
            if self.value_backbone is not None:
                if not values:
                    return logits / self.temperature, None
                hidden = cache.latest(self.value_backbone, self.tokenizer.pad_token_id, ids, mask, dtype)[1]
        return logits / self.temperature, self.values_of(hidden)

    def evaluate(self, ids: torch.Tensor, mask: torch.Tensor, keep: int = 1, actor: bool = True,
                 logits: bool = True) -> Evaluation:
        """Training: logits, values and the critic's hidden states at the last ``keep`` positions, in one full
        forward of each backbone (see :class:`Evaluation`).

        With ``actor=False`` the policy LM runs without gradients (only the critic can learn); with
        ``logits=False`` only the critic's backbone runs (logits None).
        """
        action_logits = None
        with self.precision.autocast(ids.device):
            if logits or self.value_backbone is None:
                with torch.set_grad_enabled(actor and torch.is_grad_enabled()):
                    hidden = last_hidden_states(self.lm, ids, mask, keep)
                    action_logits = output_logits(self.lm, hidden) / self.temperature if logits else None
            if self.value_backbone is not None:
                hidden = last_hidden_states(self.value_backbone, ids, mask, keep)
        return Evaluation(action_logits, self.values_of(hidden), hidden.float())

    def values_of(self, hidden: torch.Tensor) -> torch.Tensor:
        """V(s) (...) from the critic's hidden states (..., H), computed in float32 in every precision."""
        with autocast_off(hidden.device):
            return self.value_net_head(hidden.float())[..., 0]

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


@contextmanager
def full_sequence_attention(model, precision: Precision):
    """The attention kernel for full-sequence forwards: in bf16 on a CPU, Hugging Face's eager attention (bf16
    matrix multiplies), whose forward and backward run 2-3x faster there than PyTorch's CPU flash-attention
    kernel in bf16 (``benchmarks/precision_ppo.py``); decoding keeps the model's own (SDPA is faster there)."""
    config = model.config
    if not (precision.reduced and model.device.type == "cpu" and config._attn_implementation == "sdpa"):
        yield
        return
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation("sdpa")


def require_float32_training(model, name: str) -> None:
    """Raise when ``model`` has trainable weights that are not float32 (the master weights must be)."""
    if model is None:
        return
    reduced = {str(p.dtype) for p in model.parameters() if p.requires_grad and p.dtype != torch.float32}
    if reduced:
        raise ValueError(
            f"{name} has trainable weights in {sorted(reduced)}: training keeps float32 master weights (bf16 runs "
            "under autocast); load it in float32, or train LoRA adapters on a frozen bf16 base"
        )


def apply_lora(model, lora):
    """Wrap ``model`` with LoRA adapters (``lora``: a peft ``LoraConfig`` or a dict of its fields)."""
    from peft import LoraConfig, get_peft_model

    config = lora if isinstance(lora, LoraConfig) else LoraConfig(task_type="CAUSAL_LM", **dict(lora))
    return get_peft_model(model, config)
