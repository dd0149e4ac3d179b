"""Tools an agent may call during an episode: plain Python callables, their JSON schemas, and running a call.

A :class:`Toolbox` takes functions with type hints and a Google-style docstring (what ``transformers``' chat
templates take as ``tools=``) and describes each with :func:`transformers.utils.get_json_schema`. Running a
:class:`ToolCall` checks its arguments against the schema (``jsonschema``), runs the function on a worker
thread with a time limit, and turns every failure into a :class:`ToolResult` whose ``error`` names it, for the
episode to go on with. Only the functions given run: the model's text is parsed as JSON, never evaluated.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field

import jsonschema
from transformers.utils import get_json_schema

TOOL_ERRORS = ("malformed", "unknown_tool", "invalid_arguments", "exception", "timeout", "call_limit")


@dataclass(frozen=True)
class ToolCall:
    """A call the agent wrote: the tool's name and its arguments (a JSON object)."""

    name: str
    arguments: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ToolResult:
    """What a call gave: the text that goes back to the agent, and ``error`` (one of :data:`TOOL_ERRORS`) or None.

    ``call`` is None when the agent's text held no well-formed call (``error="malformed"``).
    """

    call: ToolCall | None
    text: str
    error: str | None = None
    seconds: float = 0.0

    def record(self) -> dict:
        """The result as an info entry: ``name``, ``arguments``, ``result``, ``error`` and ``seconds``."""
        return {"name": None if self.call is None else self.call.name,
                "arguments": None if self.call is None else dict(self.call.arguments),
                "result": self.text, "error": self.error, "seconds": self.seconds}


class Toolbox:
    """The tools of an env, by name, with their schemas.

    :param tools: callables with type hints and docstrings (``Args:`` describing each parameter); their
        ``__name__`` is the tool's name.
    :param timeout: seconds a call may run; a call still running then is reported as ``"timeout"`` (its
        thread cannot be stopped and finishes in the background, so tools should be quick and side-effect free).
    """

    def __init__(self, tools: Sequence[Callable], timeout: float = 5.0):
        if not tools:
            raise ValueError("tools must hold at least one callable")
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, got {timeout}")
        self.functions: dict[str, Callable] = {}
        self.schemas: list[dict] = []
        for tool in tools:
            if not callable(tool):
                raise TypeError(f"tool {tool!r:.60} is not callable")
            try:
                schema = get_json_schema(tool)
            except Exception as err:  # transformers' own error says what the docstring or hints lack
                raise ValueError(f"tool {getattr(tool, '__name__', tool)!r} cannot be described: {err}") from err
            name = schema["function"]["name"]
            if name in self.functions:
                raise ValueError(f"two tools are named {name!r}; tool names must be unique")
            self.functions[name] = tool
            self.schemas.append(schema)
        self.parameters = {s["function"]["name"]: s["function"].get("parameters", {"type": "object"})
                           for s in self.schemas}
        self.timeout = float(timeout)
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="lm-gym-tool")

    @property
    def names(self) -> list[str]:
        """The tools' names, in the order given."""
        return list(self.functions)

    def run(self, call: ToolCall) -> ToolResult:
        """Run ``call``: an unknown tool, arguments against the schema, an exception or a time-out give an
        error result (the message says what was wrong); else the function's return value as text."""
        started = time.perf_counter()
        if call.name not in self.functions:
            return ToolResult(call, f"error: unknown tool {call.name!r}; the tools are {self.names}", "unknown_tool")
        try:
            jsonschema.validate(call.arguments, self.parameters[call.name])
        except jsonschema.ValidationError as err:
            return ToolResult(call, f"error: invalid arguments for {call.name}: {err.message}", "invalid_arguments")
        future = self._pool.submit(self.functions[call.name], **call.arguments)
        try:
            value = future.result(timeout=self.timeout)
        except FutureTimeout:
            return ToolResult(call, f"error: {call.name} did not finish within {self.timeout:g} s", "timeout",
                              time.perf_counter() - started)
        except Exception as err:  # the tool's own failure goes back to the agent, the episode goes on
            return ToolResult(call, f"error: {call.name} raised {type(err).__name__}: {err}", "exception",
                              time.perf_counter() - started)
        return ToolResult(call, result_text(value), None, time.perf_counter() - started)


def result_text(value) -> str:
    """A tool's return value as the text the agent reads: strings as they are, anything else as JSON."""
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return str(value)
