"""A causal LM read at the latest position of left-padded observations, with a rollout KV cache.

During rollouts (no gradients) each env row usually sees its previous observation plus one token; then
only that token goes through the model, using an :class:`lm_gym.episode_batch.EpisodeBatch` per policy. Any
other observation (a new episode, a different batch) falls back to a full forward of that row. With
gradients (training) every call is a full forward over the whole observation.
"""

from __future__ import annotations

import torch

from lm_gym.episode_batch import EpisodeBatch
from lm_gym.padding import mask_positions


class CachedLM:
    """Next-token logits and last hidden states of ``model`` for batches of token observations.

    :param model: a causal LM (possibly PEFT-wrapped).
    :param pad_token_id: the id used in padded observation positions.
    """

    def __init__(self, model, pad_token_id: int):
        self.model, self.pad_token_id = model, pad_token_id
        self._batch: EpisodeBatch | None = None
        self._previous: tuple[torch.Tensor, torch.Tensor] | None = None

    def reset_cache(self) -> None:
        """Forget the rollout cache (the weights changed, or rollouts start afresh)."""
        self._batch, self._previous = None, None

    def full(self, ids: torch.Tensor, mask: torch.Tensor, keep: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (B, keep, V), hidden (B, keep, H)), float32, at the last ``keep`` positions: one forward."""
        positions = mask_positions(mask)
        out = self.model(
            input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False, logits_to_keep=keep,
            output_hidden_states=True,
        )
        return out.logits.float(), out.hidden_states[-1][:, -keep:].float()

    @torch.no_grad()
    def incremental(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(log-probs (B, V), hidden (B, H)) at the last position, running only new tokens where possible."""
        batch = self._rollout_batch(ids)
        extends = self._extends(ids, mask)
        fresh = (~extends).nonzero().squeeze(1).tolist()
        batch.append(ids[:, -1], record=extends, forward=extends)  # rows not extended are refilled below
        if fresh:
            batch.prefill(fresh, [ids[row][mask[row].bool()].tolist() for row in fresh])
        self._previous = (ids.clone(), mask.clone())
        return batch.next_logprobs, batch.next_hidden

    def _rollout_batch(self, ids: torch.Tensor) -> EpisodeBatch:
        rows, length = ids.shape
        if self._batch is None or self._batch.num_rows != rows or self._batch.max_tokens != length:
            self._batch = EpisodeBatch(self.model, rows, length, self.pad_token_id, keep_hidden=True)
            self._previous = None
        return self._batch

    def _extends(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Rows whose observation is the previous one plus one token (and that have room for it)."""
        if self._previous is None:
            return torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        previous_ids, previous_mask = self._previous
        same_prefix = (ids[:, :-1] == previous_ids[:, 1:]).all(dim=1) & (mask[:, :-1] == previous_mask[:, 1:]).all(dim=1)
        grew = (mask[:, -1] == 1) & (mask.sum(dim=1) == previous_mask.sum(dim=1) + 1)
        return same_prefix & grew & (self._batch.lengths < self._batch.max_tokens)
