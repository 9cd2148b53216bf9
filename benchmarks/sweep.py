"""Benchmark the SLA sweep and the digest on a seeded database (not a test).

Seeds N open tickets (default 100,000) whose single stage is due at instants spread over the next
90 days, with deadlines, reminder points and ``notify_at`` exactly as intake stores them, then
times:

* a sweep with nothing to send (goal: under 50 ms),
* a sweep that queues 1,000 reminders into the outbox (goal: under 1 s),
* building a digest (goal: under 1 s, at 100,000 open tickets too),

each with its CPU time (this process's: on a shared machine the wall time grows with other
people's load), and measures the peak Python memory of each with tracemalloc, which should not
grow with N. Time and memory are taken in separate runs: tracemalloc triples the CPU time of
allocation-heavy code such as composing mail. The reminders' memory is that of the next 1,000.

    .venv/bin/python benchmarks/sweep.py                     # N = 10,000 and 100,000 (SQLite)
    .venv/bin/python benchmarks/sweep.py --tickets 10000     # one size
    .venv/bin/python benchmarks/sweep.py --database-url postgresql+psycopg://postgres@127.0.0.1/bench

Exit status 0 when every goal is met, 1 otherwise. Nothing but the database is touched; the
temporary SQLite folder is removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
import tracemalloc
from datetime import datetime, timedelta, timezone
from pathlib import Path

from sqlalchemy import insert, select

from intake.config.settings import load_settings
from intake.sla import deadlines, digest, reminders
from intake.sla.engine import StageDeadline
from intake.store import schema
from intake.store.db import make_engine, write_session
from intake.store.models import Deadline, Ticket

ROOT = Path(__file__).resolve().parent.parent
NOW = datetime(2026, 6, 1, 12, 0, tzinfo=timezone.utc)
STAGE_DAYS = 90
SEED_BATCH = 5_000
REMINDERS = 1_000
GOALS = {"empty_sweep_ms": 50.0, "reminder_sweep_s": 1.0, "digest_s": 1.0}
SCHEDULER = {"INTAKE_SCHEDULER__QUIET_HOURS": "false", "INTAKE_SCHEDULER__MISFIRE_GRACE": "86400",
             "INTAKE_SCHEDULER__DIGESTS": json.dumps({"bench": {"cron": "0 8 * * *", "timezone": "Europe/Berlin"}})}
CONFIG = """
[[maintainers]]
name = "Bench"
email = "bench@example.com"

[policies.bench]
calendar = "utc"
auto_ack_counts = true
remind = ["50%", "80%", "24 hours before"]

[[policies.bench.stages]]
name = "resolve"
duration = "90 days"
"""


def seed(engine, settings, count: int) -> None:  # type: ignore[no-untyped-def]
    """*count* open tickets received over the last 90 days (due over the next 90), each stage's
    ``notify_at`` at its next reminder point after NOW, as a sweep at NOW leaves it."""
    rng = random.Random(5)
    policy = settings.policies["bench"]
    for first in range(0, count, SEED_BATCH):  # bounded: count / SEED_BATCH batches
        numbers = range(first, min(first + SEED_BATCH, count))
        received = [NOW - timedelta(seconds=rng.randrange(STAGE_DAYS * 86400)) for _ in numbers]
        with write_session(engine, durable=False) as session:
            ids = session.scalars(insert(Ticket.__table__).returning(Ticket.__table__.c.id), [dict(
                reference=f"SEC-2026-{n + 1:06d}", subject=f"Report {n}", reporter=f"r{n}@researcher.test",
                reporter_name="", intake_address="security@example.com", state=("new", "acknowledged", "waiting")[n % 3],
                severity=(None, "high", "low")[n % 3], policy="bench", labels=[], links=[], quality={},
                received_at=at, created_at=at, updated_at=at) for n, at in zip(numbers, received)]).all()
            rows = []
            for ticket_id, at in zip(ids, received):
                due = at + timedelta(days=STAGE_DAYS)
                points = [point for _, point in deadlines.reminder_times(
                    policy, "resolve", settings.all_calendars, start=at, due=due, severity=None) if point > NOW]
                row = deadlines.rows(settings, "bench", None, [(StageDeadline("resolve", due, "90 days", at, False),
                                                                None)], NOW)[0]
                rows.append({**row, "ticket_id": ticket_id, "notify_at": min(points, default=due)})
            session.execute(insert(Deadline.__table__), rows)


def timed(function):  # type: ignore[no-untyped-def]
    """(wall seconds, CPU seconds of this process, result) of one call."""
    started, cpu = time.perf_counter(), time.process_time()
    result = function()
    return time.perf_counter() - started, time.process_time() - cpu, result


def peak(function):  # type: ignore[no-untyped-def]
    """(peak MiB of Python allocations, result) of one call."""
    tracemalloc.start()
    try:
        result = function()
        return tracemalloc.get_traced_memory()[1] / 2**20, result
    finally:
        tracemalloc.stop()


def next_points(engine) -> datetime:  # type: ignore[no-untyped-def]
    """The instant by which exactly REMINDERS more reminder points are due."""
    with engine.connect() as connection:
        return connection.scalar(select(Deadline.notify_at).order_by(Deadline.notify_at).offset(REMINDERS - 1)
                                 .limit(1))


def run(count: int, database_url: str | None, folder: Path) -> dict[str, float]:
    config = folder / "config.toml"
    config.write_text((ROOT / "config.toml").read_text() + CONFIG)
    os.environ.update(SCHEDULER, INTAKE_DATABASE__URL=database_url or f"sqlite:///{folder / f'bench-{count}.db'}")
    settings = load_settings(config)
    engine = make_engine(settings.database_url)
    schema.upgrade(engine)
    started = time.perf_counter()
    seed(engine, settings, count)
    print(f"seeded {count} tickets in {time.perf_counter() - started:.1f} s", file=sys.stderr)

    reminders.sweep(engine, settings, NOW)  # warm caches (zones, statements)
    empty_s = min(timed(lambda: reminders.sweep(engine, settings, NOW))[0] for _ in range(5))
    empty_mb, _ = peak(lambda: reminders.sweep(engine, settings, NOW))
    then = next_points(engine)
    busy_s, busy_cpu, result = timed(lambda: reminders.sweep(engine, settings, then))
    busy_mb, _ = peak(lambda: reminders.sweep(engine, settings, next_points(engine)))
    # The first build: its statements are compiled, as in a digest job once a day.
    digest_s, digest_cpu, _ = timed(lambda: digest.build(engine, settings, "bench", then))
    digest_mb, _ = peak(lambda: digest.build(engine, settings, "bench", then))
    engine.dispose()
    return {"tickets": count, "empty_sweep_ms": empty_s * 1000, "empty_sweep_peak_mib": empty_mb,
            "reminder_sweep_s": busy_s, "reminder_sweep_cpu_s": busy_cpu, "reminders_queued": len(result.mails),
            "reminder_sweep_peak_mib": busy_mb, "digest_s": digest_s, "digest_cpu_s": digest_cpu,
            "digest_peak_mib": digest_mb}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tickets", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--database-url", default=None, help="a fresh database (default: temporary SQLite files)")
    parser.add_argument("--json", action="store_true")
    arguments = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        results = [run(count, arguments.database_url, Path(folder)) for count in arguments.tickets]
    ok = all(r[goal] < limit for r in results for goal, limit in GOALS.items())
    if arguments.json:
        print(json.dumps({"results": results, "goals": GOALS, "ok": ok}, indent=2))
    else:
        for r in results:
            print(f"{r['tickets']:>7} tickets: empty sweep {r['empty_sweep_ms']:.1f} ms "
                  f"(peak {r['empty_sweep_peak_mib']:.2f} MiB); {r['reminders_queued']} reminders in "
                  f"{r['reminder_sweep_s']:.2f} s, CPU {r['reminder_sweep_cpu_s']:.2f} s (peak "
                  f"{r['reminder_sweep_peak_mib']:.1f} MiB); digest {r['digest_s']:.2f} s, CPU {r['digest_cpu_s']:.2f} s "
                  f"(peak {r['digest_peak_mib']:.2f} MiB)")
        print("goals met" if ok else "a goal was missed")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
