"""Prompt sets: where episodes start.

A prompt is a string (one user message) or a chat message list (``[{"role": ..., "content": ...}, ...]``).
:func:`load_prompts` turns any accepted source into a :class:`PromptSampler` that draws with the env's RNG.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path
from typing import Union

import numpy as np

Prompt = Union[str, list[dict]]
PromptSource = Union[None, str, os.PathLike, Sequence[Prompt], Callable[[np.random.Generator], Prompt], "PromptSampler"]


class PromptSampler:
    """Draws prompts with a numpy Generator: uniformly from a list, or through a user callable.

    :param prompts: a non-empty list of prompts, or ``None`` when ``sample_fn`` is given.
    :param sample_fn: ``fn(rng) -> prompt`` for generated prompt streams.
    """

    def __init__(self, prompts: Sequence[Prompt] | None = None, sample_fn: Callable | None = None):
        if (prompts is None) == (sample_fn is None):
            raise ValueError("give exactly one of a prompt list or a sample_fn")
        self.prompts = None if prompts is None else [validate_prompt(p, f"prompts[{i}]") for i, p in enumerate(prompts)]
        if self.prompts is not None and not self.prompts:
            raise ValueError("the prompt list is empty; expected at least one prompt")
        self.sample_fn = sample_fn

    def __len__(self) -> int:
        if self.prompts is None:
            raise TypeError("a callable prompt sampler has no length")
        return len(self.prompts)

    def __call__(self, rng: np.random.Generator) -> Prompt:
        if self.prompts is not None:
            return self.prompts[int(rng.integers(len(self.prompts)))]
        return validate_prompt(self.sample_fn(rng), "the prompt sampler's result")


def validate_prompt(prompt, where: str = "prompt") -> Prompt:
    """Check that ``prompt`` is a non-empty string or a list of ``{"role", "content"}`` messages."""
    if isinstance(prompt, str):
        if not prompt:
            raise ValueError(f"{where} is an empty string; expected text")
        return prompt
    if isinstance(prompt, (list, tuple)) and prompt and all(_is_message(m) for m in prompt):
        return [dict(m) for m in prompt]
    raise TypeError(
        f"{where} is {prompt!r:.80}; expected a non-empty string or a list of "
        "{'role': str, 'content': str} messages"
    )


def _is_message(message) -> bool:
    return isinstance(message, dict) and isinstance(message.get("role"), str) and isinstance(message.get("content"), str)


def prompt_text(prompt: Prompt) -> str:
    """The prompt as text: the string itself, or the content of a message list's last user message."""
    if isinstance(prompt, str):
        return prompt
    user = [m["content"] for m in prompt if m["role"] == "user"]
    return user[-1] if user else prompt[-1]["content"]


def load_prompts(source: PromptSource = None) -> PromptSampler:
    """Build a sampler from a list, a file (``.txt``: one prompt per line; ``.jsonl``: a ``prompt`` string
    or ``messages`` list per line), a callable ``fn(rng) -> prompt``, or ``None`` for the default set."""
    if isinstance(source, PromptSampler):
        return source
    if source is None:
        return PromptSampler(default_prompts())
    if isinstance(source, (str, os.PathLike)):
        return PromptSampler(read_prompt_file(source))
    if callable(source):
        return PromptSampler(sample_fn=source)
    if isinstance(source, Sequence):
        return PromptSampler(list(source))
    raise TypeError(f"prompts={source!r:.80} is not a list, a file path, a callable or None")


def default_prompts() -> list[str]:
    """The project's default prompt set (240 short user requests in 12 categories)."""
    with resources.files("lm_gym.data").joinpath("prompts.jsonl").open(encoding="utf-8") as handle:
        return [json.loads(line)["prompt"] for line in handle if line.strip()]


def read_prompt_file(path: str | os.PathLike) -> list[Prompt]:
    """Read prompts from a ``.txt`` or ``.jsonl`` file; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    lines = path.read_text(encoding="utf-8").splitlines()
    if path.suffix == ".jsonl":
        prompts = [_jsonl_prompt(path, number, line) for number, line in enumerate(lines, 1) if line.strip()]
    else:
        prompts = [line for line in lines if line.strip()]
    if not prompts:
        raise ValueError(f"prompt file {path} holds no prompts")
    return prompts


def _jsonl_prompt(path: Path, number: int, line: str) -> Prompt:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}, line {number}: invalid JSON ({err.msg})") from err
    key = "prompt" if isinstance(row, dict) and "prompt" in row else "messages"
    if not isinstance(row, dict) or key not in row:
        raise ValueError(f"{path}, line {number}: expected a 'prompt' or 'messages' field")
    try:
        return validate_prompt(row[key], f"field {key!r}")
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}, line {number}: {err}") from err
