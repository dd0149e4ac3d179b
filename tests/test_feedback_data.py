"""Feedback and preference loaders: formats, column names, errors with line numbers, the HH-RLHF sample."""

import gzip
import json
from pathlib import Path

import datasets
import pytest

from lm_gym.data import (
    DataError,
    DataWarning,
    FeedbackExample,
    PreferencePair,
    default_feedback,
    default_prompts,
    load_feedback,
    load_preferences,
    pairs_to_feedback,
    transcript_to_messages,
)

HH_SAMPLE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "hh-rlhf" / "harmless-base-dev.jsonl.gz"


def write_jsonl(path, rows):
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def test_jsonl_csv_and_dataset_with_custom_columns(tmp_path):
    rows = [{"q": "Hi?", "a": "Hello!", "score": 1}, {"q": "Hi?", "a": "Go away.", "score": -0.5}]
    expected = [FeedbackExample("Hi?", "Hello!", 1.0), FeedbackExample("Hi?", "Go away.", -0.5)]
    columns = dict(prompt_column="q", response_column="a", feedback_column="score")
    assert load_feedback(write_jsonl(tmp_path / "f.jsonl", rows), **columns) == expected
    csv_path = tmp_path / "f.csv"
    csv_path.write_text("q,a,score\nHi?,Hello!,1\nHi?,Go away.,-0.5\n")
    assert load_feedback(csv_path, **columns) == expected
    assert load_feedback(datasets.Dataset.from_list(rows), **columns) == expected
    gz = tmp_path / "f.jsonl.gz"
    gz.write_bytes(gzip.compress((tmp_path / "f.jsonl").read_bytes()))
    assert load_feedback(gz, **columns) == expected


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ('{"prompt": "x", "response": ', r"line 2: invalid JSON"),
        ({"prompt": "x", "feedback": 1}, r"line 2: missing field 'response'"),
        ({"prompt": "x", "response": "y", "feedback": 2}, r"line 2: field 'feedback' = 2.0 is outside \[-1, 1\]"),
        ({"prompt": "x", "response": "y", "feedback": "good"}, r"line 2: field 'feedback' must be a number"),
        ({"prompt": "x", "response": "  ", "feedback": 1}, r"line 2: field 'response' is empty"),
        ({"prompt": 3, "response": "y", "feedback": 1}, r"line 2: field 'prompt' must be text"),
    ],
)
def test_malformed_feedback_names_file_line_and_field(tmp_path, bad_line, message):
    path = write_jsonl(tmp_path / "feedback.jsonl", [{"prompt": "x", "response": "y", "feedback": 1}, bad_line])
    with pytest.raises(DataError, match=f"feedback.jsonl, {message}"):
        load_feedback(path)


def test_skipping_bad_rows_reports_them(tmp_path):
    good = {"prompt": "x", "response": "y", "feedback": 1}
    path = write_jsonl(tmp_path / "f.jsonl", [good, "{oops", good, {"prompt": "x", "response": "y", "feedback": 9}])
    with pytest.warns(DataWarning, match=r"read 4 rows, kept 2; skipped .*lines 2\b.*lines 4\b"):
        loaded = load_feedback(path, on_error="skip")
    assert len(loaded) == 2 and loaded.report.rows_read == 4
    assert sum(len(lines) for lines in loaded.report.skipped.values()) == 2
    with pytest.raises(ValueError, match="on_error"):
        load_feedback(path, on_error="ignore")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_feedback(tmp_path / "nope.jsonl")


def test_explicit_preference_pairs_and_rules(tmp_path):
    rows = [
        {"prompt": "Q1", "chosen": "good", "rejected": "bad"},
        {"prompt": "Q2", "chosen": "same", "rejected": "same"},
        {"prompt": "Q3", "chosen": "", "rejected": "bad"},
    ]
    with pytest.warns(DataWarning, match="identical responses.*empty response"):
        pairs = load_preferences(write_jsonl(tmp_path / "p.jsonl", rows))
    assert pairs == [PreferencePair("Q1", "good", "bad")]
    assert pairs.report.skipped == {"identical responses": [2], "empty response": [3]}
    assert pairs_to_feedback(pairs) == [FeedbackExample("Q1", "good", 1.0), FeedbackExample("Q1", "bad", -1.0)]


def test_hh_transcripts_split_at_the_last_assistant_turn(tmp_path):
    shared = "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Tell me a joke.\n\nAssistant:"
    rows = [{"chosen": shared + " A pun.", "rejected": shared + " No."},
            {"chosen": "\n\nHuman: A\n\nAssistant: x", "rejected": "\n\nHuman: B\n\nAssistant: y"}]
    path = write_jsonl(tmp_path / "hh.jsonl", rows)
    with pytest.raises(DataError, match=r"hh.jsonl, line 2: .*mismatched prompts"):
        load_preferences(path)
    with pytest.warns(DataWarning):
        pairs = load_preferences(path, on_error="skip")
    assert pairs == [PreferencePair(shared, "A pun.", "No.")]
    assert transcript_to_messages(shared) == [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Tell me a joke."},
    ]


@pytest.mark.skipif(not HH_SAMPLE.is_file(), reason=f"the HH-RLHF sample is not at {HH_SAMPLE}")
def test_hh_rlhf_sample():
    with pytest.warns(DataWarning, match="empty response"):
        pairs = load_preferences(HH_SAMPLE)
    report = pairs.report
    assert report.rows_read == 1000
    skipped = {reason: len(lines) for reason, lines in report.skipped.items()}
    assert report.kept + sum(skipped.values()) == 1000 and len(pairs) == report.kept
    assert set(skipped) <= {"empty response", "identical responses"}
    raw = [json.loads(line) for line in gzip.open(HH_SAMPLE, "rt")]
    for pair in pairs[:50]:
        assert pair.prompt.endswith("\n\nAssistant:") and pair.prompt.startswith("\n\nHuman:")
        assert "\n\nAssistant:" not in pair.chosen and "\n\nAssistant:" not in pair.rejected
    assert raw[0]["chosen"].startswith(pairs[0].prompt) and raw[0]["chosen"].endswith(pairs[0].chosen)
    assert len(pairs_to_feedback(pairs)) == 2 * len(pairs)


def test_shipped_feedback_set():
    feedback = default_feedback()
    prompts = set(default_prompts())
    assert len(feedback) >= 300
    assert {item.feedback for item in feedback} == {1.0, -1.0}
    assert all(item.prompt in prompts and item.response.strip() for item in feedback)
    assert len({item.prompt for item in feedback}) >= 150
