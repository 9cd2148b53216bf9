"""What the audit chain costs per event (not a test).

Writes N events (default 1,000) to one ticket, each in its own durable write transaction as a
maintainer's command or a processed reply writes them, twice on the same fresh database: once as
before the chain (a bare insert into ``event``) and once through
:func:`intake.store.audit.add_events` (the insert, read back, plus the chain's append at commit:
on PostgreSQL its advisory lock). Then N more in one transaction each way (a processing batch).
Verification of the whole chain is timed at the end. On SQLite and, with ``--postgres-url``, on
a fresh PostgreSQL database created on that server and dropped after.

    .venv/bin/python benchmarks/audit_cost.py
    .venv/bin/python benchmarks/audit_cost.py --events 2000 --postgres-url postgresql://postgres@127.0.0.1:5432/postgres --json

Only the temporary folder (and that database) are written.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import psycopg
from sqlalchemy import Engine, insert

from intake.store import audit_verify, schema
from intake.store.db import make_engine, write_session
from intake.store.models import Event, Ticket
from intake.tickets import records
from intake.vocabulary import EventKind

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=timezone.utc)


def _ticket(engine: Engine) -> int:
    with write_session(engine) as session:
        ticket = Ticket(reference="SEC-2026-0001", subject="bench", reporter="r@researcher.test",
                        intake_address="security@example.com", policy="vaixus", received_at=NOW, created_at=NOW,
                        updated_at=NOW)
        session.add(ticket)
        session.flush()
        assert ticket.id is not None
        return ticket.id


def _bare(session, ticket_id: int, number: int) -> None:  # type: ignore[no-untyped-def]
    """The insert events had before the chain."""
    session.execute(insert(Event.__table__), records.event(ticket_id, EventKind.NOTE_ADDED, NOW, "bench", n=number))


def _chained(session, ticket_id: int, number: int) -> None:  # type: ignore[no-untyped-def]
    records.add_event(session, ticket_id, EventKind.NOTE_ADDED, NOW, actor="bench", n=number)


def _per_transaction(engine: Engine, ticket_id: int, count: int, write) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """Wall and CPU microseconds per event, each event in its own transaction."""
    wall, cpu = time.perf_counter(), time.process_time()
    for number in range(count):
        with write_session(engine) as session:
            write(session, ticket_id, number)
    return (time.perf_counter() - wall) / count * 1e6, (time.process_time() - cpu) / count * 1e6


def _one_transaction(engine: Engine, ticket_id: int, count: int, write) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """Wall and CPU microseconds per event, all in one transaction."""
    wall, cpu = time.perf_counter(), time.process_time()
    with write_session(engine) as session:
        for number in range(count):
            write(session, ticket_id, number)
    return (time.perf_counter() - wall) / count * 1e6, (time.process_time() - cpu) / count * 1e6


def measure(url: str, count: int) -> dict[str, float]:
    """Microseconds per event (wall clock and this process's CPU), bare and chained, one
    transaction each and all in one; and the milliseconds verification of the chain took."""
    engine = make_engine(url)
    try:
        schema.upgrade(engine)
        ticket_id = _ticket(engine)
        audit_verify.start(engine, NOW)
        result: dict[str, float] = {}
        for name, run in (("own_transaction", _per_transaction), ("one_transaction", _one_transaction)):
            for kind, write in (("bare", _bare), ("chained", _chained)):
                wall, cpu = run(engine, ticket_id, count, write)
                result[f"{kind}_{name}_wall_us"], result[f"{kind}_{name}_cpu_us"] = wall, cpu
        started = time.perf_counter()
        verification = audit_verify.verify(engine)
        result["verify_ms"] = (time.perf_counter() - started) * 1e3
        result["entries_verified"] = verification.entries
        # The bare inserts are, rightly, events the chain does not hold.
        assert len(verification.problems) == 2 * count
        return result
    finally:
        engine.dispose()


def _postgres(server: str, count: int) -> dict[str, float]:
    name = f"intake_bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server, autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    try:
        url = server.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1) + f"/{name}"
        return measure(url, count)
    finally:
        with psycopg.connect(server, autocommit=True) as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1000)
    parser.add_argument("--postgres-url", default=None, help="a PostgreSQL server where a database may be created")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("INTAKE_AUDIT_KEY", "b" * 44)
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        results["sqlite"] = measure(f"sqlite:///{Path(folder) / 'bench.db'}", args.events)
    if args.postgres_url:
        results["postgresql"] = _postgres(args.postgres_url, args.events)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    for database, figures in results.items():
        print(f"{database}: {args.events} events")
        for name, value in figures.items():
            print(f"  {name:<40} {value:10.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
