"""A preallocated KV cache whose rows are independent episodes.

Every row shares one write position: slot ``length`` of the buffer. A row's tokens occupy the last slots
before that position (left padding), marked by the slot mask; positions are passed explicitly, so a row
can be refilled with a new prompt while the others keep decoding. Memory is allocated once per batch:
``update`` writes in place, and when the buffer is full :meth:`EpisodeCache.compact` packs each row's live
slots, in order, at the front (a row's slots need not be contiguous: positions are explicit, so attention
does not depend on where a key sits).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer


class SlotLayer(DynamicLayer):
    """One attention layer's keys and values in a buffer of shape (rows, heads, capacity, head_dim)."""

    def __init__(self, num_rows: int, capacity: int):
        super().__init__()
        self.num_rows = num_rows
        self.capacity = capacity
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Allocate the buffers with the heads, head size, dtype and device of the first keys seen."""
        _, heads, _, key_dim = key_states.shape
        value_dim = value_states.shape[-1]
        self.device = key_states.device
        self.keys = key_states.new_zeros(self.num_rows, heads, self.capacity, key_dim)
        self.values = value_states.new_zeros(self.num_rows, heads, self.capacity, value_dim)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Write the new keys and values after the live slots; return views of all live slots."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self.capacity:
            raise RuntimeError(f"KV cache overflow: {end} slots needed, capacity {self.capacity}")
        self.keys[:, :, self.length : end] = key_states
        self.values[:, :, self.length : end] = value_states
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]

    def get_seq_length(self) -> int:
        """Number of slots written so far (shared by all rows)."""
        return self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """Key length and offset for the attention mask of the next forward."""
        return self.length + query_length, 0

    def move(self, src: slice, dst_start: int, new_length: int) -> None:
        """Copy slots ``src`` to start at ``dst_start`` and set the live length."""
        if self.is_initialized:
            count = src.stop - src.start
            for buffer in (self.keys, self.values):
                buffer[:, :, dst_start : dst_start + count] = buffer[:, :, src].clone()
        self.length = new_length

    def gather(self, order: torch.Tensor, length: int) -> None:
        """Make slot j of row r the old slot ``order[r, j]``, for j < ``length`` = ``order.shape[1]``."""
        if self.is_initialized:
            for buffer in (self.keys, self.values):
                index = order[:, None, :, None].expand(-1, buffer.shape[1], -1, buffer.shape[3])
                buffer[:, :, :length] = buffer.gather(2, index)
        self.length = length


class EpisodeCache(Cache):
    """KV cache plus slot mask for ``num_rows`` episodes of one model (see the module docstring)."""

    def __init__(self, num_layers: int, num_rows: int, capacity: int, device: torch.device):
        super().__init__(layers=[SlotLayer(num_rows, capacity) for _ in range(num_layers)])
        self.capacity = capacity
        self.slot_mask = torch.zeros(num_rows, capacity, dtype=torch.long, device=device)

    @property
    def length(self) -> int:
        """Slots in use (the next token of every row is written at this slot)."""
        return self.layers[0].length

    def attention_mask(self, new_tokens: int) -> torch.Tensor:
        """The 2D attention mask over the live slots plus ``new_tokens`` (whose mask must be set first)."""
        return self.slot_mask[:, : self.length + new_tokens]

    def live_span(self) -> int:
        """Slots the live keys would take once packed: the most live slots of any row."""
        return int(self.slot_mask[:, : self.length].sum(dim=1).max()) if self.length else 0

    def compact(self) -> None:
        """Pack each row's live slots, in order, into the front ``live_span()`` slots (right-aligned, as a
        prefill places them), freeing every slot after them."""
        length, span = self.length, self.live_span()
        if span == length:
            return
        live = self.slot_mask[:, :length].bool()
        order = torch.sort(live.to(torch.int8), dim=1, stable=True).indices[:, length - span :]  # (R, span)
        for layer in self.layers:
            layer.gather(order, span)
        mask = live.gather(1, order).to(self.slot_mask.dtype)
        self.slot_mask.zero_()
        self.slot_mask[:, :span] = mask

    def ensure_room(self, new_tokens: int) -> None:
        """Compact when fewer than ``new_tokens`` free slots are left."""
        if self.length + new_tokens > self.capacity:
            self.compact()
        if self.length + new_tokens > self.capacity:
            raise RuntimeError(f"KV cache full: {self.live_span()} live slots + {new_tokens} > {self.capacity}")

    def clear(self) -> None:
        """Forget every row (the buffers stay allocated): the next placement starts at slot 0."""
        for layer in self.layers:
            layer.length = 0
        self.slot_mask.zero_()

    def place(self, rows: torch.Tensor, prefill: Cache, mask: torch.Tensor) -> None:
        """Write a prefilled cache (one row per entry of ``rows``, width P) into the last P slots of ``rows``.

        The rows' older slots are masked out. If fewer than P slots are in use, all rows shift right first.
        """
        width = mask.shape[1]
        if self.length < width:
            self._shift_right(width - self.length)
        start = self.length - width
        self.slot_mask[rows] = 0
        self.slot_mask[rows, start : self.length] = mask.to(self.slot_mask.dtype)
        for layer, source in zip(self.layers, prefill.layers):
            if not layer.is_initialized:
                layer.lazy_initialization(source.keys, source.values)
            layer.keys[rows, :, start : self.length] = source.keys
            layer.values[rows, :, start : self.length] = source.values

    def select(self, rows: torch.Tensor, new_tokens: int) -> EpisodeCache:
        """A cache of ``rows`` alone, for a forward of their next ``new_tokens`` (whose mask must be set in
        its ``slot_mask`` first): their live slots, copied, and room for the new ones after them.
        Call :meth:`ensure_room` first, and :meth:`take_new` after the forward."""
        length = self.length
        selected = EpisodeCache(len(self.layers), len(rows), length + new_tokens, self.slot_mask.device)
        for layer, source in zip(selected.layers, self.layers):
            layer.lazy_initialization(source.keys[rows, :, :1], source.values[rows, :, :1])
            layer.keys[:, :, :length] = source.keys[rows, :, :length]
            layer.values[:, :, :length] = source.values[rows, :, :length]
            layer.length = length
        selected.slot_mask[:, :length] = self.slot_mask[rows, :length]
        return selected

    def take_new(self, rows: torch.Tensor, selected: EpisodeCache) -> None:
        """Write the slots a forward added to ``selected`` (this cache's :meth:`select` of ``rows``) after the
        live slots, masked out for every other row."""
        start, end = self.length, selected.length
        self.slot_mask[:, start:end] = 0
        self.slot_mask[rows, start:end] = selected.slot_mask[:, start:end]
        for layer, source in zip(self.layers, selected.layers):
            layer.keys[rows, :, start:end] = source.keys[:, :, start:end]
            layer.values[rows, :, start:end] = source.values[:, :, start:end]
            layer.length = end

    def _shift_right(self, by: int) -> None:
        length = self.length
        for layer in self.layers:
            layer.move(slice(0, length), by, length + by)
        self.slot_mask[:, by : by + length] = self.slot_mask[:, :length].clone()
        self.slot_mask[:, :by] = 0
