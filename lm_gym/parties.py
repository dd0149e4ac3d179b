"""The other party of a multi-turn episode: who answers the agent between its turns.

Without one, the env's own LM answers (:class:`lm_gym.config.MultiTurn`'s dialogue mode). An
:class:`OtherParty` answers in text instead: :class:`ToolParty` runs the tool calls of the agent's turn,
:mod:`lm_gym.integrations.textarena` plays a game. The env encodes each answer as a turn of the party's
``role`` and inserts its ids after the agent's tokens, which it never re-encodes.

Rewards per turn: an :class:`Answer` gives the agent turn's reward, or None to have the env's reward score
the turn's text. The return is the sum of the turns' rewards, whatever number of turns the policy chose to
take (no per-turn normalisation).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from lm_gym.tool_format import ToolFormat, call_example
from lm_gym.tools import ToolResult, Toolbox


@dataclass(frozen=True)
class Answer:
    """The other party's answer to one agent turn.

    :param text: the party's next turn, or None: the episode ends with the agent's turn.
    :param reward: the agent turn's reward; None: the env's reward scores the turn's text.
    :param terminated: with ``text=None``, whether the episode ended by its own rules (else it was cut short).
    :param record: what the env's ``info["turns"]`` keeps of the exchange (tool calls and results, for example).
    """

    text: str | None
    reward: float | None = None
    terminated: bool = True
    record: dict = field(default_factory=dict)


class OtherParty:
    """The protocol of a party that answers in text (see the module docstring); one instance serves every
    row of an env, by row index.

    ``role`` is the chat role of its turns. :meth:`system_text` and :meth:`template_tools` shape the prompt.
    ``turn_end_text``, when set, ends an agent turn as soon as its text ends with it (a tool call's closing
    tag), as a stop token does.
    """

    role = "user"
    turn_end_text: str | None = None

    def bind(self, tokenizer, use_chat_template: bool) -> None:
        """Called once by the env with its tokenizer, before any episode."""

    def start(self, row: int, rng: np.random.Generator):
        """A new episode begins in ``row``: return its prompt, or None to have the env draw one."""
        return None

    def answer(self, rows: Sequence[int], texts: Sequence[str], last: Sequence[bool]) -> list[Answer]:
        """Answer the agent turns ``texts`` that just ended in ``rows``; ``last[i]``: the agent may take no
        further turn (the env ends the episode whatever the answer)."""
        raise NotImplementedError

    def system_text(self) -> str | None:
        """Text for the prompt's system message (None: nothing)."""
        return None

    def template_tools(self) -> list[dict] | None:
        """What the chat template's ``tools=`` gets (None: nothing)."""
        return None

    def close(self) -> None:
        """Release what the party holds (sessions, connections); the env calls it when it is closed."""


class ToolParty(OtherParty):
    """Tools as the other party: an agent turn ends when it completes a tool call (or at a stop token) and
    gets the results of its calls back (reward 0, the episode goes on); a turn without any is the final
    answer, which ends the episode and which the env's reward scores.

    :param toolbox: the tools (:class:`lm_gym.tools.Toolbox`).
    :param max_calls: calls per episode; those past it are not run, and their result says so.
    """

    role = "tool"

    def __init__(self, toolbox: Toolbox, max_calls: int = 8):
        if max_calls < 1:
            raise ValueError(f"max_calls must be positive, got {max_calls}")
        self.toolbox, self.max_calls = toolbox, max_calls
        self.format: ToolFormat | None = None
        self.calls: dict[int, int] = {}

    def bind(self, tokenizer, use_chat_template: bool) -> None:
        self.format = ToolFormat(tokenizer, self.toolbox.schemas, use_chat_template)
        self.turn_end_text = self.format.call_end

    def start(self, row: int, rng: np.random.Generator):
        self.calls[row] = 0
        return None

    def answer(self, rows: Sequence[int], texts: Sequence[str], last: Sequence[bool]) -> list[Answer]:
        return [self._answer(row, text, final) for row, text, final in zip(rows, texts, last)]

    def _answer(self, row: int, text: str, last: bool) -> Answer:
        calls = self.format.parse(text)
        if not calls or last:
            return Answer(None, None, terminated=not calls, record=self._record(calls, []))
        results = [self._run(row, call) for call in calls]
        content = "\n".join(self.format.result_text(result.text) for result in results)
        return Answer(content, 0.0, record=self._record(calls, results))

    def _run(self, row: int, call) -> ToolResult:
        if call is None:
            return ToolResult(None, f"error: malformed tool call; write {call_example(self.toolbox.schemas)}",
                              "malformed")
        self.calls[row] = self.calls.get(row, 0) + 1
        if self.calls[row] > self.max_calls:
            return ToolResult(call, f"error: no more than {self.max_calls} tool calls per episode", "call_limit")
        return self.toolbox.run(call)

    @staticmethod
    def _record(calls: list, results: list[ToolResult]) -> dict:
        records = [result.record() for result in results]
        errors = Counter(result.error for result in results if result.error)
        return {"tool_calls": records, "tool_errors": dict(errors), "unrun_calls": len(calls) - len(results)}

    def system_text(self) -> str | None:
        return self.format.system_text()

    def template_tools(self) -> list[dict] | None:
        return self.format.template_tools()


def make_party(config) -> OtherParty | None:
    """The other party an :class:`lm_gym.EnvConfig` asks for: its ``other_party``, a :class:`ToolParty` over
    its ``tools``, or None (the env's LM answers, in multi-turn mode)."""
    if config.other_party is not None:
        if not isinstance(config.other_party, OtherParty):
            raise TypeError(f"other_party={config.other_party!r:.80} is not an lm_gym.parties.OtherParty")
        return config.other_party
    if config.tools is None:
        return None
    settings = config.multi_turn
    toolbox = config.tools if isinstance(config.tools, Toolbox) else Toolbox(list(config.tools), settings.tool_timeout)
    return ToolParty(toolbox, settings.max_tool_calls)
