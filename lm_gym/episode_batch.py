"""The episode batch: N token sequences of one causal LM, kept on the device.

:class:`EpisodeBatch` holds each row's tokens (left-aligned), its length, a shared :class:`EpisodeCache`
and the log-probabilities of the next token. Starting a row prefills its context in one forward;
appending runs only the new token of every row through the model, all rows in one batched forward.
The single env uses it with one row, the vector env with N; there is one implementation.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Sequence

import torch
from transformers.cache_utils import DynamicCache

from lm_gym.kv_cache import EpisodeCache
from lm_gym.logprobs import output_logits
from lm_gym.models import adapters_disabled, output_vocab_size
from lm_gym.padding import mask_positions, pad_left
from lm_gym.reference import ReferenceModel


def cache_keyword(model) -> str:
    """The decoder's forward keyword that takes a KV cache (``cache`` in recent transformers, else
    ``past_key_values``), read from its class's signature (under any PEFT wrapper)."""
    decoder = model.get_decoder()
    return "cache" if "cache" in inspect.signature(type(decoder).forward).parameters else "past_key_values"


class EpisodeBatch:
    """Token buffer, lengths, KV cache and next-token log-probs for ``num_rows`` episodes.

    :param model: a causal LM (eval mode; gradients are not taken here), or a
        :class:`lm_gym.reference.ReferenceModel` to run the LM as the reference (its adapters off).
    :param num_rows: number of episodes stepped together.
    :param max_tokens: most tokens a row may hold.
    :param pad_token_id: id that fills unused positions (always masked).
    :param keep_hidden: also keep the last hidden state at every row's latest position (``next_hidden``),
        for value heads.
    :param score: run the model at all; with False only the tokens are kept (no KV cache, no forwards)
        and ``next_logprobs`` stays NaN.
    """

    def __init__(self, model, num_rows: int, max_tokens: int, pad_token_id: int, keep_hidden: bool = False,
                 score: bool = True):
        self.as_reference = isinstance(model, ReferenceModel)  # run with the adapters off
        model = model.model if self.as_reference else model
        self.model, self.score = model, score
        self.device = model.device
        self.num_rows = num_rows
        self.max_tokens = max_tokens
        self.pad_token_id = pad_token_id
        self.tokens = torch.full((num_rows, max_tokens), pad_token_id, dtype=torch.long, device=self.device)
        self.lengths = torch.zeros(num_rows, dtype=torch.long, device=self.device)
        self.cached = torch.zeros(num_rows, dtype=torch.long, device=self.device)  # tokens with KV history
        self.next_logprobs = torch.full((num_rows, output_vocab_size(model) if score else 1), float("nan"),
                                        device=self.device)
        self._cache_shape = (model.config.get_text_config().num_hidden_layers, num_rows,
                             max_tokens + max(8, max_tokens // 4) if score else 1)
        self.cache = EpisodeCache(*self._cache_shape, self.device)
        self.released = False  # the KV cache was freed; the next forward rebuilds it from the tokens
        self._cache_keyword = cache_keyword(model)
        self.keep_hidden = keep_hidden
        self.next_hidden: torch.Tensor | None = None

    def release_cache(self) -> None:
        """Free the KV cache while the rows sit idle (their tokens and next-token log-probs stay): the next
        forward first rebuilds it from the rows' tokens, in one batched prefill."""
        if self.score:
            self.cache = EpisodeCache(*self._cache_shape, self.device)
            self.released = True

    def _rebuild(self) -> None:
        self.released = False
        rows = self.lengths.nonzero().squeeze(1).tolist()
        if rows:
            self.prefill(rows, [self.row_tokens(row) for row in rows])

    @torch.no_grad()
    def prefill(self, rows: Sequence[int], contexts: Sequence[Sequence[int]]) -> None:
        """Start ``rows`` afresh from ``contexts`` (token id lists) in one batched forward."""
        for context in contexts:
            if not 0 < len(context) <= self.max_tokens:
                raise ValueError(f"a context must hold 1..{self.max_tokens} tokens, got {len(context)}")
        if self.released and len(rows) < self.num_rows:
            self._rebuild()  # the other rows' caches first
        self.released = False
        ids, mask = pad_left(contexts, self.pad_token_id, self.device)
        row_index = torch.as_tensor(list(rows), dtype=torch.long, device=self.device)
        self._write_tokens(row_index, ids, mask)
        if not self.score:
            return
        prefill_cache = DynamicCache()
        logprobs, hidden = self._latest(ids, mask, mask_positions(mask), prefill_cache)
        if len(row_index) == self.num_rows:
            self.cache.clear()  # a full reset starts from the same layout whatever came before
        self.cache.place(row_index, prefill_cache, mask)
        self._set_latest(row_index, logprobs, hidden)

    @torch.no_grad()
    def extend(self, rows: Sequence[int], additions: Sequence[Sequence[int]]) -> None:
        """Append ``additions[i]`` (token id lists: a tool result, the other party's turn) to ``rows``, running
        only the ids their KV cache lacks, in one batched forward against their cached history. Rows whose
        history was dropped (see :meth:`append`) are prefilled from all their tokens instead."""
        rows = list(rows)
        for row, ids in zip(rows, additions, strict=True):
            room = self.max_tokens - int(self.lengths[row])
            if not 0 < len(ids) <= room:
                raise ValueError(f"row {row} can take 1..{room} more tokens, got {len(ids)}")
            self.tokens[row, int(self.lengths[row]) : int(self.lengths[row]) + len(ids)] = torch.as_tensor(
                list(ids), dtype=torch.long, device=self.device)
            self.lengths[row] += len(ids)
        if not self.score:
            return
        if self.released:
            self._rebuild()
            return
        fresh = [row for row in rows if int(self.cached[row]) == 0]
        if fresh:
            self.prefill(fresh, [self.row_tokens(row) for row in fresh])
        held = [row for row in rows if int(self.cached[row]) < int(self.lengths[row])]
        if held:
            self._forward_tails(held)

    def _forward_tails(self, rows: list[int]) -> None:
        """Run each row's tokens past its KV history (left-padded to one width) against that history."""
        ids, mask = pad_left([self.row_tokens(row, int(self.cached[row])) for row in rows], self.pad_token_id,
                             self.device)
        row_index = torch.as_tensor(rows, dtype=torch.long, device=self.device)
        width = ids.shape[1]
        self.cache.ensure_room(width)
        selected = self.cache.select(row_index, width)
        selected.slot_mask[:, selected.length : selected.length + width] = mask
        positions = self.cached[row_index][:, None] + mask_positions(mask)
        logprobs, hidden = self._latest(ids, selected.attention_mask(width), positions, selected)
        self.cache.take_new(row_index, selected)
        self._set_latest(row_index, logprobs, hidden)

    def _set_latest(self, rows: torch.Tensor, logprobs: torch.Tensor, hidden: torch.Tensor) -> None:
        """Record the latest log-probs and hidden states of ``rows``, whose KV cache now holds all their tokens."""
        self.next_logprobs[rows] = logprobs
        self.cached[rows] = self.lengths[rows]
        if self.keep_hidden:
            if self.next_hidden is None:
                self.next_hidden = hidden.new_zeros(self.num_rows, hidden.shape[-1])
            self.next_hidden[rows] = hidden

    def _latest(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(log-probs (B, V), last hidden state (B, H)), float32, at the last position: the decoder through
        ``cache``, then the output head on that position alone.

        Not the LM's own forward with ``logits_to_keep=1``: its (B, 1, H) slice of a longer sequence reaches
        the output head as a strided 3-D tensor, which torch multiplies, for weights that need no gradient,
        as a batched matmul over B copies of the (V, H) head: 3.6 GB and 5 s for 64 rows of the default model
        in bf16 (torch 2.13, CPU).
        """
        adapters = adapters_disabled(self.model) if self.as_reference else contextlib.nullcontext()
        with adapters:
            out = self.model.get_decoder()(input_ids=ids, attention_mask=mask, position_ids=positions,
                                           use_cache=True, **{self._cache_keyword: cache})
            hidden = out.last_hidden_state[:, -1].contiguous()  # (B, H)
            logits = output_logits(self.model, hidden)
        return torch.log_softmax(logits, dim=-1), hidden.float()

    def _write_tokens(self, rows: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> None:
        lengths = mask.sum(dim=1)
        width = ids.shape[1]
        # Left-align each context: position j of the row takes column (width - length + j) of ids.
        columns = torch.arange(self.max_tokens, device=self.device)
        source = (columns[None, :] + (width - lengths)[:, None]).clamp(max=width - 1)
        gathered = ids.gather(1, source)
        self.tokens[rows] = torch.where(columns[None, :] < lengths[:, None], gathered, self.pad_token_id)
        self.lengths[rows] = lengths

    @torch.no_grad()
    def append(self, tokens: torch.Tensor, record: torch.Tensor, forward: torch.Tensor) -> None:
        """Append ``tokens[i]`` to every row where ``record`` is set; run the ``forward`` rows through the model.

        ``forward`` must be a subset of ``record``. Rows recorded but not forwarded are finished: their
        next-token log-probs are left stale and their KV history is dropped (they are prefilled next). Rows
        not recorded keep their tokens, KV history and log-probs, to be appended to or :meth:`extend`-ed later.
        """
        if self.released and bool(forward.any()):
            self._rebuild()  # from the tokens before this step's
        rows = record.nonzero().squeeze(1)
        if len(rows):
            if int(self.lengths[rows].max()) >= self.max_tokens:
                raise RuntimeError(f"an episode row is full ({self.max_tokens} tokens)")
            self.tokens[rows, self.lengths[rows]] = tokens[rows]
            self.lengths[rows] += 1
        if self.score and bool(forward.any()):
            self._forward_last(tokens, forward, record)

    def _forward_last(self, tokens: torch.Tensor, forward: torch.Tensor, record: torch.Tensor) -> None:
        cache = self.cache
        finished = record & ~forward
        cache.slot_mask[finished] = 0
        self.cached[finished] = 0
        cache.ensure_room(1)
        slot, idle = cache.length, ~forward
        history = cache.slot_mask[idle, :slot].clone()
        cache.slot_mask[idle, :slot] = 0  # idle rows run a dummy token that attends only to itself
        cache.slot_mask[:, slot] = 1
        ids = torch.where(forward, tokens, self.pad_token_id)[:, None]
        positions = torch.where(forward, self.lengths - 1, 0)[:, None]
        logprobs, hidden = self._latest(ids, cache.attention_mask(1), positions, cache)
        cache.slot_mask[idle, :slot] = history
        cache.slot_mask[idle, slot] = 0
        self._set_latest(forward.nonzero().squeeze(1), logprobs[forward], hidden[forward])

    def logprobs_of(self, tokens: torch.Tensor) -> torch.Tensor:
        """log p(tokens[i] | row i so far) under the model, for every row (NaN when not scoring)."""
        if not self.score:
            return self.next_logprobs[:, 0].clone()
        return self.next_logprobs.gather(1, tokens[:, None]).squeeze(1)

    def observation(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask of every row, right-aligned in ``length`` positions (left padding)."""
        mask = self.right_aligned(torch.ones_like(self.tokens), length, 0)
        return self.right_aligned(self.tokens, length, self.pad_token_id), mask

    def right_aligned(self, values: torch.Tensor, length: int, fill) -> torch.Tensor:
        """(num_rows, length) ``values`` laid out as the rows' tokens are (one per position, left-aligned),
        right-aligned as observations are: ``fill`` before each row's first token."""
        columns = torch.arange(length, device=self.device)
        offset = length - self.lengths
        source = (columns[None, :] - offset[:, None]).clamp(min=0, max=self.max_tokens - 1)
        return torch.where(columns[None, :] >= offset[:, None], values.gather(1, source), fill)

    def row_tokens(self, row: int, start: int = 0) -> list[int]:
        """Token ids of ``row`` from position ``start`` to its end, on the host."""
        return self.tokens[row, start : int(self.lengths[row])].tolist()
