"""Supervised fine-tuning on prompt/response pairs: the policy's starting point before RL.

The loss is the next-token cross-entropy on the response tokens only (prompt tokens are masked). Each
example is tokenized exactly as the env will see it: the prompt encoded as the env encodes it (chat
template with the assistant's turn opened), then the response's tokens and the stop token, so what the
model learns to write is what the env's action sequence looks like.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
from tqdm import tqdm

from agents.actor_critic import apply_lora, require_float32_training
from lm_gym.chat import encode_prompt, has_chat_template
from lm_gym.data import chat_prompt
from lm_gym.logprobs import next_token_nll
from lm_gym.models import resolve_model
from lm_gym.padding import pad_right
from lm_gym.precision import Precision, resolve_precision


def sft(
    model, examples: Sequence, *, tokenizer=None, lora=None, epochs: int = 1, lr: float = 1e-5,
    batch_size: int = 8, max_length: int = 512, seed: int = 0, device=None, precision=None, progress: bool = True,
):
    """Fine-tune ``model`` on ``examples``; return ``(model, tokenizer, history)``.

    :param model: ``"default"``, ``"tiny"``, a directory, a hub id, or a loaded causal LM (trained in place).
    :param examples: ``(prompt, response)`` tuples, ``PreferencePair`` (its chosen response) or
        ``FeedbackExample`` (its response) objects.
    :param tokenizer: with a loaded model whose tokenizer cannot be loaded from its ``name_or_path``.
    :param lora: None (train the weights) or LoRA settings; the returned model has the adapters merged.
    :param max_length: tokens per example; longer examples keep their first tokens (counted, warned).
    :param precision: ``"auto"``, ``"bf16"`` or ``"fp32"`` (see :mod:`lm_gym.precision`): bf16 runs the forward
        under autocast on float32 weights (a LoRA base loaded here is bf16); the loss is float32 and computed
        a chunk of positions at a time. Default ``$LM_GYM_PRECISION``, else ``"auto"``.
    :return: the tuned model (eval mode), its tokenizer, and one ``{"epoch", "loss"}`` record per step.
    """
    pairs = [_prompt_and_response(example) for example in examples]
    if not pairs:
        raise ValueError("no examples to fine-tune on")
    precision = resolve_precision(precision, device)
    model, tokenizer = resolve_model(model, tokenizer, device, precision.dtype if lora else None)
    model = apply_lora(model, lora) if lora else model.requires_grad_(True)
    require_float32_training(model, "model")
    sequences = _encode(tokenizer, pairs, max_length)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    history = []
    bar = tqdm(total=epochs * math.ceil(len(pairs) / batch_size), desc="sft", disable=not progress)
    model.eval()  # dropout off; gradients still flow
    for epoch in range(epochs):
        order = torch.randperm(len(pairs), generator=generator).tolist()
        for start in range(0, len(order), batch_size):
            loss = _step(model, optimizer, [sequences[i] for i in order[start : start + batch_size]],
                         tokenizer.pad_token_id, precision)
            history.append({"epoch": epoch, "loss": loss})
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}")
    bar.close()
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    return model.requires_grad_(False).eval(), tokenizer, history


def _prompt_and_response(example) -> tuple:
    if isinstance(example, tuple) and len(example) == 2:
        return example
    for field in ("chosen", "response"):
        if hasattr(example, field) and hasattr(example, "prompt"):
            return example.prompt, getattr(example, field)
    raise TypeError(f"an SFT example is a (prompt, response) tuple, a PreferencePair or a FeedbackExample, "
                    f"not {type(example).__name__}")


def _encode(tokenizer, pairs, max_length: int) -> list[tuple[list[int], int]]:
    """(token ids, number of prompt tokens) per example: the env's prompt encoding, response, stop token."""
    chat = has_chat_template(tokenizer)
    sequences, cut = [], 0
    for prompt, response in pairs:
        prompt_ids = encode_prompt(tokenizer, chat_prompt(prompt), chat)
        ids = prompt_ids + tokenizer(response, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        if len(prompt_ids) >= max_length:
            raise ValueError(f"a prompt is {len(prompt_ids)} tokens, no room for its response in "
                             f"max_length={max_length}: {str(prompt)[:80]!r}")
        cut += len(ids) > max_length
        sequences.append((ids[:max_length], len(prompt_ids)))
    if cut:
        warnings.warn(f"{cut} of {len(pairs)} examples are longer than max_length={max_length} tokens; their "
                      "responses are cut (raise max_length to keep everything)", stacklevel=3)
    return sequences


def _step(model, optimizer, batch: list[tuple[list[int], int]], pad_token_id: int, precision: Precision) -> float:
    """One optimizer step of response-only next-token loss on right-padded sequences."""
    ids, mask = pad_right([sequence for sequence, _ in batch], pad_token_id, model.device)
    response = mask.bool().clone()
    for row, (_, prompt_length) in enumerate(batch):
        response[row, :prompt_length] = False
    with precision.autocast(model.device):
        loss = next_token_nll(model, ids, mask, response)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item()
