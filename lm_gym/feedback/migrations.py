"""Schema migrations of the feedback database: one step from each version to the next, run in order on start.

A step is a function of an alembic :class:`~alembic.operations.Operations` (used programmatically, without
an alembic folder) that turns a database of version N into version N + 1, and it names the tables and
columns it touches itself (lightweight ``table()`` constructs, frozen as they were at that version), never
the current models: the models describe only the newest version. A new database is created at
:data:`~lm_gym.feedback.schema.SCHEMA_VERSION` directly, from the models.

To change the schema: edit the models in :mod:`lm_gym.feedback.schema`, bump ``SCHEMA_VERSION``, and append
the step that makes the same change to an existing database to :data:`STEPS`.
"""

from __future__ import annotations

from collections.abc import Callable

from alembic.migration import MigrationContext
from alembic.operations import Operations
from sqlalchemy import Column, String, column, func, select, table
from sqlalchemy.engine import Connection


def _v1_to_v2(op: Operations) -> None:
    """Version 2: ``items.signal_key``, unique, holds the content hash of an item that signals added, so two
    concurrent signals for a new (prompt, response) add one item. Of the signal items a version-1 database
    may hold twice (that race), the oldest gets the key; the others stay as they are."""
    op.add_column("items", Column("signal_key", String(64), nullable=True))
    items = table("items", column("id"), column("kind"), column("source"), column("content_hash"),
                  column("signal_key"))
    oldest = (select(func.min(items.c.id)).where(items.c.source == "signal", items.c.kind == "single")
              .group_by(items.c.content_hash).scalar_subquery())
    op.execute(items.update().where(items.c.id.in_(oldest)).values(signal_key=items.c.content_hash))
    op.create_index("items_by_signal_key", "items", ["signal_key"], unique=True)


STEPS: list[Callable[[Operations], None]] = [_v1_to_v2]  # STEPS[i] upgrades version i + 1 to i + 2


def upgrade(connection: Connection, version: int, target: int) -> None:
    """Run the steps from ``version`` to ``target`` on ``connection`` (inside the caller's transaction)."""
    if not 1 <= version <= target <= len(STEPS) + 1:
        raise ValueError(f"no migration path from schema version {version} to {target}")
    operations = Operations(MigrationContext.configure(connection))
    for step in STEPS[version - 1:target - 1]:
        step(operations)
