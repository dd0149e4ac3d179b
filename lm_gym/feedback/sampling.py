"""Pre-generating responses to rate (``lm-gym feedback sample``), so that raters never wait for a model.

Responses are sampled in batches through :class:`lm_gym.LanguageModelVectorEnv`: all rows of a batch step
together, each row draws its tokens from the model's own next-token distribution at ``temperature`` with
its own seeded generator, and the settings are stored with every item. Arena mode samples one response per
prompt from each of two models and stores them as a pair in a random order, the model names hidden from
raters. A NUL character in a response (which PostgreSQL cannot store) is replaced by U+FFFD.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass

import torch

from lm_gym.sampling import sample_tokens
from lm_gym.vector_env import LanguageModelVectorEnv
from lm_gym.feedback.store import NewItem


REPLACEMENT = "\ufffd"  # stands for a NUL character, which PostgreSQL cannot store


@dataclass(frozen=True)
class SamplingSettings:
    """How responses are sampled (stored with each item).

    :param max_new_tokens: response length limit in tokens.
    :param temperature: sampling temperature (> 0).
    :param max_prompt_tokens: prompt length limit; longer prompts keep their last tokens.
    :param batch_size: rows stepped together.
    :param seed: row ``i`` of the whole run samples with seed ``seed + i``.
    """

    max_new_tokens: int = 48
    temperature: float = 1.0
    max_prompt_tokens: int = 256
    batch_size: int = 16
    seed: int = 0

    def __post_init__(self):
        if self.max_new_tokens < 1 or self.batch_size < 1 or self.max_prompt_tokens < 1:
            raise ValueError("max_new_tokens, max_prompt_tokens and batch_size must be >= 1")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")


def sample_responses(model, prompts: list, settings: SamplingSettings, device: str | None = None) -> list[str]:
    """One sampled response per prompt (in order), in batches of ``settings.batch_size``.

    :param model: anything ``load_model`` takes: ``"default"``, ``"tiny"``, a directory or a hub id.
    :param prompts: texts or chat message lists.
    """
    size = min(settings.batch_size, len(prompts))
    env = LanguageModelVectorEnv(size, model=model, reward=_no_reward, max_new_tokens=settings.max_new_tokens,
                                 max_prompt_tokens=settings.max_prompt_tokens, truncate_prompt="left", device=device)
    try:
        responses = []
        for start in range(0, len(prompts), size):
            batch = list(prompts[start:start + size])
            padded = batch + [batch[-1]] * (size - len(batch))  # the last batch fills its rows and drops them
            responses += _sample_batch(env, padded, settings, settings.seed + start)[: len(batch)]
        return responses
    finally:
        env.close()


def _sample_batch(env: LanguageModelVectorEnv, prompts: list, settings: SamplingSettings, seed: int) -> list[str]:
    """Play one episode per row and return each row's first response (rows that end early restart and are
    ignored until the others finish)."""
    device = env.episodes.device
    generators = [torch.Generator(device=device).manual_seed(seed + row) for row in range(env.num_envs)]
    env.reset(seed=seed, options={"prompts": prompts})
    responses: list[str | None] = [None] * env.num_envs
    while any(response is None for response in responses):
        tokens, _ = sample_tokens(env.episodes.batch.next_logprobs, settings.temperature, generators=generators)
        *_, infos = env.step_with_row_infos(tokens.cpu().numpy())
        for row, info in enumerate(infos):
            if responses[row] is None and info.get("turn_ended"):
                responses[row] = info["response_text"].strip().replace("\x00", REPLACEMENT)
    return responses


def _no_reward(prompts, responses, **context):
    return [0.0] * len(responses)


def sample_items(model, prompts: list, responses_per_prompt: int, settings: SamplingSettings,
                 model_name: str | None = None, device: str | None = None) -> list[NewItem]:
    """``responses_per_prompt`` sampled responses per prompt as single-response items to rate."""
    if responses_per_prompt < 1:
        raise ValueError(f"responses_per_prompt must be >= 1, got {responses_per_prompt}")
    rows = [prompt for prompt in prompts for _ in range(responses_per_prompt)]
    responses = sample_responses(model, rows, settings, device)
    name = model_name or str(model)
    recorded = {"model": name, **asdict(settings)}
    return [NewItem(prompt, response, model_a=name, sampling={**recorded, "row": i}, source="sample")
            for i, (prompt, response) in enumerate(zip(rows, responses))]


def sample_arena(model_a, model_b, prompts: list, settings: SamplingSettings, device: str | None = None) -> list[NewItem]:
    """One response per prompt from each model, stored as pairs in a random (seeded) order."""
    first = sample_responses(model_a, prompts, settings, device)
    second = sample_responses(model_b, prompts, settings, device)
    order = random.Random(settings.seed)
    items = []
    for i, (prompt, x, y) in enumerate(zip(prompts, first, second)):
        sides = [(str(model_a), x), (str(model_b), y)]
        order.shuffle(sides)
        (name_a, text_a), (name_b, text_b) = sides
        items.append(NewItem(prompt, text_a, text_b, model_a=name_a, model_b=name_b,
                             sampling={**asdict(settings), "row": i, "arena": True}, source="arena"))
    return items
