"""The rollout cache: what acting keeps between steps, so that each step runs only the new token of each row.

A :class:`RolloutCache` belongs to one rollout loop (LMPPO's, an evaluation, an adapter's collector). It keeps,
per backbone, an :class:`lm_gym.episode_batch.EpisodeBatch` of the rows' tokens and KV cache. The loop calls
:meth:`RolloutCache.reset` with the rows whose episodes ended (their next observation is a new prompt); a row
whose observation is its previous one plus one token runs that token; one that grew by several (the env
inserted a tool result or the other party's turn after the agent's token) runs only the new ids against its
KV history; any other row is prefilled afresh, so the cache never serves keys and values of other tokens. A
row whose observation did not change (it waits for its prompt group, or ``predict`` was asked twice) keeps
its log-probs and runs no forward. Nor of other weights: any optimizer step or in-place write to the
parameters since the cache was filled drops it (:func:`weights_version`).

In bf16 a policy acts through a bf16 copy of its weights (:func:`acting_copy`, made again whenever the
weights change, so once per rollout): a LoRA policy's with the adapters merged in, one plain bf16 forward per
step instead of the base layer plus two small adapter products and their casts in each linear layer (about
twice as fast to decode); a float32 policy's cast weight by weight. The copy computes exactly as the env's
bf16 LM does, so the sampled log-probs of an untrained policy equal the reference's and the KL penalty
starts at 0, not at bf16 noise (about 1e-2, which PPO's whitened advantages would amplify into a signal). What
is left is the float32 rounding of sampling's renormalisation of the log-probs: none on some CPUs, one ulp
(under 1e-6) on a few tokens on others (AVX2-only x86).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from lm_gym.episode_batch import EpisodeBatch
from lm_gym.models import frozen_copy

_optimizer_steps = 0  # steps of every torch optimizer in this process


def _count_optimizer_step(optimizer, args, kwargs) -> None:
    global _optimizer_steps
    _optimizer_steps += 1


register_optimizer_step_post_hook(_count_optimizer_step)


def weights_version(model) -> tuple[int, int]:
    """A value that changes whenever ``model``'s weights may have: the process's optimizer steps (fused
    optimizers do not bump tensor versions) and the parameters' version counters (``load_state_dict``,
    ``copy_`` and other in-place writes bump them)."""
    return _optimizer_steps, sum(p._version for p in model.parameters())


def acting_copy(model, dtype: torch.dtype):
    """A frozen copy of ``model`` that computes in ``dtype``: a PEFT LoRA model's with its adapters merged
    into the base weights (in the base's dtype), any other model's with its parameters cast to ``dtype``."""
    if hasattr(model, "merge_and_unload"):
        return copy.deepcopy(model).merge_and_unload().requires_grad_(False).eval()
    return frozen_copy(model, dtype)


class _BackboneCache:
    """One backbone's rows: the episode batch, the previous observation and the weights it was computed with."""

    def __init__(self, model, pad_token_id: int, rows: int, length: int, dtype: torch.dtype | None):
        runner = model if dtype is None else acting_copy(model, dtype)
        self.batch = EpisodeBatch(runner, rows, length, pad_token_id, keep_hidden=True)
        self.previous: tuple[torch.Tensor, torch.Tensor] | None = None
        self.version = weights_version(model)
        self.restarted = torch.zeros(rows, dtype=torch.bool, device=self.batch.device)

    def fits(self, model, ids: torch.Tensor) -> bool:
        return (self.batch.num_rows, self.batch.max_tokens) == tuple(ids.shape) and (
            self.version == weights_version(model))

    def extends(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Rows whose observation is the previous one plus one token (and that have room for it)."""
        if self.previous is None:
            return torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        previous_ids, previous_mask = self.previous
        same_prefix = (ids[:, :-1] == previous_ids[:, 1:]).all(dim=1) & (mask[:, :-1] == previous_mask[:, 1:]).all(1)
        grew = (mask[:, -1] == 1) & (mask.sum(dim=1) == previous_mask.sum(dim=1) + 1)
        return same_prefix & grew & (self.batch.lengths < self.batch.max_tokens) & ~self.restarted

    def unchanged(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Rows whose observation is exactly the previous one."""
        if self.previous is None:
            return torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        previous_ids, previous_mask = self.previous
        return (ids == previous_ids).all(dim=1) & (mask == previous_mask).all(dim=1) & ~self.restarted

    def continuations(self, rows: list[int], observed: list[list[int]]) -> dict[int, list[int]]:
        """The rows among ``rows`` whose ``observed`` ids continue the ids the batch holds, with the new ids."""
        grown = {}
        for row, ids in zip(rows, observed):
            held = self.batch.row_tokens(row)
            if not self.restarted[row] and len(ids) > len(held) > 0 and ids[: len(held)] == held:
                grown[row] = ids[len(held) :]
        return grown


class RolloutCache:
    """KV caches of one rollout loop, one per backbone (see the module docstring)."""

    def __init__(self):
        self._backbones: dict[int, _BackboneCache] = {}

    def reset(self, rows: Iterable[int] | None = None) -> None:
        """Forget ``rows`` (their episodes ended), or every row: their next observation is prefilled afresh."""
        if rows is None:
            self._backbones.clear()
            return
        rows = list(rows)
        for backbone in self._backbones.values():
            backbone.restarted[rows] = True

    @torch.no_grad()
    def latest(self, model, pad_token_id: int, ids: torch.Tensor, mask: torch.Tensor,
               dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(log-probs (B, V), last hidden state (B, H)) of ``model`` at the latest position of each row, running
        only the new token of rows that extend their previous observation; with a ``dtype``, ``model`` runs as
        its :func:`acting_copy` in that dtype."""
        backbone = self._backbones.get(id(model))
        if backbone is None or not backbone.fits(model, ids):
            self._backbones.pop(id(model), None)  # the old copy goes before a new one is made
            backbone = self._backbones[id(model)] = _BackboneCache(model, pad_token_id, *ids.shape, dtype)
        batch = backbone.batch
        extends, unchanged = backbone.extends(ids, mask), backbone.unchanged(ids, mask)
        batch.append(ids[:, -1], record=extends, forward=extends)  # the other rows keep their KV history
        changed = (~(extends | unchanged)).nonzero().squeeze(1).tolist()
        observed = [ids[row][mask[row].bool()].tolist() for row in changed]
        grown = backbone.continuations(changed, observed)
        if grown:
            batch.extend(list(grown), list(grown.values()))
        fresh = [(row, context) for row, context in zip(changed, observed) if row not in grown]
        if fresh:
            batch.prefill([row for row, _ in fresh], [context for _, context in fresh])
        backbone.previous, backbone.restarted[:] = (ids.clone(), mask.clone()), False
        return batch.next_logprobs, batch.next_hidden
