"""Human feedback: rated responses (``FeedbackExample``) and preference pairs (``PreferencePair``)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from importlib import resources
from typing import Any

from lm_gym.data.records import DataError, Records, SkipRow, field_of, load_records

ASSISTANT_TURN = "\n\nAssistant:"


@dataclass(frozen=True)
class FeedbackExample:
    """A response to a prompt rated by a person: ``feedback`` in [-1, 1] (+1 good, -1 bad, graded allowed)."""

    prompt: str
    response: str
    feedback: float


@dataclass(frozen=True)
class PreferencePair:
    """Two responses to one prompt, ``chosen`` preferred by a person over ``rejected``."""

    prompt: str
    chosen: str
    rejected: str


def load_feedback(
    source: Any,
    *,
    prompt_column: str = "prompt",
    response_column: str = "response",
    feedback_column: str = "feedback",
    allow_empty_response: bool = False,
    on_error: str = "raise",
) -> Records:
    """Read rated responses from JSONL(.gz), CSV, a list of dicts or a ``datasets.Dataset``.

    :param on_error: ``"raise"``: a malformed row raises :class:`DataError` naming the source, line and
        field (invalid JSON, missing column, empty text, feedback not a number or outside [-1, 1]);
        ``"skip"``: such rows are skipped, counted in ``result.report`` and announced by a warning.
    :return: a list of :class:`FeedbackExample` with a ``.report``.
    """

    def parse(name: str, line: int, row: Any) -> FeedbackExample:
        prompt = field_of(name, line, row, prompt_column)
        response = field_of(name, line, row, response_column, allow_empty=allow_empty_response)
        return FeedbackExample(prompt, response, _feedback_value(name, line, row, feedback_column))

    return load_records(source, parse, on_error)


def _feedback_value(name: str, line: int, row: dict, column: str) -> float:
    if column not in row or row[column] in (None, ""):
        raise DataError(f"{name}, line {line}: missing field {column!r} (fields: {sorted(row)})")
    raw = row[column]
    try:
        value = float(raw) if not isinstance(raw, bool) else math.nan
    except (TypeError, ValueError):
        value = math.nan
    if math.isnan(value):
        raise DataError(f"{name}, line {line}: field {column!r} must be a number in [-1, 1], got {raw!r}")
    if not -1.0 <= value <= 1.0:
        raise DataError(f"{name}, line {line}: field {column!r} = {value} is outside [-1, 1]")
    return value


def load_preferences(
    source: Any,
    *,
    prompt_column: str = "prompt",
    chosen_column: str = "chosen",
    rejected_column: str = "rejected",
    on_error: str = "raise",
) -> Records:
    """Read preference pairs: explicit ``{prompt, chosen, rejected}`` rows, or HH-RLHF transcripts.

    A row without a prompt column is read as an HH-RLHF transcript pair: ``chosen`` and ``rejected`` are
    whole dialogues (``"\\n\\nHuman: ...\\n\\nAssistant: ..."``) that must share everything up to and
    including the last ``"\\n\\nAssistant:"``; that shared part is the prompt and the rest are the responses
    (leading whitespace removed). A row whose two transcripts differ before that point raises (or is
    skipped as malformed).

    Rules, each counted in ``result.report.skipped`` and announced by a warning: a pair whose two responses
    are identical (``"identical responses"``: no preference to learn) and a pair with an empty response
    (``"empty response"``) are dropped.
    """

    def parse(name: str, line: int, row: Any) -> PreferencePair:
        if isinstance(row, dict) and prompt_column not in row:
            prompt, chosen, rejected = _split_transcripts(
                name, line, field_of(name, line, row, chosen_column), field_of(name, line, row, rejected_column)
            )
        else:
            prompt = field_of(name, line, row, prompt_column)
            chosen = field_of(name, line, row, chosen_column, allow_empty=True)
            rejected = field_of(name, line, row, rejected_column, allow_empty=True)
        if not chosen.strip() or not rejected.strip():
            raise SkipRow("empty response")
        if chosen.strip() == rejected.strip():
            raise SkipRow("identical responses")
        return PreferencePair(prompt, chosen, rejected)

    return load_records(source, parse, on_error)


def _split_transcripts(name: str, line: int, chosen: str, rejected: str) -> tuple[str, str, str]:
    cut = chosen.rfind(ASSISTANT_TURN)
    if cut < 0:
        raise DataError(f"{name}, line {line}: field 'chosen' has no {ASSISTANT_TURN.strip()!r} turn")
    prompt = chosen[: cut + len(ASSISTANT_TURN)]
    if not rejected.startswith(prompt) or ASSISTANT_TURN in rejected[len(prompt) :]:
        raise DataError(
            f"{name}, line {line}: fields 'chosen' and 'rejected' do not share the dialogue up to the last "
            f"{ASSISTANT_TURN.strip()!r} turn (mismatched prompts)"
        )
    return prompt, chosen[len(prompt) :].lstrip(), rejected[len(prompt) :].lstrip()


def pairs_to_feedback(pairs: list[PreferencePair]) -> list[FeedbackExample]:
    """Each pair as two rated responses: chosen +1, rejected -1."""
    examples = []
    for pair in pairs:
        examples.append(FeedbackExample(pair.prompt, pair.chosen, 1.0))
        examples.append(FeedbackExample(pair.prompt, pair.rejected, -1.0))
    return examples


def transcript_to_messages(transcript: str) -> list[dict]:
    """An HH-RLHF prompt (``"\\n\\nHuman: ...\\n\\nAssistant: ...\\n\\nAssistant:"``) as chat messages."""
    messages = []
    for chunk in transcript.split("\n\n"):
        for prefix, role in (("Human:", "user"), ("Assistant:", "assistant")):
            if chunk.startswith(prefix):
                messages.append({"role": role, "content": chunk[len(prefix) :].strip()})
                break
        else:
            if messages and chunk:
                messages[-1]["content"] += "\n\n" + chunk
    if messages and messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
        messages.pop()
    return messages


def chat_prompt(prompt):
    """An HH-RLHF transcript prompt (``"\\n\\nHuman: ..."``) as chat messages; any other prompt unchanged."""
    if isinstance(prompt, str) and prompt.lstrip("\n").startswith("Human:"):
        return transcript_to_messages("\n\n" + prompt.lstrip("\n"))
    return prompt


def default_feedback() -> Records:
    """The shipped feedback set: 360 rated responses (a good and a bad one) to 180 of the default prompts."""
    with resources.as_file(resources.files("lm_gym.data").joinpath("feedback.jsonl")) as path:
        return load_feedback(path)
