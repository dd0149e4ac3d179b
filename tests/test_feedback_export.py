"""Exports read back by the project's own loaders, each filter's report, and the CLI from import to export."""

import json

import datasets
import pytest

from agents.cli import main
from lm_gym.data import chat_prompt, load_feedback, load_preferences
from lm_gym.feedback.export import ExportFilters, export, feedback_rows, prompt_for_export
from lm_gym.feedback.store import FeedbackStore, NewItem


def judge(store, raters, item, kind, values):
    for rater, value in zip(raters, values):
        store.record(rater, item, kind, value)


@pytest.fixture
def rated(feedback_store):
    """Three raters; items with known votes."""
    s = feedback_store
    raters = [s.invite(name)[0] for name in ("ann", "bob", "cat")]
    chat = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hello?"}]
    ids = s.add_items([NewItem("Q1", "good answer"), NewItem(chat, "hi there"), NewItem("Q3", "tied"),
                       NewItem("Q1", "good answer"), NewItem("Q5", "x", "y"), NewItem("Q6", "same", "other")])
    judge(s, raters, ids[0], "single", [1, 1, -1])       # majority +1, mean 1/3
    judge(s, raters, ids[1], "single", [-1, -1, -1])
    judge(s, raters[:2], ids[2], "single", [1, -1])      # tie
    judge(s, raters[:1], ids[3], "single", [1])          # duplicate of ids[0], one vote
    judge(s, raters, ids[4], "pair", [-1, -1, 0])        # B better
    judge(s, raters, ids[5], "pair", [0, 0, 1])          # majority tie
    return s, raters, ids


def test_feedback_export_reads_back_with_load_feedback(rated, tmp_path):
    store, _, _ = rated
    (report,) = export(store, "feedback", tmp_path / "f.jsonl")
    loaded = load_feedback(tmp_path / "f.jsonl")
    assert [(r.prompt, r.response, r.feedback) for r in loaded] == [
        ("Q1", "good answer", 1.0), ("\n\nHuman: Be kind.\n\nHello?\n\nAssistant:", "hi there", -1.0)]
    assert chat_prompt(loaded[1].prompt) == [{"role": "user", "content": "Be kind.\n\nHello?"}]
    assert report.items == 6 and report.written == 2
    assert report.dropped == {"pair items (this format holds single items; export those with --format preferences)": 2,
                              "items whose votes tie (no majority)": 1, "exact duplicates of an earlier row": 1}


def test_preferences_export_reads_back_with_load_preferences(rated, tmp_path):
    store, _, _ = rated
    (report,) = export(store, "preferences", tmp_path / "p.jsonl")
    pairs = load_preferences(tmp_path / "p.jsonl")
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [("Q5", "y", "x")]
    assert report.dropped == {"single items (this format holds pair items; export those with --format feedback)": 4,
                              "pairs judged a tie (no preference)": 1}


def test_mean_aggregation_min_ratings_and_kept_duplicates(rated):
    store, _, _ = rated
    rows, report = feedback_rows(store, ExportFilters(aggregate="mean", min_ratings=2, dedupe=False))
    assert [(r["response"], r["feedback"]) for r in rows] == [
        ("good answer", pytest.approx(1 / 3)), ("hi there", -1.0), ("tied", 0.0)]
    assert report.dropped["items with fewer than 2 votes"] == 1


def test_rater_filters_report_the_raters_and_judgements_they_drop(rated):
    store, raters, ids = rated
    # cat disagrees with the others' majority on every item they share a majority on
    rows, report = feedback_rows(store, ExportFilters(min_agreement=0.5))
    assert report.dropped[f"judgements by raters below agreement 0.5 (raters {raters[2]})"] == 4
    assert [r["feedback"] for r in rows] == [1.0, -1.0]
    gold_store_item = store.add_items([NewItem("G", "gold", gold=1.0)])[0]
    judge(store, raters, gold_store_item, "single", [1, -1, -1])
    _, report = feedback_rows(store, ExportFilters(min_gold_accuracy=1.0))
    assert report.dropped[f"judgements by raters below gold accuracy 1.0 (raters {raters[1]}, {raters[2]})"] == 11


def test_signals_count_as_votes_and_clicks_are_reported(feedback_store):
    app = feedback_store.invite("shop", role="app")[0]
    for signal in ("like", "like", "dislike", "click"):
        feedback_store.record_signal(app, "Hi", "Hello", signal)
    rows, report = feedback_rows(feedback_store)
    assert rows == [{"prompt": "Hi", "response": "Hello", "feedback": 1.0}]
    assert report.dropped == {"click signals (carry no rating)": 1}
    rows, report = feedback_rows(feedback_store, ExportFilters(signals=False))
    assert rows == [] and report.dropped["like/dislike signals (signals=False)"] == 3


def test_dataset_export_loads_with_datasets_and_load_feedback(rated, tmp_path):
    store, _, _ = rated
    reports = export(store, "dataset", tmp_path / "ds")
    loaded = datasets.load_from_disk(str(tmp_path / "ds"))
    assert loaded["feedback"].num_rows == 2 and loaded["preferences"].num_rows == 1
    assert [r.feedback for r in load_feedback(loaded["feedback"])] == [1.0, -1.0]
    assert [p.chosen for p in load_preferences(loaded["preferences"])] == ["y"]
    assert [r.format for r in reports] == ["feedback", "preferences"]


def test_filters_refuse_bad_settings():
    with pytest.raises(ValueError, match="aggregate='median'"):
        ExportFilters(aggregate="median")
    with pytest.raises(ValueError, match="min_agreement must be in"):
        ExportFilters(min_agreement=1.5)
    with pytest.raises(ValueError, match="min_ratings must be >= 1"):
        ExportFilters(min_ratings=0)


def test_prompt_for_export_of_a_dialogue():
    dialogue = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": "Joke?"}]
    text = prompt_for_export(json.dumps(dialogue))
    assert text == "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Joke?\n\nAssistant:"
    assert chat_prompt(text) == dialogue


def test_cli_import_invite_export_stats(tmp_path, capsys):
    rows = [{"prompt": "Hi", "response": "Hello"}, {"messages": [{"role": "user", "content": "Q"}],
            "response_a": "a", "response_b": "b", "model_a": "m1", "model_b": "m2", "gold": "a"}]
    source = tmp_path / "items.jsonl"
    source.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    db = ["--dir", str(tmp_path / "db")]
    assert main(["feedback", "import", str(source), *db]) == 0
    assert "imported 2 items (1 responses, 1 pairs)" in capsys.readouterr().out
    assert main(["feedback", "invite", "ann", "--url", "http://rate.example:9000", *db]) == 0
    link = capsys.readouterr().out.strip().rsplit(" ", 1)[1]
    assert link.startswith("http://rate.example:9000/r/")
    store = FeedbackStore(f"sqlite:///{tmp_path / 'db' / 'feedback.db'}")
    rater = store.authenticate(link.rsplit("/", 1)[1], "rater")
    store.record(rater.id, 1, "single", 1.0, seconds=4.0)
    store.record(rater.id, 2, "pair", 1.0)
    assert main(["feedback", "export", str(tmp_path / "f.jsonl"), "--format", "feedback", *db]) == 0
    out = capsys.readouterr().out
    assert "feedback: 1 rows from 2 items; dropped 1 pair items" in out
    assert load_feedback(tmp_path / "f.jsonl")[0].feedback == 1.0
    assert main(["feedback", "stats", *db]) == 0
    out = capsys.readouterr().out
    assert "2 items, 2 judgements, 0 signals, 1 gold items" in out and "ann: 2 judgements" in out
    assert "gold accuracy 1.00, median 4.00 s/item" in out
    assert "arena m1: win rate 1.00" in out


def test_cli_import_reports_the_bad_line(tmp_path, capsys):
    source = tmp_path / "bad.jsonl"
    source.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a", "answer": "b"}\n')
    assert main(["feedback", "import", str(source), "--dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "line 2: unknown fields ['answer']" in err
    assert FeedbackStore(f"sqlite:///{tmp_path / 'feedback.db'}").items() == []
