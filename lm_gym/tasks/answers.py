"""Reading a final answer out of a response, and comparing numbers exactly.

The answer format is part of every task's prompt. Two formats: :data:`ANSWER_FORMAT` asks for the final
answer between ``<answer>`` and ``</answer>`` (the last such span counts, :func:`extract_answer`);
:data:`NUMBER_FORMAT` asks for a number, and the last number written counts (:func:`last_number`), the
format small models follow. Numbers compare as exact rationals, so "+7", "7.0", "7/1" and "1,000" read as
the numbers they write, and words ("seven") are not numbers.
"""

from __future__ import annotations

import re
from fractions import Fraction

ANSWER_FORMAT = "Write only the final answer between <answer> and </answer>."
NUMBER_FORMAT = "Answer with a number."
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.IGNORECASE | re.DOTALL)
_NUMBER = re.compile(r"(?<![\w.])[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?(?![\w])")
_THOUSANDS = re.compile(r"^[+-]?\d{1,3}(,\d{3})+(\.\d+)?$")


def extract_answer(response: str) -> str | None:
    """The text of the last ``<answer>...</answer>`` span of ``response``, stripped; None without one."""
    spans = _ANSWER.findall(response)
    return spans[-1].strip() if spans else None


def last_number(response: str) -> str | None:
    """The last number written in ``response`` (an integer, a decimal or a fraction a/b, with an optional sign
    and thousands separators), as written; None without one."""
    numbers = _NUMBER.findall(response)
    return numbers[-1] if numbers else None


def parse_number(text: str) -> Fraction | None:
    """``text`` as an exact rational: an integer, a decimal, a fraction a/b or scientific notation, with an
    optional sign and thousands separators (``1,000``); None for anything else."""
    text = text.strip()
    if _THOUSANDS.match(text):
        text = text.replace(",", "")
    try:
        return Fraction(text)
    except (ValueError, ZeroDivisionError):
        return None


def numbers_equal(answer: str, expected) -> bool:
    """Whether ``answer`` writes the number ``expected`` (a number or its text) exactly."""
    value = parse_number(answer)
    target = expected if isinstance(expected, (int, Fraction)) else parse_number(str(expected))
    return value is not None and target is not None and value == target
