"""What the agent-side adapters share: token observations as int64 batches on the LM's device."""

from __future__ import annotations

import torch


def token_batch(input_ids, attention_mask, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask), int64 (B, L) on ``device``, from token observations (arrays or tensors) of any batch shape."""
    ids, mask = (torch.as_tensor(x, device=device) for x in (input_ids, attention_mask))
    return ids.reshape(-1, ids.shape[-1]).long(), mask.reshape(-1, mask.shape[-1]).long()
