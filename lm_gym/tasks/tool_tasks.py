"""A task to be solved with a tool: multi-digit arithmetic, which a small model gets wrong on its own, and a
``calculator`` tool that gets it right.

The env gives the task's tools to the agent (:class:`lm_gym.parties.ToolParty`): a turn with a tool call gets
the result back, and the final answer, the last number of the first turn without a call, is checked exactly.
"""

from __future__ import annotations

import ast
import json
import operator

from lm_gym.tasks.builtin import Arithmetic

MAX_DIGITS = 40  # the calculator refuses operands and results longer than this
OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression exactly.

    Args:
        expression: numbers joined by +, -, * and /, with parentheses, for example "347 * (12 + 5)"
    """
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as err:
        raise ValueError(f"not an arithmetic expression: {expression!r}") from err
    value = _evaluate(tree.body)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value)


def _evaluate(node):
    """The value of an expression tree of numbers and + - * / (anything else raises): no text is run as code."""
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _evaluate(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and type(node.op) in OPERATORS:
        value = OPERATORS[type(node.op)](_evaluate(node.left), _evaluate(node.right))
        if abs(value) >= 10**MAX_DIGITS:
            raise ValueError(f"the result has more than {MAX_DIGITS} digits")
        return value
    raise ValueError(f"only numbers, + - * / and parentheses are allowed, not {ast.dump(node)[:40]}")


class CalculatorArithmetic(Arithmetic):
    """"What is 347 * 829?" with a ``calculator`` tool: ``digits`` operand sizes (default 3 by 3).

    The prompt ends with the call to write (``spell_call``, the default): SmolLM2-135M-Instruct never calls a
    tool from its schema and instructions alone (0 of 64 sampled episodes), but copies a call it is shown
    in 94% of greedy episodes; what it must learn is to write the call, end its turn, and answer with the
    result. With ``spell_call=False`` the prompt only asks for the tool.
    """

    tools = (calculator,)
    instruction = "Use the calculator tool, then answer with a number."

    def __init__(self, operation: str = "*", digits: tuple[int, int] = (3, 3), seed: int = 0, spell_call: bool = True):
        super().__init__(operation, digits, seed, "calculator")
        self.spell_call = spell_call

    def prompt(self, expression: str) -> str:
        if not self.spell_call:
            return super().prompt(expression)
        call = json.dumps({"name": "calculator", "arguments": {"expression": expression}})
        return f"What is {expression}? To use the calculator, write <tool_call>{call}</tool_call>"
