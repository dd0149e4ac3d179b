"""Schema migration on SQLite and PostgreSQL: a database that lm-gym made at schema version 1 (built here from
the frozen tables of ``tests/feedback_schema_v1.py``, with rows in every table) is upgraded when a store opens
it, keeps every row, ends with exactly the schema of the current models, and goes on taking signals."""

from datetime import datetime

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, select

from lm_gym.feedback.schema import SCHEMA_VERSION, Base, Item, Rating, Signal
from lm_gym.feedback.store import FeedbackStore, content_hash, hash_token
from tests import feedback_schema_v1 as v1

RATER_TOKEN, APP_KEY = "ann-token-made-at-version-1", "shop-key-made-at-version-1"
WHEN = datetime(2026, 1, 2, 3, 4, 5)
ECHO = content_hash("Hi", "Hello!", None)  # the (prompt, response) that two racing signals added twice


def make_version_1_database(url: str) -> None:
    """A version-1 database with raters, items (one signal item stored twice, as the old race could),
    ratings and signals; the rows get ids 1, 2, ... in order, as the database numbers them."""
    engine = create_engine(url)
    v1.V1.create_all(engine)
    with engine.begin() as connection:
        connection.execute(v1.meta.insert(), [{"key": "schema_version", "value": "1"},
                                              {"key": "secret", "value": "secret-of-version-1"}])
        connection.execute(v1.raters.insert(), [
            {"name": "ann", "role": "rater", "token_hash": hash_token(RATER_TOKEN), "created_at": WHEN},
            {"name": "shop", "role": "app", "token_hash": hash_token(APP_KEY), "created_at": WHEN}])
        item = {"response_b": None, "model_a": None, "model_b": None, "sampling": None, "gold": None,
                "created_at": WHEN}
        connection.execute(v1.items.insert(), [
            {**item, "kind": "single", "prompt": '"p"', "response_a": "r", "source": "file",
             "content_hash": content_hash("p", "r", None), "gold": 1.0},
            {**item, "kind": "pair", "prompt": '"p"', "response_a": "x", "response_b": "y",
             "source": "sample", "content_hash": content_hash("p", "x", "y"), "sampling": '{"temperature": 0.7}'},
            {**item, "kind": "single", "prompt": '"Hi"', "response_a": "Hello!", "source": "signal",
             "content_hash": ECHO},
            {**item, "kind": "single", "prompt": '"Hi"', "response_a": "Hello!", "source": "signal",
             "content_hash": ECHO}])
        connection.execute(v1.ratings.insert(), [
            {"item_id": 1, "rater_id": 1, "value": 1.0, "comment": "good", "seconds": 2.5,
             "idempotency_key": "k-1", "created_at": WHEN},
            {"item_id": 2, "rater_id": 1, "value": -1.0, "comment": "", "seconds": None,
             "idempotency_key": None, "created_at": WHEN}])
        connection.execute(v1.signals.insert(), [
            {"item_id": 3, "app_id": 2, "signal": "like", "user_ref": "u1", "idempotency_key": "s-1",
             "created_at": WHEN},
            {"item_id": 4, "app_id": 2, "signal": "dislike", "user_ref": "u2", "idempotency_key": None,
             "created_at": WHEN}])
    engine.dispose()


def test_version_1_database_is_upgraded_on_start_with_its_rows_kept(store_url):
    make_version_1_database(store_url)
    store = FeedbackStore(store_url)
    assert store.schema_version() == SCHEMA_VERSION == 2
    assert store.secret == "secret-of-version-1"  # the old forms' signatures stay valid
    assert store.authenticate(RATER_TOKEN, "rater").name == "ann" and store.authenticate(APP_KEY, "app").id == 2
    assert [(i.id, i.kind, i.response_a, i.response_b, i.gold, i.sampling, i.created_at) for i in store.items()] == [
        (1, "single", "r", None, 1.0, None, WHEN), (2, "pair", "x", "y", None, '{"temperature": 0.7}', WHEN),
        (3, "single", "Hello!", None, None, None, WHEN), (4, "single", "Hello!", None, None, None, WHEN)]
    assert [(r.item_id, r.value, r.comment, r.seconds, r.idempotency_key) for r in store.ratings()] == [
        (1, 1.0, "good", 2.5, "k-1"), (2, -1.0, "", None, None)]
    assert [(s.item_id, s.signal, s.user_ref) for s in store.signals()] == [(3, "like", "u1"), (4, "dislike", "u2")]
    assert [i.signal_key for i in store.items()] == [None, None, ECHO, None]  # the oldest of the two holds the key
    again, created = store.record_signal(2, "Hi", "Hello!", "like", idempotency_key="s-1")
    assert (again.id, created) == (1, False)  # idempotency keys of version 1 still hold
    signal, _ = store.record_signal(2, "Hi", "Hello!", "click")
    assert signal.item_id == 3 and store.count(Item) == 4
    store.close()
    reopened = FeedbackStore(store_url)  # a migrated database opens as it is
    assert reopened.schema_version() == 2 and reopened.count(Rating) == 2 and reopened.count(Signal) == 3
    reopened.close()


def test_upgraded_database_has_the_schema_of_a_new_one(store_url):
    make_version_1_database(store_url)
    FeedbackStore(store_url).close()
    engine = create_engine(store_url)
    with engine.connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection), Base.metadata)
        assert differences == []  # tables, columns, types, indexes and unique constraints as the models say
        assert connection.scalar(select(v1.meta.c.value).where(v1.meta.c.key == "schema_version")) == "2"
    engine.dispose()
