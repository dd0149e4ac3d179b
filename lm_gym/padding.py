"""Padding token id lists into batches, and the position ids of left-padded rows.

Observations and episode rows are left-padded (the last column is the latest token); per-token tables and
label-shifted losses are right-padded (column j is every row's j-th token).

Forwards that train or score (not the env's own decode) run on widths that are multiples of
:data:`SHAPE_MULTIPLE` (:func:`lm_gym.logprobs.last_hidden_states`, reward models): on a CPU, oneDNN builds and keeps kernels for every new matrix shape, which costs
time on each new one and about 17 MB of resident memory per shape for the default model in bf16, so
widths that differ at every minibatch made a training run grow without bound.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

SHAPE_MULTIPLE = 32  # batch widths (and scored rows, lm_gym.logprobs) are rounded up to a multiple of this


def pad_left(sequences: Sequence[Sequence[int]], pad_token_id: int, device, multiple: int = 1
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token id lists into ``(ids, attention_mask)`` int64 tensors on ``device``, the width rounded up
    to a multiple of ``multiple``."""
    return _pad(sequences, pad_token_id, device, left=True, multiple=multiple)


def pad_right(sequences: Sequence[Sequence[int]], pad_token_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id lists into ``(ids, attention_mask)`` int64 tensors on ``device`` (for label-shifted
    losses and per-token tables, where position j of every row is its j-th token)."""
    return _pad(sequences, pad_token_id, device, left=False, multiple=1)


def round_up(count: int, multiple: int) -> int:
    """The least multiple of ``multiple`` that is at least ``count``."""
    return -(-count // multiple) * multiple


def _pad(sequences, pad_token_id: int, device, left: bool, multiple: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = round_up(max(len(seq) for seq in sequences), multiple)
    ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if len(seq):
            columns = slice(width - len(seq), width) if left else slice(0, len(seq))
            ids[row, columns] = torch.as_tensor(list(seq), dtype=torch.long)
            mask[row, columns] = 1
    return ids.to(device), mask.to(device)


def mask_positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of left-padded rows: 0 at each row's first real token (padding gets 0 too)."""
    return (mask.cumsum(dim=1) - 1).clamp(min=0)


def trim_left(ids: torch.Tensor, attention: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop leading columns that are padding in every row of a left-padded batch."""
    used = attention.any(dim=0).nonzero()
    start = int(used[0]) if len(used) else 0
    return ids[:, start:], attention[:, start:]
