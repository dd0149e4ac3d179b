"""Fixtures of the feedback tests: the same store tests run on SQLite and on a real PostgreSQL server."""

import uuid

import pytest

from tests.feedback_servers import create_database, postgres_cluster


@pytest.fixture(scope="session")
def postgres_base():
    """A throwaway PostgreSQL cluster for the session; its base URL."""
    with postgres_cluster() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path):
    """A fresh, empty database: a SQLite file, or a new database on the session's PostgreSQL cluster."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'feedback.db'}"
    return create_database(request.getfixturevalue("postgres_base"), f"t{uuid.uuid4().hex[:12]}")


@pytest.fixture
def feedback_store(store_url):
    from lm_gym.feedback.store import FeedbackStore

    store = FeedbackStore(store_url)
    yield store
    store.close()
