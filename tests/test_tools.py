"""Tools: schemas from plain callables, calls checked and run with a time limit, the default call format."""

import time

import pytest

from lm_gym import EnvConfig
from lm_gym.tool_format import parse_default_calls, tools_instructions
from lm_gym.tools import ToolCall, Toolbox


def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: the first addend
        b: the second addend
    """
    return a + b


def divide(a: float, b: float) -> float:
    """Divide a by b.

    Args:
        a: the dividend
        b: the divisor
    """
    return a / b


def nap(seconds: float) -> str:
    """Sleep, then say so.

    Args:
        seconds: how long to sleep
    """
    time.sleep(seconds)
    return "awake"


def test_schemas_come_from_the_hints_and_docstrings():
    toolbox = Toolbox([add, divide])
    assert toolbox.names == ["add", "divide"]
    function = toolbox.schemas[0]["function"]
    assert function["description"] == "Add two integers."
    assert function["parameters"]["properties"]["a"] == {"type": "integer", "description": "the first addend"}
    assert function["parameters"]["required"] == ["a", "b"]


def test_a_call_runs_and_its_value_comes_back_as_text():
    result = Toolbox([add]).run(ToolCall("add", {"a": 2, "b": 40}))
    assert result.text == "42" and result.error is None and result.seconds >= 0


@pytest.mark.parametrize("call, error, says", [
    (ToolCall("subtract", {"a": 1}), "unknown_tool", "unknown tool 'subtract'"),
    (ToolCall("add", {"a": 1}), "invalid_arguments", "'b' is a required property"),
    (ToolCall("add", {"a": "one", "b": 2}), "invalid_arguments", "'one' is not of type 'integer'"),
    (ToolCall("divide", {"a": 1, "b": 0}), "exception", "ZeroDivisionError"),
])
def test_failures_become_error_results_that_say_what_was_wrong(call, error, says):
    result = Toolbox([add, divide]).run(call)
    assert result.error == error and says in result.text


def test_a_call_past_the_time_limit_is_a_timeout():
    result = Toolbox([nap], timeout=0.05).run(ToolCall("nap", {"seconds": 0.5}))
    assert result.error == "timeout" and "0.05 s" in result.text and result.seconds < 0.4


def test_bad_tools_are_refused_clearly():
    with pytest.raises(ValueError, match="at least one"):
        Toolbox([])
    with pytest.raises(TypeError, match="not callable"):
        Toolbox([42])
    with pytest.raises(ValueError, match="cannot be described"):
        Toolbox([lambda x: x])  # no hints, no docstring
    with pytest.raises(ValueError, match="unique"):
        Toolbox([add, add])


def test_env_settings_take_a_list_of_tools_and_say_so_when_given_one_alone():
    with pytest.raises(TypeError, match=r"one tool: tools=\[add\]"):
        EnvConfig(tools=add)
    with pytest.raises(TypeError, match="not a list of callables"):
        EnvConfig(tools="add")
    assert EnvConfig(tools=(add,)).multi_turn is not None


def test_default_format_parses_calls_and_flags_malformed_ones():
    text = ('First <tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call> then '
            '<tool_call>{"name": "add", "arguments": [1]}</tool_call> and <tool_call>not json</tool_call> '
            'and <tool_call>{"name": "add", "arguments": {}}')  # the last is never closed
    assert parse_default_calls(text) == [ToolCall("add", {"a": 1, "b": 2}), None, None, None]
    assert parse_default_calls("The answer is 3.") == []
    assert parse_default_calls("eval(<tool_call>{\"name\": \"__import__\"}</tool_call>)") == [
        ToolCall("__import__", {})]  # a name is only ever looked up among the tools given


def test_default_format_instructions_list_every_schema():
    toolbox = Toolbox([add, divide])
    text = tools_instructions(toolbox.schemas)
    assert '"name": "add"' in text and '"name": "divide"' in text and "<tool_call>" in text
