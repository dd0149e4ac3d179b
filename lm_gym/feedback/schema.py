"""The feedback database's tables (SQLAlchemy 2.x declarative models) and its schema version.

- ``meta``: key/value settings of the database: ``schema_version``, the ``secret`` that signs form tokens and
  the SHA-256 of the admin token (``admin_token_hash``).
- ``raters``: invited people (role ``rater``) and deployed applications (role ``app``); only the SHA-256 of
  each secret token is stored.
- ``items``: a prompt with one response (``kind="single"``, rated +1/-1) or two (``kind="pair"``, compared);
  ``gold`` holds a known answer for gold items; ``sampling`` the settings that produced the responses;
  ``signal_key`` (unique) the content hash of an item that interaction signals added.
- ``ratings``: one judgement of one item by one rater (unique per rater and item): ``value`` is +1/-1 for a
  rating, +1 (A better), -1 (B better) or 0 (tie) for a comparison, NULL for a skip.
- ``signals``: like/dislike/click events that a deployed application reports for a (prompt, response).
"""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import Float, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

SCHEMA_VERSION = 2  # lm_gym.feedback.migrations upgrades older databases
ROLES = ("rater", "app")
ITEM_KINDS = ("single", "pair")
SIGNALS = ("like", "dislike", "click")


def utc_now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


class Meta(Base):
    __tablename__ = "meta"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class Rater(Base):
    __tablename__ = "raters"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    role: Mapped[str] = mapped_column(String(16), default="rater")
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utc_now)


class Item(Base):
    __tablename__ = "items"
    __table_args__ = (Index("items_by_signal_key", "signal_key", unique=True),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    prompt: Mapped[str] = mapped_column(Text)  # JSON: a string or a list of chat messages
    response_a: Mapped[str] = mapped_column(Text)
    response_b: Mapped[str | None] = mapped_column(Text, default=None)
    model_a: Mapped[str | None] = mapped_column(String(500), default=None)
    model_b: Mapped[str | None] = mapped_column(String(500), default=None)
    sampling: Mapped[str | None] = mapped_column(Text, default=None)  # JSON of the sampling settings
    gold: Mapped[float | None] = mapped_column(Float, default=None)
    source: Mapped[str] = mapped_column(String(500), default="")
    content_hash: Mapped[str] = mapped_column(String(64), index=True)
    created_at: Mapped[datetime] = mapped_column(default=utc_now)
    signal_key: Mapped[str | None] = mapped_column(String(64), default=None)


class Rating(Base):
    __tablename__ = "ratings"
    __table_args__ = (
        UniqueConstraint("item_id", "rater_id", name="one_judgement_per_rater"),
        UniqueConstraint("rater_id", "idempotency_key", name="rating_idempotency"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id"), index=True)
    rater_id: Mapped[int] = mapped_column(ForeignKey("raters.id"), index=True)
    value: Mapped[float | None] = mapped_column(Float, default=None)
    comment: Mapped[str] = mapped_column(Text, default="")
    seconds: Mapped[float | None] = mapped_column(Float, default=None)
    idempotency_key: Mapped[str | None] = mapped_column(String(200), default=None)
    created_at: Mapped[datetime] = mapped_column(default=utc_now)


class Signal(Base):
    __tablename__ = "signals"
    __table_args__ = (
        UniqueConstraint("app_id", "idempotency_key", name="signal_idempotency"),
        Index("signals_by_item", "item_id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id"))
    app_id: Mapped[int] = mapped_column(ForeignKey("raters.id"))
    signal: Mapped[str] = mapped_column(String(16))
    user_ref: Mapped[str] = mapped_column(String(200), default="")
    idempotency_key: Mapped[str | None] = mapped_column(String(200), default=None)
    created_at: Mapped[datetime] = mapped_column(default=utc_now)
