"""Turning prompts and dialogue turns into token ids, with or without the tokenizer's chat template."""

from __future__ import annotations

from dataclasses import dataclass

from lm_gym.data.prompts import Prompt

_SENTINELS = ("\u2460AGENT\u2460", "\u2461REPLY\u2461")


def has_chat_template(tokenizer) -> bool:
    """Whether the tokenizer carries a chat template."""
    return bool(getattr(tokenizer, "chat_template", None))


def encode_prompt(tokenizer, prompt: Prompt, use_chat_template: bool, system_prompt: str | None = None,
                  instructions: str | None = None, tools: list[dict] | None = None) -> list[int]:
    """Token ids of a prompt: chat-formatted with the generation prompt, or plain text with special tokens.

    A prompt given as text gets ``system_prompt`` before it (a system turn, or text and a blank line);
    ``instructions`` (the other party's: how to call the tools, say) join the system message of any prompt,
    and ``tools`` go to a chat template that renders them.
    """
    if isinstance(prompt, str):
        system = "\n\n".join(text for text in (system_prompt, instructions) if text)
        if not use_chat_template:
            return tokenizer(f"{system}\n\n{prompt}" if system else prompt).input_ids
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": prompt})
    elif not use_chat_template:
        raise ValueError("a chat message list needs use_chat_template=True and a tokenizer with a chat template")
    else:
        messages = with_instructions(list(prompt), instructions)
    extra = {"tools": tools} if tools else {}
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **extra)
    return tokenizer(text, add_special_tokens=False).input_ids


def with_instructions(messages: list[dict], instructions: str | None) -> list[dict]:
    """``messages`` with ``instructions`` at the end of their system message (one is added when there is none)."""
    if not instructions:
        return messages
    if messages and messages[0].get("role") == "system":
        first = {**messages[0], "content": f"{messages[0]['content']}\n\n{instructions}"}
        return [first, *messages[1:]]
    return [{"role": "system", "content": instructions}, *messages]


def format_exchange(tokenizer, prompt: Prompt, response: str) -> str:
    """A prompt and its response as one text, chat-formatted as the env formats them when possible."""
    if has_chat_template(tokenizer):
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        messages.append({"role": "assistant", "content": response})
        return tokenizer.apply_chat_template(messages, tokenize=False)
    if not isinstance(prompt, str):
        raise ValueError("a chat message list needs a tokenizer with a chat template")
    return f"{prompt}\n{response}"


@dataclass(frozen=True)
class TurnMarkers:
    """Token ids placed between dialogue turns.

    ``after_agent`` follows the agent's stop token and opens the other party's turn; ``after_reply``
    closes the other party's turn and opens the agent's next one.
    """

    after_agent: list[int]
    after_reply: list[int]


def turn_markers(tokenizer, reply_role: str, use_chat_template: bool, stop_text: str) -> TurnMarkers:
    """Derive the markers from the chat template by rendering a two-turn dialogue around sentinels.

    Without a chat template, turns are separated by plain ``"\\n\\nUser: "`` / ``"\\n\\nAssistant: "`` lines.
    ``stop_text`` (the agent's stop token as text) is removed from the start of ``after_agent``, since the
    agent emitted it already.
    """
    if use_chat_template:
        agent, reply = _SENTINELS
        messages = [
            {"role": "user", "content": "?"},
            {"role": "assistant", "content": agent},
            {"role": reply_role, "content": reply},
        ]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        between = text[text.index(agent) + len(agent) : text.index(reply)]
        after_reply = text[text.index(reply) + len(reply) :]
    else:
        between, after_reply = f"\n\n{reply_role.capitalize()}: ", "\n\nAssistant: "
    if stop_text and between.startswith(stop_text):
        between = between[len(stop_text) :]
    encode = lambda s: tokenizer(s, add_special_tokens=False).input_ids  # noqa: E731
    return TurnMarkers(after_agent=encode(between), after_reply=encode(after_reply))
