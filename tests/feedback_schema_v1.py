"""The feedback database as lm-gym wrote it at schema version 1, frozen: the migration tests build an old
database from these tables and fill it with rows, then open it with the current code.

Do not edit: this is the old schema, not the current one (that is :mod:`lm_gym.feedback.schema`).
"""

from sqlalchemy import Column, DateTime, Float, ForeignKey, Index, Integer, MetaData, String, Table, Text, UniqueConstraint

V1 = MetaData()

meta = Table("meta", V1, Column("key", String(64), primary_key=True), Column("value", Text, nullable=False))

raters = Table(
    "raters", V1,
    Column("id", Integer, primary_key=True),
    Column("name", String(200), nullable=False),
    Column("role", String(16), nullable=False),
    Column("token_hash", String(64), nullable=False, unique=True),
    Column("created_at", DateTime, nullable=False),
)

items = Table(
    "items", V1,
    Column("id", Integer, primary_key=True),
    Column("kind", String(16), nullable=False),
    Column("prompt", Text, nullable=False),
    Column("response_a", Text, nullable=False),
    Column("response_b", Text),
    Column("model_a", String(500)),
    Column("model_b", String(500)),
    Column("sampling", Text),
    Column("gold", Float),
    Column("source", String(500), nullable=False),
    Column("content_hash", String(64), nullable=False, index=True),
    Column("created_at", DateTime, nullable=False),
)

ratings = Table(
    "ratings", V1,
    Column("id", Integer, primary_key=True),
    Column("item_id", ForeignKey("items.id"), nullable=False, index=True),
    Column("rater_id", ForeignKey("raters.id"), nullable=False, index=True),
    Column("value", Float),
    Column("comment", Text, nullable=False),
    Column("seconds", Float),
    Column("idempotency_key", String(200)),
    Column("created_at", DateTime, nullable=False),
    UniqueConstraint("item_id", "rater_id", name="one_judgement_per_rater"),
    UniqueConstraint("rater_id", "idempotency_key", name="rating_idempotency"),
)

signals = Table(
    "signals", V1,
    Column("id", Integer, primary_key=True),
    Column("item_id", ForeignKey("items.id"), nullable=False),
    Column("app_id", ForeignKey("raters.id"), nullable=False),
    Column("signal", String(16), nullable=False),
    Column("user_ref", String(200), nullable=False),
    Column("idempotency_key", String(200)),
    Column("created_at", DateTime, nullable=False),
    UniqueConstraint("app_id", "idempotency_key", name="signal_idempotency"),
    Index("signals_by_item", "item_id"),
)
