"""Processing on several nodes: N stored messages, processed by 1 then by 2 worker processes on
one PostgreSQL database, each pinned to a core of its own (``taskset -c``), as if each were a
machine of its own.

For each node count a fresh database is created on the ``--postgres-url`` server, migrated and
preloaded with N pending messages (each its own report, so each becomes a ticket with a queued
acknowledgement); then the workers start (``taskset -c i``: worker *i* and its parse helper on
core *i*), warm up (imports, the parse helper), and are all told to go at once. Each runs the
processor's batches (:func:`intake.run.processor.process_batch`, what ``intake serve``'s worker
runs) until no message is pending. Reported per run:

* ``msg/s``: N / wall seconds from "go" until nothing is pending;
* ``CPU ms/msg``: the workers' CPU seconds from "go" to the end (user + system, their parse
  helpers included, from ``/proc``) / N: less noisy than wall time on a shared machine, and the
  cost of coordination (work done twice, parses thrown away) shows there;
* ``share``: messages each node acted on.

    .venv/bin/python benchmarks/nodes.py                  # N=1000, 4 KB, 1 then 2 nodes
    .venv/bin/python benchmarks/nodes.py -n 400 --json
    PYTHONPATH=/tmp/main/src .venv/bin/python benchmarks/nodes.py   # another checkout's code (and config)

PostgreSQL itself is not pinned: on a 2-core machine it shares both cores with the workers, so
2 nodes cannot reach 2x here; more than 2 nodes need more cores. Only 127.0.0.1 is contacted;
every run is bounded by ``--timeout`` (past it the workers are killed and the run reported
incomplete); the databases are dropped at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import psycopg

BENCHMARKS = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCHMARKS))

from throughput import (  # noqa: E402
    CLOCK_TICKS, CSTIME, CUTIME, PGRP, POSTGRES_SERVER, STIME, UTIME, build_message, make_body, parse_size,
    process_stats,
)

REPO = BENCHMARKS.parent
PRELOAD_CHUNK = 500  # messages stored per transaction while preloading
IDLE_PAUSE = 0.05  # seconds a worker waits when its batch found nothing while others still work
GO = "go\n"
PENDING = "SELECT count(*) FROM inbound_message WHERE status = 'pending'"


@dataclass
class NodeFigures:
    """What one worker process did."""

    handled: int = 0  # messages it acted on
    batches: int = 0
    empty_batches: int = 0  # batches that acted on nothing while messages were still pending
    cpu_seconds: float = 0.0  # user + system from "go" to the end, its parse helper included
    seconds: float = 0.0  # from "go" until it saw nothing pending


@dataclass
class RunFigures:
    nodes: int
    messages: int
    seconds: float | None = None  # None: incomplete (past --timeout)
    tickets: int = 0
    acknowledgements: int = 0
    per_node: list[NodeFigures] = field(default_factory=list)

    @property
    def rate(self) -> float | None:
        return self.messages / self.seconds if self.seconds else None

    @property
    def cpu_ms_per_message(self) -> float:
        return 1000 * sum(node.cpu_seconds for node in self.per_node) / self.messages


# -- one worker (run as: nodes.py --worker URL CONFIG) ---------------------------------------


def worker(database_url: str, config: Path) -> None:
    """Warm up, say "ready", wait for "go" on stdin, process until nothing is pending, then print
    this process's figures as one JSON line."""
    os.environ["INTAKE_DATABASE__URL"] = database_url
    from intake.config.settings import load_settings
    from intake.run import processor
    from intake.store.db import make_engine
    from intake.understand import parse_guard

    settings = load_settings(config)
    engine = make_engine(settings.database_url)
    parse_guard.parse_and_score(b"Subject: warm-up\r\n\r\nwarm-up\r\n", settings.quality_rules,
                                settings.processing.parse_timeout, settings.processing.message_budget)
    print("ready", flush=True)
    sys.stdin.readline()
    cpu_at_start = group_cpu_seconds()
    figures = NodeFigures()
    started = time.perf_counter()
    while True:
        result = processor.process_batch(engine, settings, datetime.now(timezone.utc))
        figures.batches += 1
        figures.handled += result.handled
        if not result.handled:
            if not count_rows(database_url, PENDING):
                break
            figures.empty_batches += 1
            time.sleep(IDLE_PAUSE)
    figures.seconds = time.perf_counter() - started
    figures.cpu_seconds = group_cpu_seconds() - cpu_at_start
    parse_guard.close()
    engine.dispose()
    print(json.dumps(asdict(figures)), flush=True)


def group_cpu_seconds() -> float:
    """CPU seconds (user + system) used so far by this process group: the worker and its parse
    helper (imports and warm-up before "go" are left out by taking the difference)."""
    group = os.getpgid(0)
    ticks = sum(sum(int(fields[index]) for index in (UTIME, STIME, CUTIME, CSTIME))
                for _, fields in process_stats() if int(fields[PGRP]) == group)
    return ticks / CLOCK_TICKS


# -- the runs --------------------------------------------------------------------------------


@contextmanager
def preloaded_database(server_url: str, messages: list[bytes]) -> Iterator[str]:
    """A fresh database on *server_url*, migrated, holding *messages* pending; dropped afterwards."""
    from intake.store import inbound, schema
    from intake.store.db import make_engine

    name = f"intake_bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = server_url.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1) + f"/{name}"
    try:
        engine = make_engine(url)
        schema.upgrade(engine)
        now = datetime.now(timezone.utc)
        for start in range(0, len(messages), PRELOAD_CHUNK):
            inbound.store(engine, [inbound.Arrival(f"researcher{start + n}@loadgen.test", ["security@example.com"],
                                                   "127.0.0.1", "loadgen.test", raw, now)
                                   for n, raw in enumerate(messages[start:start + PRELOAD_CHUNK])])
        engine.dispose()
        yield url
    finally:
        with psycopg.connect(server_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def count_rows(url: str, sql: str) -> int:
    with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://", 1)) as connection:
        return connection.execute(sql).fetchone()[0]


def shipped_config() -> Path:
    """The config.toml shipped with the intake being measured (beside its src/ folder): another
    checkout's, when PYTHONPATH points at its src/ to measure it, else this one's."""
    import intake

    beside = Path(intake.__file__).resolve().parents[2] / "config.toml"
    return beside if beside.exists() else REPO / "config.toml"


def measure(count: int, size: int, node_counts: list[int], postgres_url: str, timeout: float) -> list[RunFigures]:
    """*count* messages of *size* bytes processed by each of *node_counts* workers in turn."""
    tag = uuid.uuid4().hex[:8]
    body = make_body(size)
    messages = [build_message(tag, n, body).raw for n in range(count)]
    runs = []
    for nodes in node_counts:
        with tempfile.TemporaryDirectory(prefix="intake-nodes-") as workdir:
            print(f"{nodes} node(s), {len(messages)} messages ...", file=sys.stderr, flush=True)
            runs.append(run_nodes(nodes, messages, postgres_url, timeout, Path(workdir)))
    return runs


def as_dict(run: RunFigures) -> dict[str, object]:
    return {**asdict(run), "rate": run.rate, "cpu_ms_per_message": run.cpu_ms_per_message}


def run_nodes(count: int, messages: list[bytes], postgres_url: str, timeout: float, workdir: Path) -> RunFigures:
    """*count* workers, worker *i* pinned to core *i*, on a database preloaded with *messages*."""
    figures = RunFigures(count, len(messages))
    config = workdir / "config.toml"
    config.write_text(shipped_config().read_text())
    env = {k: v for k, v in os.environ.items() if not k.startswith("INTAKE_")}
    env.update({"INTAKE_OUTBOUND__TRANSPORT": "maildir", "INTAKE_OUTBOUND__MAILDIR": str(workdir / "outbox")})
    deadline = time.monotonic() + timeout
    with preloaded_database(postgres_url, messages) as url:
        workers = [subprocess.Popen(["taskset", "-c", str(core % os.cpu_count()), sys.executable, __file__,
                                     "--worker", url, str(config)],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True,
                                    start_new_session=True) for core in range(count)]
        try:
            for process in workers:
                assert process.stdout.readline().strip() == "ready", "a worker failed to start"
            started = time.perf_counter()
            for process in workers:
                process.stdin.write(GO)
                process.stdin.flush()
            for process in workers:
                line = process.stdout.readline()
                process.wait(max(1.0, deadline - time.monotonic()))
                figures.per_node.append(NodeFigures(**json.loads(line)))
            figures.seconds = time.perf_counter() - started
        except (subprocess.TimeoutExpired, json.JSONDecodeError):
            figures.seconds = None
        finally:
            for process in workers:
                if process.poll() is None:
                    os.killpg(process.pid, 9)
                    process.wait(10)
        figures.tickets = count_rows(url, "SELECT count(*) FROM ticket")
        figures.acknowledgements = count_rows(url, "SELECT count(*) FROM outbox WHERE dedupe_key LIKE 'ack:%'")
    return figures


def format_table(runs: list[RunFigures]) -> str:
    lines = ["nodes  messages  seconds  msg/s  x 1 node  CPU ms/msg  tickets  acks  share (acted on per node)"]
    single = next((run.rate for run in runs if run.nodes == 1 and run.rate), None)
    for run in runs:
        ratio = f"{run.rate / single:.2f}" if run.rate and single else "-"
        seconds = f"{run.seconds:.1f}" if run.seconds else "INCOMPLETE"
        rate = f"{run.rate:.0f}" if run.rate else "-"
        share = " / ".join(str(node.handled) for node in run.per_node)
        lines.append(f"{run.nodes:>5}  {run.messages:>8}  {seconds:>7}  {rate:>5}  {ratio:>8}  "
                     f"{run.cpu_ms_per_message:>10.2f}  {run.tickets:>7}  {run.acknowledgements:>4}  {share}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--messages", type=int, default=1000)
    parser.add_argument("-s", "--size", type=parse_size, default=4096, help="body size, bytes or 4k")
    parser.add_argument("--nodes", type=int, nargs="+", default=[1, 2], help="node counts to run (default: 1 2)")
    parser.add_argument("--postgres-url", default=POSTGRES_SERVER)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds each run may take")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--worker", nargs=2, metavar=("URL", "CONFIG"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(args.worker[0], Path(args.worker[1]))
        return 0
    runs = measure(args.messages, args.size, args.nodes, args.postgres_url, args.timeout)
    if args.json:
        print(json.dumps([as_dict(run) for run in runs], indent=2))
    else:
        print(format_table(runs))
    complete = all(run.seconds and run.tickets == run.messages for run in runs)
    return 0 if complete else 1


if __name__ == "__main__":
    sys.exit(main())
