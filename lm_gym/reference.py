"""The reference model π_ref: one object, made once, handed to everything that scores with it.

An env makes its :class:`ReferenceModel` from its LM when it is built and hands it to its episode batch (which
scores tokens during steps), to its reward (:meth:`lm_gym.rewards.Reward.bind`: the LM judge, fluency, the LM
encoder) and, through ``env.reference``, to ``LMPPO``. Outside an env, ``LMPPO`` makes one from the policy:
the base weights with the LoRA adapters off, or a frozen copy of the initial LM.

When tokens are scored: an env made with ``reference_logprobs=True`` (the default) scores every token as it
is taken, one token per step through its KV cache (``info["ref_logprob"]``, the reward context's
``ref_logprobs``). With ``reference_logprobs=False`` the env's LM does not run during steps, and whoever needs
reference log-probs scores each finished response once, in one batched forward of this same object
(:meth:`ReferenceModel.continuation_logprobs`).
"""

from __future__ import annotations

import torch

from lm_gym.logprobs import check_output_logits, last_hidden_states, output_logits, token_logprobs
from lm_gym.models import adapters_disabled, frozen_copy
from lm_gym.padding import pad_left


class ReferenceModel:
    """A causal LM run as the frozen reference: any PEFT adapters in it are off, no gradients are taken.

    When a LoRA policy shares its base weights (its adapters sit inside the same modules), this is those base
    weights: one copy in memory for policy and reference.

    :param model: the causal LM (possibly holding PEFT adapters).
    :param tokenizer: its tokenizer (the pad id pads batches).
    """

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        with adapters_disabled(model):
            check_output_logits(model)

    @classmethod
    def frozen_copy(cls, model, tokenizer, dtype: torch.dtype | None = None) -> ReferenceModel:
        """A reference that is a frozen copy of ``model`` as it is now (for full fine-tuning), in ``dtype``
        (default: the model's)."""
        return cls(frozen_copy(model, dtype), tokenizer)

    @property
    def device(self) -> torch.device:
        """The device of the model."""
        return self.model.device

    def continuation_logprobs(
        self, prefixes: list[list[int]], continuations: list[list[int]], batch_size: int = 16
    ) -> list[torch.Tensor]:
        """log π_ref(continuation token | prefix, earlier continuation tokens) per pair (float32, on the host),
        ``batch_size`` pairs per forward; the output head runs only where a continuation token is scored,
        a chunk of positions at a time (:func:`lm_gym.logprobs.token_logprobs`)."""
        results = []
        for start in range(0, len(prefixes), batch_size):
            pairs = list(zip(prefixes[start : start + batch_size], continuations[start : start + batch_size]))
            lengths = [len(c) for _, c in pairs]
            keep = max(lengths) + 1
            ids, mask = pad_left([p + c for p, c in pairs], self.tokenizer.pad_token_id, self.device)
            with torch.no_grad(), adapters_disabled(self.model):
                hidden = last_hidden_states(self.model, ids, mask, keep)[:, :-1]  # (B, keep - 1, H) before each token
                scored = torch.arange(keep - 1, device=self.device)[None, :] >= keep - 1 - torch.tensor(
                    lengths, device=self.device)[:, None]  # (B, keep - 1): the last len(c) states of each row
                logprobs = token_logprobs(self.model, hidden[scored], ids[:, -(keep - 1) :][scored]).logprobs.cpu()
            results += list(logprobs.split(lengths))
        return results

    def next_token_logprobs(self, contexts: list[list[int]], batch_size: int = 16) -> torch.Tensor:
        """(B, V) float32 log π_ref of the token after each context, ``batch_size`` contexts per forward."""
        rows = []
        for start in range(0, len(contexts), batch_size):
            ids, mask = pad_left(contexts[start : start + batch_size], self.tokenizer.pad_token_id, self.device)
            with torch.no_grad(), adapters_disabled(self.model):
                hidden = last_hidden_states(self.model, ids, mask)[:, -1].contiguous()  # (B, H): see EpisodeBatch
                rows.append(torch.log_softmax(output_logits(self.model, hidden), dim=-1))
        return torch.cat(rows)

    def mean_hidden_states(self, sequences: list[list[int]], batch_size: int = 16) -> torch.Tensor:
        """(B, H) float32 mean over tokens of the last hidden states (padding excluded)."""
        rows = []
        for start in range(0, len(sequences), batch_size):
            ids, mask = pad_left(sequences[start : start + batch_size], self.tokenizer.pad_token_id, self.device)
            with torch.no_grad(), adapters_disabled(self.model):
                hidden = last_hidden_states(self.model, ids, mask).float()
            weights = mask[..., None].float()
            rows.append((hidden * weights).sum(1) / weights.sum(1).clamp(min=1))
        return torch.cat(rows)
