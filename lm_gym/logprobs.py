"""Log-probabilities of tokens: the one rule for masking disallowed tokens, and the log-probs of chosen
tokens without a (B, T, V) float32 tensor.

The logits over the whole vocabulary at every position of a batch are the largest tensors of LM training:
16 sequences x 128 positions x 49,152 tokens x 4 bytes is 400 MB, and log-softmax, softmax and their
gradients take as much again each. Here an LM runs to its last hidden states (B, T, H) only
(:func:`last_hidden_states`); the output head, a float32 log-softmax and the entropy then run over at most
``chunk`` positions at a time (:func:`token_logprobs`). With gradients each chunk is checkpointed: backward
recomputes its logits instead of keeping them, so peak memory is about ``chunk x V`` floats whatever the
batch size, for one extra pass of the output head. Each chunk's rows are padded to a multiple of
:data:`lm_gym.padding.SHAPE_MULTIPLE` (and the padding's results dropped), so the output head sees few distinct
shapes.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch.utils.checkpoint import checkpoint

from lm_gym.padding import SHAPE_MULTIPLE, mask_positions, round_up

CHUNK_POSITIONS = 256  # positions per output-head chunk: 256 x 49,152 float32 logits are 50 MB


class TokenLogprobs(NamedTuple):
    """log π(token), the entropy of π and KL(π ‖ π_ref) at each scored position, float32."""

    logprobs: torch.Tensor  # (N,)
    entropy: torch.Tensor | None  # (N,), or None when not asked for
    kl: torch.Tensor | None = None  # (N,) the exact KL over the vocabulary, or None without a reference


def mask_logits(logits: torch.Tensor, allowed) -> torch.Tensor:
    """``logits`` (..., V) with the disallowed tokens at the dtype's lowest finite value: probability 0 after a
    softmax, and a finite entropy (``-inf`` would give NaN in p·log p).

    :param allowed: a bool-like (..., V) mask broadcastable to ``logits`` (True: allowed), or ``None`` (all).
    """
    if allowed is None:
        return logits
    allowed = torch.as_tensor(allowed, device=logits.device).bool()
    return logits.masked_fill(~allowed, torch.finfo(logits.dtype).min)


def last_hidden_states(model, ids: torch.Tensor, mask: torch.Tensor, keep: int | None = None) -> torch.Tensor:
    """The causal LM's last hidden states (B, keep, H) at the last ``keep`` positions (all when None) of
    padded ``ids`` (B, W): the decoder alone, no logits. Gradients flow when enabled.

    The decoder runs on the batch with masked columns added on the left up to a multiple of
    :data:`lm_gym.padding.SHAPE_MULTIPLE` (few distinct shapes, see :mod:`lm_gym.padding`); the states of the
    columns given come back.
    """
    extra = round_up(ids.shape[1], SHAPE_MULTIPLE) - ids.shape[1]
    ids = torch.cat([ids.new_zeros(len(ids), extra), ids], dim=1)
    mask = torch.cat([mask.new_zeros(len(mask), extra), mask], dim=1)
    out = model.get_decoder()(input_ids=ids, attention_mask=mask, position_ids=mask_positions(mask), use_cache=False)
    hidden = out.last_hidden_state[:, extra:]
    return hidden if keep is None else hidden[:, -keep:]


def output_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """The causal LM's logits (..., V), float32, from its last hidden states (..., H): the output head plus
    the final scaling or soft-capping some architectures apply (Gemma's, Cohere's, Granite's)."""
    logits = model.get_output_embeddings()(hidden).float()
    config = model.config.get_text_config()
    if getattr(config, "logit_scale", None):  # Cohere
        logits = logits * config.logit_scale
    if getattr(config, "logits_scaling", None):  # Granite
        logits = logits / config.logits_scaling
    if getattr(config, "final_logit_softcapping", None):  # Gemma 2 and 3
        cap = config.final_logit_softcapping
        logits = torch.tanh(logits / cap) * cap
    return logits


def check_output_logits(model) -> None:
    """Raise if :func:`output_logits` of :func:`last_hidden_states` is not the model's own forward's logits
    (an architecture that transforms its logits in a way lm-gym does not know), on one row of
    :data:`lm_gym.padding.SHAPE_MULTIPLE` tokens: both forwards see the same shape."""
    ids = torch.arange(1, SHAPE_MULTIPLE + 1, device=model.device)[None] % model.get_output_embeddings().weight.shape[0]
    mask = torch.ones_like(ids)
    with torch.no_grad():
        ours = output_logits(model, last_hidden_states(model, ids, mask))
        theirs = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
    if not torch.allclose(ours, theirs, rtol=1e-3, atol=1e-3 * float(theirs.abs().max()) + 1e-5):
        raise NotImplementedError(
            f"{type(model).__name__}'s forward changes its logits after the output head in a way lm-gym does not "
            f"know (max difference {float((ours - theirs).abs().max()):.3g}); please report the architecture"
        )


def token_logprobs(
    model, hidden: torch.Tensor, tokens: torch.Tensor, *, temperature: float = 1.0, allowed=None,
    entropy: bool = False, entropy_grad: bool = False, chunk: int = CHUNK_POSITIONS, reference=None,
) -> TokenLogprobs:
    """log π(tokens | hidden) for π = softmax(logits / temperature) over the allowed tokens, ``chunk``
    positions at a time, float32.

    :param model: the causal LM whose output head reads ``hidden``.
    :param hidden: (N, H) last hidden states, one row per scored position.
    :param tokens: (N,) the token chosen at each position.
    :param allowed: the allowed-token mask (see :func:`mask_logits`), or None.
    :param entropy: also compute the entropy of π at each position; without ``entropy_grad`` it carries no
        gradient (a statistic), which spares backward its recomputation.
    :param reference: ``(reference_model, reference_hidden)``, the reference LM and its (N, H) last hidden
        states at the same positions: also compute the exact KL(π ‖ π_ref) = Σ_v π(v) (log π(v) - log
        π_ref(v)) over the whole vocabulary at each position, with its gradient through π; π_ref is the
        reference's own softmax (temperature 1, every token), as the env's ``ref_logprob`` scores it.
    """
    if hidden.shape[:-1] != tokens.shape or tokens.ndim != 1:
        raise ValueError(f"hidden (N, H) and tokens (N,) must agree; got {tuple(hidden.shape)} and {tuple(tokens.shape)}")
    if chunk < 1:
        raise ValueError(f"chunk must be a positive number of positions, got {chunk}")

    reference_model, reference_hidden = reference if reference is not None else (None, None)
    if reference_hidden is not None and reference_hidden.shape[0] != len(tokens):
        raise ValueError(f"reference hidden states {tuple(reference_hidden.shape)} must have one row per token "
                         f"({len(tokens)})")

    def pad_rows(states: torch.Tensor) -> torch.Tensor:
        padding = round_up(len(states), SHAPE_MULTIPLE) - len(states)
        return torch.cat([states, states.new_zeros(padding, states.shape[1])])

    def score(states: torch.Tensor, chosen: torch.Tensor, reference_states=None) -> tuple[torch.Tensor, ...]:
        rows = len(chosen)
        logits = output_logits(model, pad_rows(states))
        logits = logits if temperature == 1.0 else logits / temperature
        logprobs = torch.log_softmax(mask_logits(logits, allowed), dim=-1)
        padded_chosen = torch.cat([chosen, chosen.new_zeros(len(logits) - rows)])
        chosen_logprob = logprobs.gather(1, padded_chosen[:, None])[:rows, 0]
        kl = chosen_logprob.new_zeros(())
        if reference_states is not None:
            with torch.no_grad():
                reference_logprobs = torch.log_softmax(output_logits(reference_model, pad_rows(reference_states)), -1)
            kl = (logprobs.exp() * (logprobs - reference_logprobs))[:rows].sum(dim=-1)
        if not entropy:
            return chosen_logprob, chosen_logprob.new_zeros(()), kl
        # after the chosen log-prob: a recomputation for backward stops before this when it has no gradient
        with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
            return chosen_logprob, -(logprobs[:rows].exp() * logprobs[:rows]).sum(dim=-1), kl

    recompute = torch.is_grad_enabled() and hidden.requires_grad
    parts = []
    for start in range(0, len(tokens), chunk):
        window = slice(start, start + chunk)
        args = (hidden[window], tokens[window], None if reference_hidden is None else reference_hidden[window])
        parts.append(checkpoint(score, *args, use_reentrant=False) if recompute else score(*args))
    if not parts:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return TokenLogprobs(empty, empty if entropy else None, empty if reference is not None else None)
    def joined(index: int, wanted: bool = True) -> torch.Tensor | None:
        return torch.cat([part[index] for part in parts]) if wanted else None

    return TokenLogprobs(joined(0), joined(1, entropy), joined(2, reference is not None))


def next_token_nll(model, ids: torch.Tensor, mask: torch.Tensor, scored: torch.Tensor,
                   chunk: int = CHUNK_POSITIONS) -> torch.Tensor:
    """Mean negative log-likelihood (float32 scalar) of the tokens ``scored`` marks, each given the tokens
    before it: the language-modelling loss, from :func:`last_hidden_states` and :func:`token_logprobs`.

    :param ids: (B, W) token ids, left- or right-padded; ``mask`` their attention mask.
    :param scored: (B, W) bool, the tokens whose prediction counts (the first column never does).
    """
    hidden = last_hidden_states(model, ids, mask)[:, :-1]  # (B, W - 1, H): the state before each later token
    targets = scored[:, 1:].bool() & mask[:, 1:].bool()
    if not targets.any():
        raise ValueError("no tokens to score: every scored token is padding or the first of its sequence")
    return -token_logprobs(model, hidden[targets], ids[:, 1:][targets], chunk=chunk).logprobs.mean()
