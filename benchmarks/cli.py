"""Benchmark the command line's start and `intake tickets` on a seeded database (not a test).

Times, as a person at a shell sees them (a fresh ``intake`` process each time, wall clock, the
median of ``--runs``; the CPU time beside it, which a busy machine inflates less):

* ``intake --help`` and ``intake --version`` (goal: under 150 ms each),
* ``intake tickets`` over N tickets (default 10,000; goal: under 300 ms), the table written to a
  pipe, on a SQLite database seeded with tickets in every state, each with three stored stages.

    .venv/bin/python benchmarks/cli.py                  # N = 10,000, 7 runs each
    .venv/bin/python benchmarks/cli.py --tickets 50000 --runs 3 --json

Exit status 0 when every goal is met, 1 otherwise. Only the temporary folder is written, and it
is removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
INTAKE = Path(sys.executable).parent / "intake"
NOW = datetime.now(timezone.utc)
SEED_BATCH = 5_000
GOALS = {"help_ms": 150.0, "version_ms": 150.0, "tickets_ms": 300.0}
STAGES = (("acknowledge", 3), ("assess", 10), ("resolve", 90))
CONFIG = """
[policies.bench]
calendar = "utc"
auto_ack_counts = true
""" + "".join(f"""
[[policies.bench.stages]]
name = "{name}"
duration = "{days} days"
""" for name, days in STAGES)


def seed(database_url: str, config: Path, count: int) -> None:
    """*count* tickets received over the last 90 days: a fifth of them finished (resolved or
    closed), the others new, acknowledged or waiting, each with its three stages stored."""
    from sqlalchemy import insert

    from intake.config.settings import load_settings
    from intake.store import schema
    from intake.store.db import make_engine, write_session
    from intake.store.models import Deadline, Ticket

    os.environ["INTAKE_DATABASE__URL"] = database_url
    engine = make_engine(load_settings(config).database_url)
    schema.upgrade(engine)
    rng = random.Random(7)
    states = ("new", "acknowledged", "waiting", "new", "resolved", "new", "acknowledged", "assessed", "new", "closed")
    for first in range(0, count, SEED_BATCH):  # bounded: count / SEED_BATCH batches
        numbers = range(first, min(first + SEED_BATCH, count))
        received = [NOW - timedelta(seconds=rng.randrange(90 * 86400)) for _ in numbers]
        with write_session(engine, durable=False) as session:
            ids = session.scalars(insert(Ticket.__table__).returning(Ticket.__table__.c.id), [dict(
                reference=f"SEC-2026-{n + 1:06d}", subject=f"Report {n}", reporter=f"r{n}@researcher.test",
                reporter_name="", intake_address="security@example.com", state=states[n % len(states)],
                close_reason="invalid" if states[n % len(states)] == "closed" else None,
                severity=(None, "high", "low")[n % 3], policy="bench", labels=["bench"] if n % 7 == 0 else [],
                links=[], quality={}, received_at=at, created_at=at, updated_at=at)
                for n, at in zip(numbers, received)]).all()
            session.execute(insert(Deadline.__table__), [
                {"ticket_id": ticket_id, "stage": name, "position": position, "due_at": at + timedelta(days=days),
                 "started_at": at, "met_at": at + timedelta(days=1) if position == 0 and n % 2 else None,
                 "basis": f"{days} days from receipt", "severity_assumed": False, "computed_at": at,
                 "notify_at": None}
                for n, (ticket_id, at) in enumerate(zip(ids, received))
                for position, (name, days) in enumerate(STAGES)])
    engine.dispose()


def timed_ms(arguments: list[str], env: dict[str, str], runs: int) -> tuple[float, float]:
    """The median wall time and CPU time (user + system) of *runs* fresh ``intake`` processes, in
    milliseconds. On a busy machine the wall time grows with the load; the CPU time much less."""
    walls, cpus = [], []
    for _ in range(runs):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        done = subprocess.run([str(INTAKE), *arguments], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        walls.append((time.perf_counter() - started) * 1000)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append((after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime) * 1000)
        if done.returncode:
            print(f"warning: intake {' '.join(arguments)} exited {done.returncode}: {done.stderr.decode()[-200:]}",
                  file=sys.stderr)
    return statistics.median(walls), statistics.median(cpus)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tickets", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--json", action="store_true")
    arguments = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        config = Path(folder) / "config.toml"
        config.write_text((ROOT / "config.toml").read_text() + CONFIG)
        database_url = f"sqlite:///{Path(folder) / 'bench.db'}"
        started = time.perf_counter()
        seed(database_url, config, arguments.tickets)
        print(f"seeded {arguments.tickets} tickets in {time.perf_counter() - started:.1f} s", file=sys.stderr)
        env = {**os.environ, "INTAKE_DATABASE__URL": database_url, "INTAKE_CONFIG": str(config)}
        timed_ms(["tickets"], env, 1)  # warm the file cache
        results: dict[str, float] = {"tickets": arguments.tickets, "runs": arguments.runs,
                                     "load_average": os.getloadavg()[0]}
        for key, command in (("help", ["--help"]), ("version", ["--version"]), ("tickets", ["tickets"])):
            results[f"{key}_ms"], results[f"{key}_cpu_ms"] = timed_ms(command, env, arguments.runs)
    ok = all(results[key] < goal for key, goal in GOALS.items())
    if arguments.json:
        print(json.dumps({"results": results, "goals": GOALS, "ok": ok}, indent=2))
    else:
        for key, command in (("help", "intake --help"), ("version", "intake --version"),
                             ("tickets", f"intake tickets ({arguments.tickets} tickets)")):
            print(f"{command}: {results[f'{key}_ms']:.0f} ms wall, {results[f'{key}_cpu_ms']:.0f} ms CPU "
                  f"(goal {GOALS[f'{key}_ms']:.0f} ms wall)")
        print(f"medians of {arguments.runs} runs; load average {results['load_average']:.1f} on "
              f"{os.cpu_count()} CPUs")
        print("goals met" if ok else "a goal was missed")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
