"""How tools, tool calls and tool results are written in an episode's tokens.

With a tokenizer whose chat template takes ``tools=`` (its source mentions them), the template describes the
tools in the prompt and renders results as ``tool`` messages; calls are read with the tokenizer's own
``parse_response`` when it has a response template. Any other tokenizer gets lm-gym's default format:

- the prompt's system message lists the tools, one JSON schema per line, and asks for calls written as
  ``<tool_call>{"name": "NAME", "arguments": {...}}</tool_call>``;
- each result comes back as a ``tool`` turn holding ``<tool_response>TEXT</tool_response>``.

An agent turn ends as soon as its text completes a call (``call_end``: ``</tool_call>``, in the default format
and in templates that use that tag), as a stop token ends it; the env closes the turn and runs the call.

The agent's own tokens are never re-encoded: only the result turns are, and the env inserts their ids after
the agent's (:mod:`lm_gym.parties`).
"""

from __future__ import annotations

import json
import re

from lm_gym.chat import has_chat_template
from lm_gym.tools import ToolCall

CALL_END = "</tool_call>"
CALL_PATTERN = re.compile(r"<tool_call>(.*?)(</tool_call>|$)", re.DOTALL)
DEFAULT_INSTRUCTIONS = (
    "You can call these tools, described as JSON schemas:\n{schemas}\n"
    "To call one, write its name and arguments as JSON, for example {example}; its result comes back as "
    "<tool_response>...</tool_response>. When you have the answer, reply without a tool call."
)


def template_source(tokenizer) -> str:
    """The text of the tokenizer's chat template(s) ("" without one)."""
    template = getattr(tokenizer, "chat_template", None) or ""
    return template if isinstance(template, str) else " ".join(template.values())


def template_takes_tools(tokenizer) -> bool:
    """Whether the tokenizer's chat template renders ``tools=`` itself."""
    return "tools" in template_source(tokenizer)


def tools_instructions(schemas: list[dict]) -> str:
    """The default format's system text: the tools' schemas and how to call them."""
    return DEFAULT_INSTRUCTIONS.format(schemas="\n".join(json.dumps(schema) for schema in schemas),
                                       example=call_example(schemas))


def call_example(schemas: list[dict]) -> str:
    """A call of the first tool in the default format, its arguments as ``...``: the format shown with a real
    tool's name (small models copy a placeholder name such as ``TOOL`` verbatim)."""
    function = schemas[0]["function"]
    arguments = {name: "..." for name in function.get("parameters", {}).get("properties", {})}
    return f"<tool_call>{json.dumps({'name': function['name'], 'arguments': arguments})}{CALL_END}"


def parse_default_calls(text: str) -> list[ToolCall | None]:
    """The calls of the default format in ``text``, in order; None for each that is not a JSON object with a
    string ``name`` and an object ``arguments`` (or is never closed)."""
    calls: list[ToolCall | None] = []
    for match in CALL_PATTERN.finditer(text):
        body, closed = match.group(1), bool(match.group(2))
        try:
            data = json.loads(body) if closed else None
        except json.JSONDecodeError:
            data = None
        arguments = data.get("arguments", {}) if isinstance(data, dict) else None
        if not isinstance(data, dict) or not isinstance(data.get("name"), str) or not isinstance(arguments, dict):
            calls.append(None)
            continue
        calls.append(ToolCall(data["name"], arguments))
    return calls


class ToolFormat:
    """The writing of one tokenizer's tool turns (see the module docstring).

    :param tokenizer: the env's tokenizer.
    :param schemas: the tools' JSON schemas (:attr:`lm_gym.tools.Toolbox.schemas`).
    :param use_chat_template: whether the env formats turns with the chat template.
    """

    def __init__(self, tokenizer, schemas: list[dict], use_chat_template: bool):
        self.tokenizer, self.schemas = tokenizer, schemas
        self.native = use_chat_template and has_chat_template(tokenizer) and template_takes_tools(tokenizer)
        self.call_end = CALL_END if not self.native or CALL_END in template_source(tokenizer) else None

    def system_text(self) -> str | None:
        """Text the prompt's system message carries: the default format's instructions (None when the
        template describes the tools itself)."""
        return None if self.native else tools_instructions(self.schemas)

    def template_tools(self) -> list[dict] | None:
        """What the chat template's ``tools=`` gets: the schemas with a tool-aware template, else None."""
        return self.schemas if self.native else None

    def parse(self, text: str) -> list[ToolCall | None]:
        """The calls in an agent turn's text (None for each malformed one): the tokenizer's response parser
        where it has one and its template takes tools, else the default format."""
        if not (self.native and getattr(self.tokenizer, "response_template", None) is not None):
            return parse_default_calls(text)
        try:
            message = self.tokenizer.parse_response(text, prefix="", tools=self.schemas)
        except Exception:  # a parser that cannot read the text: one malformed call
            return [None]
        calls = []
        for entry in message.get("tool_calls") or []:
            function = entry.get("function", entry) if isinstance(entry, dict) else None
            arguments = function.get("arguments") if isinstance(function, dict) else None
            if isinstance(arguments, str):
                try:
                    arguments = json.loads(arguments)
                except json.JSONDecodeError:
                    arguments = None
            ok = isinstance(function, dict) and isinstance(function.get("name"), str) and isinstance(arguments, dict)
            calls.append(ToolCall(function["name"], arguments) if ok else None)
        return calls

    def result_text(self, text: str) -> str:
        """A result's content as its turn holds it."""
        return text if self.native else f"<tool_response>{text}</tool_response>"
