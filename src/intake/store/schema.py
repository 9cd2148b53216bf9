"""The database schema's lifecycle: Alembic migrations shipped in ``intake/store/migrations``.

Configured from intake's settings (no alembic.ini). :func:`upgrade` is what ``intake db upgrade``
and the start of ``intake serve`` run; it is safe to run from several processes at once, because
it runs under a lock and in one transaction:

* SQLite: the cross-process writer ``flock`` of :mod:`intake.store.db` (every intake writer takes it,
  so nothing writes half-way through a migration) and ``BEGIN IMMEDIATE``;
* PostgreSQL: ``pg_advisory_xact_lock``, released by the commit.

The second process waits, then finds the database at head and does nothing. DDL is
transactional on both, so a failed migration leaves the database as it was.

A database made by ``create_all`` before intake had migrations has tables but no
``alembic_version``: when its shape is that of the first revision it is stamped with it (and
then upgraded); any other unversioned schema is refused rather than guessed at.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Engine, create_engine, inspect, text
from sqlalchemy.types import TypeDecorator
from sqlmodel import SQLModel

from intake.store import db  # noqa: F401  (models: registers the tables on SQLModel.metadata)
from intake.store import models

if TYPE_CHECKING:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

# Alembic is imported where a migration is read or run, not here: every CLI command checks the
# schema (require_current), and importing Alembic for that doubled `intake tickets`' start.
VERSIONS = Path(__file__).parent / "migrations" / "versions"

# Any constant: the key of the PostgreSQL advisory lock that serialises migrations.
_PG_LOCK_KEY = 0x696E74616B65  # "intake"
_VERSION_TABLE = "alembic_version"


class SchemaRefused(Exception):
    """The database is in a state intake will not migrate (unknown schema, newer revision)."""


@dataclass(frozen=True)
class Upgraded:
    before: str | None  # revision before (None: empty database)
    after: str
    stamped: bool  # an unversioned database of the first revision's shape was adopted


def alembic_config(connection: Connection | None = None) -> Config:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", "intake.store:migrations")
    # %% because Config interpolates like ConfigParser. 0001_initial_schema.py, in order.
    config.set_main_option("file_template", "%%(rev)s_%%(slug)s")
    config.attributes["connection"] = connection
    return config


def scripts() -> ScriptDirectory:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config())


def _numbered_revisions() -> list[str]:
    """The revisions, oldest first, read from the file names: :func:`new_revision` numbers them
    0001, 0002, ... in one line (tests/test_schema.py checks this against Alembic's own history)."""
    return sorted(path.name.split("_", 1)[0] for path in VERSIONS.glob("[0-9][0-9][0-9][0-9]_*.py"))


def head() -> str:
    return _numbered_revisions()[-1]


def revisions() -> list[str]:
    """Every revision, oldest first."""
    return [s.revision for s in reversed(list(scripts().walk_revisions()))]


def render_item(type_: str, obj: Any, autogen_context: Any) -> str | bool:
    """Render intake's own column types as the SQLAlchemy type they store (UTCDateTime is
    ``sa.DateTime(timezone=True)``), so migration files import nothing from intake."""
    if type_ == "type" and isinstance(obj, TypeDecorator):
        return f"sa.{obj.impl!r}"
    return False


def current(engine: Engine) -> str | None:
    """The database's revision (None: no schema), read as Alembic stores it, without Alembic."""
    with engine.connect() as connection:
        if _VERSION_TABLE not in inspect(connection).get_table_names():
            return None
        return connection.execute(text(f"SELECT version_num FROM {_VERSION_TABLE}")).scalar()


@contextmanager
def migration_transaction(engine: Engine) -> Iterator[Connection]:
    """One transaction that holds the migration lock from its start to its commit."""
    if not db.is_sqlite(engine):
        with engine.begin() as connection:
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_LOCK_KEY})
            yield connection
        return
    with db.sqlite_writer_lock(engine, wait_forever=True), db.write_bind(engine).connect() as connection:
        # Batch mode recreates tables: foreign keys must be off or dropping the old table would
        # act on the rows that point at it. The pragma is ignored inside a transaction, so it is
        # set before BEGIN, and the result is checked with foreign_key_check before the commit.
        raw = connection.connection.driver_connection
        raw.execute("PRAGMA foreign_keys=OFF")
        try:
            with connection.begin():
                yield connection
                broken = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
                if broken:
                    raise SchemaRefused(f"the migration would leave rows with broken foreign keys: {broken[:5]}")
        finally:
            raw.execute("PRAGMA foreign_keys=ON")


def upgrade(engine: Engine, revision: str = "head") -> Upgraded:
    """Bring the database to *revision* (default: head); a no-op when it is there already."""
    if revision == "head":
        # Read without Alembic (and without the lock: a migration under way has not committed its
        # version yet): a process that only checks would otherwise keep Alembic, Mako and the
        # migrations in memory for good (the listener: ~12 MB).
        at = current(engine)
        if at is not None and at == head():
            return Upgraded(at, at, False)
    from alembic import command
    from alembic.runtime.migration import MigrationContext

    known = revisions()
    with migration_transaction(engine) as connection:
        before = MigrationContext.configure(connection).get_current_revision()
        stamped = False
        if before is None and _intake_tables(connection):
            _adopt_unversioned(connection)
            before, stamped = known[0], True
        elif before is not None and before not in known:
            raise SchemaRefused(
                f"the database is at revision {before}, which this intake does not know (made by a newer "
                f"version?); its newest is {known[-1]}. Install the version that made it, or restore a backup.")
        command.upgrade(alembic_config(connection), revision)
        after = MigrationContext.configure(connection).get_current_revision()
    return Upgraded(before, after, stamped)


def require_current(engine: Engine) -> None:
    """Raise :class:`SchemaRefused` unless the database is at head: commands other than
    ``intake serve`` and ``intake db upgrade`` never migrate."""
    at, newest = current(engine), head()
    if at == newest:
        return
    if at is None:
        raise SchemaRefused("the database has no intake schema (or one from before migrations): "
                            "run `intake db upgrade` (`intake serve` does it at start)")
    if at not in _numbered_revisions():
        raise SchemaRefused(f"the database is at revision {at}, which this intake does not know (made by a newer "
                            f"version?); this intake needs {newest}")
    raise SchemaRefused(f"the database is at revision {at}, this intake needs {newest}: run `intake db upgrade`")


# -- databases from before migrations --------------------------------------------------------


def _intake_tables(connection: Connection) -> set[str]:
    return set(inspect(connection).get_table_names()) & set(SQLModel.metadata.tables)


def _shape(connection: Connection) -> dict[str, Any]:
    """What identifies a schema across SQLite and PostgreSQL: tables, their columns and
    nullability, index names and columns, unique column sets (unique constraints are unnamed
    on SQLite, named by PostgreSQL)."""
    inspector = inspect(connection)
    shape: dict[str, Any] = {}
    for table in sorted(set(inspector.get_table_names()) - {_VERSION_TABLE}):
        shape[table] = {
            "columns": sorted((c["name"], c["nullable"]) for c in inspector.get_columns(table)),
            "indexes": sorted((i["name"], tuple(i["column_names"]), bool(i["unique"]))
                              for i in inspector.get_indexes(table) if not i.get("duplicates_constraint")),
            "unique": sorted(tuple(u["column_names"]) for u in inspector.get_unique_constraints(table)),
        }
    return shape


def _first_revision_shape() -> dict[str, Any]:
    """The shape the first revision makes, built in a scratch in-memory SQLite database."""
    from alembic import command

    scratch = create_engine("sqlite://")
    try:
        with scratch.begin() as connection:
            command.upgrade(alembic_config(connection), revisions()[0])
            return _shape(connection)
    finally:
        scratch.dispose()


def _adopt_unversioned(connection: Connection) -> None:
    from alembic import command

    expected, found = _first_revision_shape(), _shape(connection)
    if found != expected:
        differing = sorted(t for t in expected.keys() | found.keys() if expected.get(t) != found.get(t))
        raise SchemaRefused(
            "the database has intake tables but no alembic_version, and its schema is not the one "
            f"intake's first migration makes (differing tables: {', '.join(differing)}); refusing to "
            "guess. Restore a backup, or compare it by hand with `intake db check`.")
    command.stamp(alembic_config(connection), revisions()[0])


# -- models against migrations -------------------------------------------------------------


def differences(engine: Engine, metadata: Any = None) -> list[str]:
    """How the database's schema differs from the models (*metadata*, default intake's), one
    readable line each; empty when they agree. On a database at head this is "models against
    migrations": a non-empty answer means a model changed without a migration."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        diffs = compare_metadata(context, metadata if metadata is not None else SQLModel.metadata)
    return [_describe(diff) for diff in _flatten(diffs)]


def _flatten(diffs: list[Any]) -> Iterator[tuple[Any, ...]]:
    for diff in diffs:
        if isinstance(diff, list):  # column modifications come grouped per column
            yield from diff
        else:
            yield diff


def _describe(diff: tuple[Any, ...]) -> str:
    kind = diff[0]
    if kind in ("add_table", "remove_table"):
        where = "in the models only" if kind == "add_table" else "in the database only"
        return f"table {diff[1].name}: {where}"
    if kind in ("add_column", "remove_column"):
        where = "in the models only" if kind == "add_column" else "in the database only"
        return f"column {diff[2]}.{diff[3].name} ({diff[3].type}): {where}"
    if kind in ("add_index", "remove_index", "add_constraint", "remove_constraint"):
        obj = diff[1]
        columns = ", ".join(c.name for c in obj.columns)
        where = "in the models only" if kind.startswith("add") else "in the database only"
        return f"{kind.split('_')[1]} {obj.name or '(unnamed)'} on {obj.table.name}({columns}): {where}"
    if kind.startswith("modify_"):
        _, _, table, column, _, database_value, model_value = diff
        return f"column {table}.{column} {kind[7:]}: database {database_value}, models {model_value}"
    return repr(diff)


def new_revision(message: str) -> str:
    """Write the next migration into ``intake/store/migrations/versions`` (a source checkout): what the
    models have that head does not, compared in a scratch SQLite database upgraded to head.
    Returns the file's path. Read it before committing: autogenerate misses some changes
    (renames, server defaults) and cannot know how to move data."""
    from alembic import command

    existing = revisions()
    scratch = create_engine("sqlite://")
    try:
        with scratch.begin() as connection:
            config = alembic_config(connection)
            if existing:
                command.upgrade(config, "head")
            script = command.revision(config, message, autogenerate=True, rev_id=f"{len(existing) + 1:04d}")
    finally:
        scratch.dispose()
    return script.path
