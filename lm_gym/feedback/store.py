"""The feedback store: items, raters, ratings and signals on SQLite or PostgreSQL through SQLAlchemy.

One class, :class:`FeedbackStore`, owns the engine and every read and write; the web app, the CLI, the
exports and the live reward all go through it. Writes are idempotent: a request carrying an idempotency
key that was already stored returns the stored row instead of writing a second one.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import create_engine, event, func, insert, inspect, select, update
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from lm_gym.feedback.migrations import upgrade
from lm_gym.feedback.schema import (ITEM_KINDS, ROLES, SCHEMA_VERSION, SIGNALS, Base, Item, Meta, Rater, Rating, Signal,
                                    utc_now)


class StoreError(ValueError):
    """A request the store refuses; ``status`` is the HTTP status the web app answers with."""

    status = 400


class NotFound(StoreError):
    status = 404


class Conflict(StoreError):
    status = 409


@dataclass(frozen=True)
class NewItem:
    """An item to add: a prompt (text or chat messages) with one response, or two for a comparison.

    :param prompt: the prompt: a string or a list of ``{"role", "content"}`` messages.
    :param response_a: the response to rate (or the left one of a pair).
    :param response_b: the right response of a pair; ``None`` for a single response.
    :param model_a: which model wrote ``response_a`` (hidden from raters).
    :param model_b: which model wrote ``response_b``.
    :param sampling: the sampling settings that produced the responses (stored as JSON).
    :param gold: the known answer of a gold item: +1/-1 for a single response, +1/-1/0 (A/B/tie) for a pair.
    :param source: where the item came from (a file, ``sample``, ``signal``).
    """

    prompt: str | list
    response_a: str
    response_b: str | None = None
    model_a: str | None = None
    model_b: str | None = None
    sampling: dict | None = None
    gold: float | None = None
    source: str = ""

    @property
    def kind(self) -> str:
        return "single" if self.response_b is None else "pair"


@dataclass(frozen=True)
class JudgementRequest:
    """One judgement to store (the arguments of :meth:`FeedbackStore.record`)."""

    rater_id: int
    item_id: int
    kind: str
    value: float | None
    comment: str = ""
    seconds: float | None = None
    idempotency_key: str | None = None


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def content_hash(prompt, response_a: str, response_b: str | None) -> str:
    return hashlib.sha256(json.dumps([prompt, response_a, response_b]).encode()).hexdigest()


def default_url(directory: str | Path) -> str:
    """The embedded SQLite database ``feedback.db`` under ``directory`` (created if missing)."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(path / 'feedback.db').resolve()}"


def make_engine(url: str) -> Engine:
    """An engine for ``url``. SQLite gets WAL mode, a busy timeout and foreign keys, and opens transactions
    itself: ``BEGIN IMMEDIATE`` on an engine with the execution option ``sqlite_begin="IMMEDIATE"`` (for
    writers: a deferred transaction that reads and then writes fails at once under concurrent writers
    instead of waiting for the lock), a plain deferred ``BEGIN`` otherwise (readers run alongside)."""
    if not url.startswith("sqlite"):
        return create_engine(url, pool_size=8, max_overflow=0, pool_recycle=3600)
    engine = create_engine(url, pool_size=4, max_overflow=0, connect_args={"timeout": 30})

    @event.listens_for(engine, "connect")
    def _configure(dbapi_connection, _record):
        dbapi_connection.isolation_level = None  # the begin hook below opens transactions itself
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across process crashes
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(connection):
        connection.exec_driver_sql(f"BEGIN {connection.get_execution_options().get('sqlite_begin', 'DEFERRED')}")

    return engine


class FeedbackStore:
    """The feedback database at ``url``, created at :data:`SCHEMA_VERSION` or migrated to it on opening.

    :param url: a SQLAlchemy URL: ``sqlite:///path/feedback.db`` or ``postgresql+psycopg://user@host/db``.
    :raises StoreError: when the database holds a newer schema version than this code knows.
    """

    def __init__(self, url: str):
        self.url = url
        self.engine = make_engine(url)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)
        self.write_engine = self.engine.execution_options(sqlite_begin="IMMEDIATE")
        self.writes = sessionmaker(self.write_engine, expire_on_commit=False)
        self._raters: dict[str, Rater] = {}  # token hash -> rater: tokens never change
        self._item_kinds: dict[int, str] = {}
        self._insert_rating = _insert_ignoring_conflicts(self.engine)
        self.secret = self._migrate()

    def _migrate(self) -> str:
        """Create a new database at :data:`SCHEMA_VERSION`, or upgrade an older one step by step
        (:mod:`lm_gym.feedback.migrations`), in one transaction; keep the form-signing secret; return it."""
        with self.write_engine.begin() as connection:
            version = _stored_version(connection)
            if version is None:
                Base.metadata.create_all(connection)
                connection.execute(insert(Meta).values(key="schema_version", value=str(SCHEMA_VERSION)))
            elif version > SCHEMA_VERSION:
                raise StoreError(f"{self.engine.url.render_as_string()} has feedback schema version {version}, "
                                 f"newer than the version {SCHEMA_VERSION} this lm-gym knows: a newer lm-gym "
                                 "wrote it; upgrade lm-gym to use it (or use another database)")
            elif version < SCHEMA_VERSION:
                upgrade(connection, version, SCHEMA_VERSION)
                connection.execute(update(Meta).where(Meta.key == "schema_version").values(value=str(SCHEMA_VERSION)))
            secret = connection.scalar(select(Meta.value).where(Meta.key == "secret"))
            if secret is None:
                secret = secrets.token_hex(32)
                connection.execute(insert(Meta).values(key="secret", value=secret))
            return secret

    def schema_version(self) -> int:
        """The schema version recorded in the database."""
        with self.sessions() as session:
            return int(session.get(Meta, "schema_version").value)

    def set_admin_token(self, token: str) -> None:
        """Make ``token`` the admin token (only its SHA-256 is stored), replacing any earlier one."""
        if len(token) < 16:
            raise StoreError(f"the admin token must be at least 16 characters, got {len(token)}")
        with self.writes.begin() as session:
            session.merge(Meta(key="admin_token_hash", value=hash_token(token)))

    def admin_token_hash(self) -> str | None:
        """The SHA-256 of the admin token, or None while the database has none."""
        with self.sessions() as session:
            row = session.get(Meta, "admin_token_hash")
            return None if row is None else row.value

    def close(self) -> None:
        """Close every pooled connection."""
        self.engine.dispose()

    # raters and applications

    def invite(self, name: str, role: str = "rater") -> tuple[int, str]:
        """Add a rater (or an application with ``role="app"``); return its id and its secret token, which
        is shown once and stored only as a hash.

        :param name: a name for the admin pages (1 to 200 characters).
        :param role: ``"rater"`` (rates on the web pages and the API) or ``"app"`` (posts signals).
        """
        if role not in ROLES:
            raise StoreError(f"role={role!r}; expected one of {list(ROLES)}")
        if not name.strip() or len(name) > 200:
            raise StoreError(f"a rater's name must be 1 to 200 characters, got {len(name)}")
        token = secrets.token_urlsafe(24)
        with self.writes.begin() as session:
            rater = Rater(name=name, role=role, token_hash=hash_token(token))
            session.add(rater)
            session.flush()
            return rater.id, token

    def authenticate(self, token: str | None, role: str) -> Rater | None:
        """The rater (or application) whose token this is and whose role is ``role``; None otherwise."""
        if not token:
            return None
        key = hash_token(token)
        rater = self._raters.get(key)
        if rater is None:
            with self.sessions() as session:
                rater = session.scalar(select(Rater).where(Rater.token_hash == key))
            if rater is not None:
                self._raters[key] = rater
        return rater if rater is not None and rater.role == role else None

    def raters(self) -> list[Rater]:
        """Every rater and application, oldest first."""
        with self.sessions() as session:
            return list(session.scalars(select(Rater).order_by(Rater.id)))

    # items

    def add_items(self, items: list[NewItem]) -> list[int]:
        """Store ``items`` in one transaction; return their ids."""
        rows = [_item_row(item) for item in items]
        with self.writes.begin() as session:
            session.add_all(rows)
            session.flush()
            return [row.id for row in rows]

    def item(self, item_id: int) -> Item:
        """The item with this id, or :class:`NotFound`."""
        with self.sessions() as session:
            item = session.get(Item, item_id)
        if item is None:
            raise NotFound(f"no item with id {item_id}")
        return item

    def _item_kind(self, item_id: int) -> str:
        """The item's kind (remembered: items never change), or :class:`NotFound`."""
        kind = self._item_kinds.get(item_id)
        if kind is None:
            kind = self._item_kinds[item_id] = self.item(item_id).kind
        return kind

    def items(self, ids=None) -> list[Item]:
        """Every item (or those with the given ``ids``), oldest first."""
        query = select(Item).order_by(Item.id)
        if ids is not None:
            query = query.where(Item.id.in_(list(ids)))
        with self.sessions() as session:
            return list(session.scalars(query))

    def next_item(self, rater_id: int, ratings_per_item: int) -> Item | None:
        """The next item for this rater: one they have not judged (or skipped), among those with fewer than
        ``ratings_per_item`` judgements, the least judged first (then the oldest); None when none is left."""
        query, judgements = _open_items(select(Item), rater_id, ratings_per_item)
        with self.sessions() as session:
            return session.scalar(query.order_by(judgements, Item.id).limit(1))

    def progress(self, rater_id: int, ratings_per_item: int) -> tuple[int, int]:
        """(items this rater has judged or skipped, items still open to them)."""
        left, _ = _open_items(select(func.count(Item.id)), rater_id, ratings_per_item)
        with self.sessions() as session:
            done = session.scalar(select(func.count(Rating.id)).where(Rating.rater_id == rater_id))
            return done, session.scalar(left)

    # ratings and signals

    def record(self, rater_id: int, item_id: int, kind: str, value: float | None, comment: str = "",
               seconds: float | None = None, idempotency_key: str | None = None) -> tuple[Rating, bool]:
        """Store one judgement; return ``(rating, created)``: ``created`` is False when ``idempotency_key``
        was already used by this rater for the same judgement (the stored one is returned).

        :param kind: ``"single"`` (``value`` +1/-1), ``"pair"`` (+1 A, -1 B, 0 tie) or ``"skip"`` (None).
        :raises NotFound: no such item. :raises StoreError: the item is of the other kind.
        :raises Conflict: the rater already judged the item, or reused the key for another judgement.
        """
        (outcome,) = self.record_many([JudgementRequest(rater_id, item_id, kind, value, comment, seconds,
                                                        idempotency_key)])
        if isinstance(outcome, StoreError):
            raise outcome
        return outcome

    def record_many(self, requests: list[JudgementRequest]) -> list[tuple[Rating, bool] | StoreError]:
        """Store several judgements in one transaction (one INSERT, one commit); return each one's outcome:
        what :meth:`record` returns for it, or the :class:`StoreError` it raises. A refused judgement does
        not hold the others back."""
        rows: list[dict | StoreError] = []
        for request in requests:
            try:
                rows.append(self._rating_row(request))
            except StoreError as err:
                rows.append(err)
        inserted = self._insert_new_ratings([row for row in rows if isinstance(row, dict)])
        return [self._outcome(row, inserted) for row in rows]

    def _outcome(self, row: dict | StoreError, inserted: dict[tuple, list[int]]) -> tuple[Rating, bool] | StoreError:
        if isinstance(row, StoreError):
            return row
        ids = inserted.get(_signature(row))
        return (Rating(id=ids.pop(0), **row), True) if ids else self._after_conflict(row)

    def _rating_row(self, request: JudgementRequest) -> dict:
        """The ``ratings`` row of a judgement that fits its item, or the :class:`StoreError` saying why not."""
        check_text("comment", request.comment)
        item_kind = self._item_kind(request.item_id)
        if request.kind != "skip" and item_kind != request.kind:
            expected = "a rating (+1/-1)" if item_kind == "single" else "a comparison (a/b/tie)"
            raise StoreError(f"item {request.item_id} holds {'one response' if item_kind == 'single' else 'two responses'}; "
                             f"it takes {expected}")
        return {"item_id": request.item_id, "rater_id": request.rater_id, "value": request.value,
                "comment": request.comment, "seconds": request.seconds, "idempotency_key": request.idempotency_key,
                "created_at": utc_now()}

    def _insert_new_ratings(self, rows: list[dict]) -> dict[tuple, list[int]]:
        """Insert the rows, skipping those a unique key refuses (a retry or a second judgement: sorted out
        afterwards); return the ids of the inserted ones by :func:`_signature`."""
        if not rows:
            return {}
        inserted: dict[tuple, list[int]] = {}
        with self.write_engine.begin() as connection:  # insert first: a retry is rare, and the unique keys catch it
            for rating_id, *signature in connection.execute(self._insert_rating, rows):
                inserted.setdefault(tuple(signature), []).append(rating_id)
        return inserted

    def _after_conflict(self, row: dict) -> tuple[Rating, bool] | Conflict:
        """A retry whose key was stored first (the stored rating), or a second judgement of the item."""
        rater_id, item_id, key = row["rater_id"], row["item_id"], row["idempotency_key"]
        if key is not None:
            with self.sessions() as session:
                stored = _stored_rating(session, rater_id, key)
            if stored is not None:
                return _same_request(stored, item_id, row["value"], row["comment"])
        return Conflict(f"rater {rater_id} has already judged item {item_id}; each rater judges an item once")

    def record_signal(self, app_id: int, prompt, response: str, signal: str, user_ref: str = "",
                      idempotency_key: str | None = None) -> tuple[Signal, bool]:
        """Store an interaction signal for (prompt, response), adding the item when it is new; return
        ``(signal, created)`` like :meth:`record`."""
        if signal not in SIGNALS:
            raise StoreError(f"signal={signal!r}; expected one of {list(SIGNALS)}")
        check_text("user", user_ref)
        with self.writes() as session:
            if idempotency_key is not None:
                stored = _stored_signal(session, app_id, idempotency_key)
                if stored is not None:
                    return stored, False
            item_id = _item_for(session, prompt, response)
            row = Signal(item_id=item_id, app_id=app_id, signal=signal, user_ref=user_ref,
                         idempotency_key=idempotency_key)
            session.add(row)
            try:
                session.commit()
            except IntegrityError:
                session.rollback()
                stored = None if idempotency_key is None else _stored_signal(session, app_id, idempotency_key)
                if stored is None:
                    raise
                return stored, False  # a concurrent retry stored the same key first
            return row, True

    def ratings(self, after_id: int = 0) -> list[Rating]:
        """Every judgement with an id above ``after_id``, oldest first."""
        with self.sessions() as session:
            return list(session.scalars(select(Rating).where(Rating.id > after_id).order_by(Rating.id)))

    def signals(self, after_id: int = 0) -> list[Signal]:
        """Every interaction signal with an id above ``after_id``, oldest first."""
        with self.sessions() as session:
            return list(session.scalars(select(Signal).where(Signal.id > after_id).order_by(Signal.id)))

    def count(self, table) -> int:
        """The number of rows of ``Rating``, ``Signal``, ``Item`` or ``Rater``."""
        with self.sessions() as session:
            return session.scalar(select(func.count()).select_from(table))


def check_text(field: str, text: str | None) -> None:
    """Refuse text the databases cannot hold: PostgreSQL stores no NUL character."""
    if text is not None and "\x00" in text:
        raise StoreError(f"{field} contains a NUL character (\\u0000), which the database cannot store; "
                         "remove or replace it")


def _open_items(query, rater_id: int, ratings_per_item: int):
    """``query`` over the items open to a rater (not judged or skipped by them, fewer than
    ``ratings_per_item`` judgements), and the column of each item's judgement count."""
    counts = (select(Rating.item_id, func.count(Rating.id).label("n")).where(Rating.value.is_not(None))
              .group_by(Rating.item_id).subquery())
    judgements = func.coalesce(counts.c.n, 0)
    judged = select(Rating.item_id).where(Rating.rater_id == rater_id)
    open_items = (query.select_from(Item).outerjoin(counts, counts.c.item_id == Item.id)
                  .where(Item.id.not_in(judged), judgements < ratings_per_item))
    return open_items, judgements


def _item_row(item: NewItem) -> Item:
    if item.kind not in ITEM_KINDS:
        raise StoreError(f"item kind {item.kind!r}; expected one of {list(ITEM_KINDS)}")
    prompt = json.dumps(item.prompt)  # JSON escapes a NUL character, so any prompt is storable
    for name, text in (("response_a", item.response_a), ("response_b", item.response_b),
                       ("model_a", item.model_a), ("model_b", item.model_b)):
        check_text(name, text)
    return Item(kind=item.kind, prompt=prompt, response_a=item.response_a,
                response_b=item.response_b, model_a=item.model_a, model_b=item.model_b,
                sampling=None if item.sampling is None else json.dumps(item.sampling), gold=item.gold,
                source=item.source[:500], content_hash=content_hash(item.prompt, item.response_a, item.response_b))


def _item_for(session: Session, prompt, response: str) -> int:
    """The id of the single-response item for (prompt, response), added if there is none. Two concurrent
    signals for a new one both try to add it: the unique ``signal_key`` lets one in, and the other, whose
    insert fails (inside a savepoint, so its transaction goes on), reads the winner's item."""
    key = content_hash(prompt, response, None)
    found = session.scalar(select(Item.id).where(Item.content_hash == key, Item.kind == "single")
                           .order_by(Item.id).limit(1))
    if found is not None:
        return found
    row = _item_row(NewItem(prompt, response, source="signal"))
    row.signal_key = key
    try:
        with session.begin_nested():
            session.add(row)
    except IntegrityError:
        return session.scalar(select(Item.id).where(Item.signal_key == key))
    return row.id


def _stored_version(connection: Connection) -> int | None:
    """The schema version a database records; None for a new database (no ``meta`` table)."""
    if not inspect(connection).has_table("meta"):
        return None
    return int(connection.scalar(select(Meta.value).where(Meta.key == "schema_version")))


def _stored_rating(session: Session, rater_id: int, key: str) -> Rating | None:
    return session.scalar(select(Rating).where(Rating.rater_id == rater_id, Rating.idempotency_key == key))


def _stored_signal(session: Session, app_id: int, key: str) -> Signal | None:
    return session.scalar(select(Signal).where(Signal.app_id == app_id, Signal.idempotency_key == key))


def _same_request(stored: Rating, item_id: int, value, comment: str) -> tuple[Rating, bool] | Conflict:
    """``(stored, False)`` for a retried key, or a :class:`Conflict` when the key came with another request."""
    if (stored.item_id, stored.value, stored.comment) != (item_id, value, comment):
        return Conflict(f"Idempotency-Key was already used for another judgement (item {stored.item_id}); "
                        "send a new key for a new judgement")
    return stored, False


SIGNATURE = ("rater_id", "item_id", "idempotency_key", "value", "comment")  # what tells two judgements apart


def _signature(row: dict) -> tuple:
    return tuple(row[name] for name in SIGNATURE)


def _insert_ignoring_conflicts(engine: Engine):
    """``INSERT INTO ratings ... ON CONFLICT DO NOTHING RETURNING id, <SIGNATURE>`` in the engine's dialect."""
    dialect_insert = sqlite_insert if engine.dialect.name == "sqlite" else postgresql_insert
    table = Rating.__table__
    return dialect_insert(table).on_conflict_do_nothing().returning(table.c.id, *(table.c[n] for n in SIGNATURE))
