"""Alembic environment for intake. There is no alembic.ini: :mod:`intake.store.schema` builds the
configuration from intake's settings and hands over a connection already inside the transaction
(and lock) the migration must run in."""

from alembic import context
from sqlmodel import SQLModel

from intake.store import models  # noqa: F401  (registers the tables on SQLModel.metadata)
from intake.store.schema import render_item

connection = context.config.attributes.get("connection")
if connection is None or context.is_offline_mode():
    raise SystemExit("intake migrations run through `intake db upgrade`, online, on intake's own connection")

context.configure(
    connection=connection,
    target_metadata=SQLModel.metadata,
    # SQLite cannot ALTER most things: batch mode recreates the table and copies the rows.
    render_as_batch=connection.dialect.name == "sqlite",
    render_item=render_item,
    compare_type=True,
)
with context.begin_transaction():  # a no-op: the caller's transaction commits or rolls back all of it
    context.run_migrations()
