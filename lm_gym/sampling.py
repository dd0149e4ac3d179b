"""Choosing tokens from logits: one sampler, and batched continuations of contexts.

Every place that turns logits into tokens uses these: LMPPO's rollouts and evaluation, ``lm-gym generate`` and
``rollout`` and the other party's replies in multi-turn episodes. Disallowed tokens are masked by the one
masking rule, :func:`lm_gym.logprobs.mask_logits`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lm_gym.episode_batch import EpisodeBatch
from lm_gym.logprobs import mask_logits


def sample_tokens(
    logits: torch.Tensor, temperature: float = 1.0, allowed=None, greedy: bool = False,
    generators: Sequence[torch.Generator | None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row from π = softmax(logits / temperature) over the allowed tokens: ``(tokens, log π(tokens))``.

    :param logits: (B, V) logits or log-probs.
    :param temperature: divides the logits (> 0; ignored with ``greedy``).
    :param allowed: the allowed-token mask (see :func:`mask_logits`), or ``None``.
    :param greedy: take the most likely token instead of sampling.
    :param generators: ``None`` to sample with torch's global generator, or one ``torch.Generator`` per row
        (Gumbel-max: a row's draw does not depend on the other rows; a ``None`` entry draws no noise and
        takes that row's most likely token).
    """
    if not greedy and temperature <= 0:
        raise ValueError(f"temperature must be > 0 to sample, got {temperature}; pass greedy=True for argmax")
    if not greedy and temperature != 1.0:
        logits = logits / temperature
    distribution = torch.distributions.Categorical(logits=mask_logits(logits, allowed))
    if greedy:
        tokens = distribution.logits.argmax(dim=-1)
    elif generators is None:
        tokens = distribution.sample()
    else:
        tokens = (distribution.logits + _gumbel_noise(distribution.logits, generators)).argmax(dim=-1)
    return tokens, distribution.log_prob(tokens)


def _gumbel_noise(logits: torch.Tensor, generators) -> torch.Tensor:
    noise = torch.zeros_like(logits)
    for row, generator in enumerate(generators):
        if generator is not None:
            uniform = torch.rand(logits.shape[1], generator=generator, device=logits.device)
            noise[row] = -torch.log(-torch.log(uniform.clamp_(min=1e-20)))
    return noise


@torch.no_grad()
def sample_continuations(
    model, contexts: list[list[int]], limits: list[int], generators: list[torch.Generator],
    temperature: float, stop_token_ids: torch.Tensor, pad_token_id: int, max_tokens: int,
) -> list[list[int]]:
    """Sample one continuation per context (batched, KV-cached), each row with its own generator.

    ``model`` is a causal LM or a :class:`lm_gym.reference.ReferenceModel` (the env replies as the reference).

    Each continuation ends with a stop token or after ``limits[i]`` tokens. Rows draw their Gumbel noise
    from their own generator, so a row's text does not depend on which other rows share the batch.
    """
    batch = EpisodeBatch(model, len(contexts), max_tokens, pad_token_id)
    batch.prefill(range(len(contexts)), contexts)
    outputs: list[list[int]] = [[] for _ in contexts]
    running = torch.ones(len(contexts), dtype=torch.bool, device=batch.device)
    limit = torch.as_tensor(limits, device=batch.device)
    for step in range(max(limits)):
        drawing = [generator if bool(run) else None for generator, run in zip(generators, running)]
        tokens, _ = sample_tokens(batch.next_logprobs, temperature, greedy=temperature == 0, generators=drawing)
        for row in running.nonzero().squeeze(1).tolist():
            outputs[row].append(int(tokens[row]))
        finished = running & (torch.isin(tokens, stop_token_ids) | (step + 1 >= limit))
        batch.append(tokens, record=running, forward=running & ~finished)
        running &= ~finished
        if not bool(running.any()):
            break
    return outputs
