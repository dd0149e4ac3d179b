"""Reading items to rate from JSONL(.gz) or CSV files (``lm-gym feedback import``).

A row holds a ``prompt`` (text, or a list of ``{"role", "content"}`` messages; ``messages`` is accepted as
the field name too) and either a ``response`` (rated +1/-1) or a ``response_a`` and ``response_b``
(compared). Optional fields: ``model_a``/``model_b`` (arena models, never shown to raters), ``gold`` (the
known answer: +1/-1, or for a pair ``"a"``/``"b"``/``"tie"``). Unknown fields are an error, so a typo
never loses a column silently.
"""

from __future__ import annotations

from lm_gym.data.prompts import validate_prompt
from lm_gym.data.records import DataError, Records, field_of, load_records
from lm_gym.feedback.store import NewItem

FIELDS = {"prompt", "messages", "response", "response_a", "response_b", "model_a", "model_b", "gold"}
PAIR_GOLD = {"a": 1.0, "b": -1.0, "tie": 0.0}


def read_items(source, on_error: str = "raise") -> Records:
    """The items in ``source`` (a path, or a list of dicts), as :class:`NewItem` with a ``.report``.

    :param on_error: ``"raise"`` stops at the first malformed row with its file, line and field;
        ``"skip"`` skips such rows and counts them in ``result.report``.
    """

    def parse(name: str, line: int, row) -> NewItem:
        if not isinstance(row, dict):
            raise DataError(f"{name}, line {line}: expected an object, got {type(row).__name__}")
        unknown = set(row) - FIELDS
        if unknown:
            raise DataError(f"{name}, line {line}: unknown fields {sorted(unknown)}; expected among {sorted(FIELDS)}")
        prompt = _prompt(name, line, row)
        pair = "response_a" in row or "response_b" in row
        if pair == ("response" in row):
            raise DataError(f"{name}, line {line}: give either 'response' or both 'response_a' and 'response_b'")
        if not pair:
            return NewItem(prompt, field_of(name, line, row, "response"), gold=_gold(name, line, row, False),
                           source=name)
        return NewItem(prompt, field_of(name, line, row, "response_a"), field_of(name, line, row, "response_b"),
                       model_a=_optional(name, line, row, "model_a"), model_b=_optional(name, line, row, "model_b"),
                       gold=_gold(name, line, row, True), source=name)

    return load_records(source, parse, on_error)


def _prompt(name: str, line: int, row: dict):
    key = "prompt" if "prompt" in row else "messages"
    if key not in row:
        raise DataError(f"{name}, line {line}: missing field 'prompt' (fields: {sorted(row)})")
    try:
        return validate_prompt(row[key], f"{name}, line {line}: field {key!r}")
    except (TypeError, ValueError) as err:
        raise DataError(str(err)) from err


def _optional(name: str, line: int, row: dict, column: str) -> str | None:
    return field_of(name, line, row, column) if row.get(column) not in (None, "") else None


def _gold(name: str, line: int, row: dict, pair: bool) -> float | None:
    raw = row.get("gold")
    if raw in (None, ""):
        return None
    if pair:
        if raw not in PAIR_GOLD:
            raise DataError(f"{name}, line {line}: field 'gold' = {raw!r}; a pair's gold is 'a', 'b' or 'tie'")
        return PAIR_GOLD[raw]
    if str(raw) in ("1", "+1", "1.0", "-1", "-1.0") and not isinstance(raw, bool):
        return float(raw)
    raise DataError(f"{name}, line {line}: field 'gold' = {raw!r}; a response's gold is 1 or -1")
