"""Batched scoring with a causal LM: continuation log-probs, next-token log-probs, mean-pooled states.

A scoring LM is a reference: PEFT adapters injected into it (by a LoRA policy sharing its weights) are off.
"""

from __future__ import annotations

import torch

from lm_gym.episodes import mask_positions, pad_left
from lm_gym.models import adapters_disabled


def _forward(model, ids: torch.Tensor, mask: torch.Tensor, **kwargs):
    positions = mask_positions(mask)
    with adapters_disabled(model):
        return model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False, **kwargs)


@torch.no_grad()
def continuation_logprobs(
    model, prefixes: list[list[int]], continuations: list[list[int]], pad_token_id: int, batch_size: int = 16
) -> list[torch.Tensor]:
    """log p(continuation token | prefix, earlier continuation tokens) for each pair, in batched forwards."""
    results = []
    for start in range(0, len(prefixes), batch_size):
        chunk = list(zip(prefixes[start : start + batch_size], continuations[start : start + batch_size]))
        ids, mask = pad_left([p + c for p, c in chunk], pad_token_id, model.device)
        logprobs = torch.log_softmax(_forward(model, ids, mask).logits[:, :-1].float(), dim=-1)
        targets = logprobs.gather(2, ids[:, 1:, None]).squeeze(2)
        for row, (_, continuation) in enumerate(chunk):
            results.append(targets[row, targets.shape[1] - len(continuation) :].cpu() if continuation
                           else torch.zeros(0))
    return results


@torch.no_grad()
def next_token_logprobs(model, contexts: list[list[int]], pad_token_id: int, batch_size: int = 16) -> torch.Tensor:
    """(B, V) log-probs of the token after each context, in batched forwards."""
    rows = []
    for start in range(0, len(contexts), batch_size):
        ids, mask = pad_left(contexts[start : start + batch_size], pad_token_id, model.device)
        rows.append(torch.log_softmax(_forward(model, ids, mask, logits_to_keep=1).logits[:, -1].float(), -1))
    return torch.cat(rows)


@torch.no_grad()
def mean_hidden_states(model, sequences: list[list[int]], pad_token_id: int, batch_size: int = 16) -> torch.Tensor:
    """(B, H) mean over tokens of the LM's last hidden states (padding excluded)."""
    rows = []
    for start in range(0, len(sequences), batch_size):
        ids, mask = pad_left(sequences[start : start + batch_size], pad_token_id, model.device)
        hidden = _forward(model, ids, mask, output_hidden_states=True).hidden_states[-1].float()
        weights = mask[..., None].float()
        rows.append((hidden * weights).sum(1) / weights.sum(1).clamp(min=1))
    return torch.cat(rows)
