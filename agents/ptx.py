"""The pretraining (ptx) term of PPO-ptx: next-token loss on supplied text, mixed into every PPO update.

InstructGPT adds γ·E[log π(x)] over pretraining text to the PPO objective so that RL fine-tuning does not
erode what the LM could already do. :class:`PretrainingBatches` packs the texts into fixed-length token
blocks (every token is kept: the last block of the stream may be shorter) and serves them in order, cycling.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lm_gym.logprobs import next_token_nll
from lm_gym.padding import pad_right
from lm_gym.precision import resolve_precision


class PretrainingBatches:
    """Packed token blocks of ``texts``, served ``batch_size`` at a time.

    :param texts: the pretraining (or any reference) text.
    :param tokenizer: the policy's tokenizer; an EOS token separates the texts when it has one.
    :param block_tokens: tokens per block.
    :param batch_size: blocks per batch.
    """

    def __init__(self, texts: Sequence[str], tokenizer, block_tokens: int = 256, batch_size: int = 4):
        if isinstance(texts, str) or not texts:
            raise ValueError("ptx_texts must be a non-empty list of strings")
        if block_tokens < 2 or batch_size < 1:
            raise ValueError(f"need block_tokens >= 2 and batch_size >= 1, got {block_tokens} and {batch_size}")
        separator = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
        stream = []
        for text in texts:
            stream += tokenizer(text, add_special_tokens=False).input_ids + separator
        self.blocks = [stream[start : start + block_tokens] for start in range(0, len(stream), block_tokens)]
        self.blocks = [block for block in self.blocks if len(block) >= 2]  # a 1-token block has nothing to predict
        if not self.blocks:
            raise ValueError("ptx_texts hold fewer than 2 tokens")
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.batch_size, self.position = batch_size, 0

    def next_batch(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask) of the next ``batch_size`` blocks, right-padded."""
        blocks = [self.blocks[(self.position + i) % len(self.blocks)] for i in range(self.batch_size)]
        self.position = (self.position + self.batch_size) % len(self.blocks)
        return pad_right(blocks, self.pad_token_id, device)

    def loss(self, lm, precision=None) -> torch.Tensor:
        """Mean next-token cross-entropy (float32) of ``lm`` on the next batch, its forward in ``precision``
        (see :func:`lm_gym.precision.resolve_precision`)."""
        ids, mask = self.next_batch(lm.device)
        with resolve_precision(precision, lm.device).autocast(lm.device):
            return next_token_nll(lm, ids, mask, mask)
