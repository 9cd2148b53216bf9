"""How fast intake accepts and processes mail, measured side by side with a bare SMTP server.

For every scenario (a body size and a number C of concurrent SMTP sessions) this starts, each
fresh and in its own process group:

* ``bare``: an aiosmtpd server that discards every message (``discard_server.py``), and
* ``intake``: ``intake serve`` on a fresh SQLite database (WAL, synchronous=FULL, group commit),
  or with ``--database postgresql`` on a fresh PostgreSQL database, optionally as ``--nodes N``
  servers on that one database, each on its own port (the client's sessions spread over them),

sends N messages to each over C sessions (one connection per session; RSET, MAIL, RCPT, DATA
per message, as an MTA reusing a connection does) and reports accepted messages per second and
the p50/p99 time of one SMTP transaction (MAIL up to the reply to the end of DATA, measured by
the client). For intake it also measures end-to-end processing: the time from the first send
until every accepted message has a ticket and a queued acknowledgement (``outbox`` row
``ack:*``), read from the database read-only.

With ``--modes smtp,import,fetch`` the same N messages (per body size) also go in the two other
ways, each into a fresh SQLite database (see ``intake_modes.py``): ``intake import`` of an mbox
holding them, and one ``[[fetch]]`` pass from a private Dovecot holding them, then processing;
one more table puts the three rates side by side (messages/s into tickets, seconds, tickets).

Run it with intake's virtualenv, from anywhere:

    .venv/bin/python benchmarks/throughput.py           # N=2000, C=1 and 20, 4 KB and 64 KB bodies
    .venv/bin/python benchmarks/throughput.py --quick   # smoke run: N=200, C=20, 4 KB
    .venv/bin/python benchmarks/throughput.py --json    # the results as JSON on stdout
    .venv/bin/python benchmarks/throughput.py --quick --database postgresql --nodes 2
    .venv/bin/python benchmarks/throughput.py -n 300 -c 20 -s 4k --modes smtp,import,fetch  # as root
    .venv/bin/python benchmarks/throughput.py --quick --encryption   # intake also with a storage key

With ``--large`` and ``--scaling`` the same run also measures issue 18's other two scenarios and
puts their goals beside these: ``large_message.py`` (one 25 MB message, then ten over 4 sessions:
peak RSS per process and of the whole service, time to ticket) and ``nodes.py`` (``-n`` messages
processed by 1, then 2 PostgreSQL nodes each pinned to a core with taskset: msg/s and CPU per
message). The issue's run:

    .venv/bin/python benchmarks/throughput.py -n 1000 -c 20 -s 4k --large --scaling

With ``--encryption`` each scenario also runs ``intake+enc``: intake with ``[storage] key_file``
set (report content stored encrypted, see intake.store.sealing), compared with intake in clear in
the same run (goal: within 15 %).

Only 127.0.0.1 is contacted. Each server run is bounded by ``--timeout`` seconds (reported as
incomplete past it); servers are killed at the end, on error, on Ctrl-C and on SIGTERM.
Exit status: 0 all goals met, 1 a goal missed or a run incomplete, 2 a server failed, 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import closing, contextmanager
from dataclasses import asdict, dataclass, field
from email.utils import formatdate
from pathlib import Path

from typing import TYPE_CHECKING

import aiosmtplib
import psycopg

if TYPE_CHECKING:
    from intake_modes import ModeResult

HOST = "127.0.0.1"
RECIPIENT = "security@example.com"
CLIENT_NAME = "loadgen.test"

COMMAND_TIMEOUT = 30.0  # seconds for one SMTP command
STOP_GRACE = 5.0  # seconds a server gets to exit on SIGTERM before SIGKILL
POLL_INTERVAL = 0.05  # seconds between database checks while waiting for processing

ACCEPT_RATIO_GOAL = 0.5  # intake accepted msg/s vs bare, in the goal scenario
# --scaling: 2 nodes vs 1, each pinned to a core; PostgreSQL shares the cores, so not 2x on 2 CPUs.
NODES_RATE_GOAL = 1.2
NODES_CPU_GOAL = 1.25  # CPU per message: more would mean work done twice (both nodes parsing one batch)
E2E_RATIO_GOAL = 0.3  # intake end-to-end msg/s vs bare accepted msg/s, every scenario
P99_GOAL_MS = 100.0  # intake p99 SMTP transaction, every scenario
ENCRYPTION_RATIO_GOAL = 0.85  # intake+enc msg/s (accepted, end-to-end) vs intake's in clear: within 15 %
ENCRYPTED = "intake+enc"  # the server name of intake with a storage key (--encryption)
GOAL_SIZE, GOAL_CONCURRENCY = 4096, 20
BUSY_MACHINE_PERCENT = 25.0  # other work above this much of a core while sending is warned about

BENCHMARKS = Path(__file__).resolve().parent
REPO = BENCHMARKS.parent
INTAKE = Path(sys.executable).parent / "intake"
DISCARD_SERVER = BENCHMARKS / "discard_server.py"
DATABASE_NAME = "intake.db"
POSTGRES_SERVER = "postgresql://postgres@127.0.0.1:5432/postgres"  # --postgres-url's default
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")  # units of /proc CPU times
PGRP, FLAGS, UTIME, STIME, CUTIME, CSTIME = 2, 6, 11, 12, 13, 14  # /proc/<pid>/stat fields after "(comm)"
PF_KTHREAD = 0x00200000

FULL_RUN = {"messages": 2000, "concurrency": [1, 20], "sizes": [4096, 65536]}
MODES = ("smtp", "import", "fetch")  # the ways mail enters intake that --modes can measure
QUICK_RUN = {"messages": 200, "concurrency": [20], "sizes": [4096]}


class ServerFailed(RuntimeError):
    """A server did not start, died, or refused the warm-up message: the run cannot go on."""


# -- what is measured ------------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    body_size: int
    concurrency: int
    messages: int
    # True: each session keeps one connection for many messages (RSET between them), as a relay
    # with a queue for us does. False: a new connection per message, as mail from many different
    # senders' MTAs arrives at an MX (and the regime the issue's ~1,200 msg/s bare figure describes).
    reuse_connections: bool = False

    @property
    def label(self) -> str:
        return f"{human_size(self.body_size)} C={self.concurrency}" + (" reuse" if self.reuse_connections else "")

    @property
    def is_goal_scenario(self) -> bool:
        return (self.body_size, self.concurrency) == (GOAL_SIZE, GOAL_CONCURRENCY)


@dataclass
class LoadResult:
    """What the client saw while sending one scenario's messages."""

    accepted: int = 0
    refused: Counter[int] = field(default_factory=Counter)  # reply code -> transactions
    session_errors: list[str] = field(default_factory=list)  # sessions cut short (connection lost, timeout)
    latencies: list[float] = field(default_factory=list)  # seconds, one per answered transaction
    started: float = 0.0  # time.perf_counter() when the sessions started (the first send)
    elapsed: float = 0.0
    client_cpu: float = 0.0  # CPU seconds the client process used
    timed_out: bool = False


@dataclass(frozen=True)
class CpuUse:
    """CPU seconds used while the messages were being sent."""

    server_main: float  # bare's one process; intake's listener
    server_children: float  # intake's worker (and multiprocessing's resource tracker)
    others: float  # user processes but the client and the server (other people's work), hypervisor steal


@dataclass
class Measurement:
    """One server in one scenario."""

    server: str  # "bare", "intake" or "intake+enc" (intake with a storage key)
    scenario: Scenario
    load: LoadResult
    cpu: CpuUse
    processed_after: float | None = None  # intake: seconds from the first send until all were processed
    tickets: int | None = None  # intake: tickets the measured messages opened (the warm-up's not counted)
    inbound_status: dict[str, int] = field(default_factory=dict)  # intake: inbound_message rows by status

    @property
    def accept_rate(self) -> float:
        return self.load.accepted / self.load.elapsed if self.load.elapsed else 0.0

    @property
    def p50_ms(self) -> float | None:
        return percentile_ms(self.load.latencies, 0.50)

    @property
    def p99_ms(self) -> float | None:
        return percentile_ms(self.load.latencies, 0.99)

    @property
    def end_to_end_rate(self) -> float | None:
        if self.processed_after is None or not self.load.accepted:
            return None
        return self.load.accepted / self.processed_after

    @property
    def complete(self) -> bool:
        sent_all = not self.load.timed_out and self.load.accepted == self.scenario.messages
        return sent_all and (self.server == "bare" or self.processed_after is not None)

    @property
    def is_intake(self) -> bool:
        return self.server.startswith("intake")

    def cpu_percent(self, seconds: float) -> float:
        """CPU *seconds* used while sending, as % of one core."""
        return 100 * seconds / self.load.elapsed if self.load.elapsed else 0.0

    def as_dict(self) -> dict[str, object]:
        load = self.load
        return {
            "server": self.server,
            "body_size": self.scenario.body_size,
            "concurrency": self.scenario.concurrency,
            "messages": self.scenario.messages,
            "accepted": load.accepted,
            "refused": {str(code): count for code, count in load.refused.items()},
            "session_errors": load.session_errors,
            "timed_out": load.timed_out,
            "complete": self.complete,
            "send_seconds": round(load.elapsed, 3),
            "accepted_per_second": round(self.accept_rate, 1),
            "p50_ms": _rounded(self.p50_ms, 2),
            "p99_ms": _rounded(self.p99_ms, 2),
            "processed_seconds": _rounded(self.processed_after, 3),
            "processed_per_second": _rounded(self.end_to_end_rate, 1),
            "tickets": self.tickets,
            "inbound_status": self.inbound_status,
            "cpu_percent": {
                "client": round(self.cpu_percent(load.client_cpu), 1),
                "server_main": round(self.cpu_percent(self.cpu.server_main), 1),
                "server_children": round(self.cpu_percent(self.cpu.server_children), 1),
                "others": round(self.cpu_percent(self.cpu.others), 1),
            },
        }


def percentile_ms(values: list[float], fraction: float) -> float | None:
    """Nearest-rank percentile of *values* (seconds), in milliseconds."""
    if not values:
        return None
    ordered = sorted(values)
    return 1000 * ordered[max(math.ceil(fraction * len(ordered)) - 1, 0)]


def _rounded(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


# -- the messages ----------------------------------------------------------------------------


def make_body(size: int) -> bytes:
    """About *size* bytes of plain text in CRLF lines of 78 bytes, like a written report."""
    line = "{:05d} Steps to reproduce: GET /login?next=%3Cscript%3E - the value is echoed back.\r\n"
    text = "".join(line.format(n) for n in range(size // len(line) + 1)).encode("ascii")
    return text[: size - 2].rstrip(b"\r") + b"\r\n"


@dataclass(frozen=True)
class Message:
    sender: str  # envelope and From: address
    raw: bytes


def build_message(run_tag: str, index: int, body: bytes) -> Message:
    """Message *index* of a run: its own Message-ID, subject and reporter, so intake opens a ticket
    and queues an acknowledgement for each (a per-reporter limit on automatic replies never applies)."""
    sender = f"researcher{index}@{CLIENT_NAME}"
    headers = (
        f"From: Researcher {index} <{sender}>\r\n"
        f"To: <{RECIPIENT}>\r\n"
        f"Subject: Benchmark report {index}: reflected XSS in the login form\r\n"
        f"Message-ID: <{run_tag}.{index}@{CLIENT_NAME}>\r\n"
        f"Date: {formatdate(usegmt=True)}\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=us-ascii\r\n"
        "\r\n"
    )
    return Message(sender, headers.encode("ascii") + body)


# -- the client ------------------------------------------------------------------------------


async def send_load(ports: list[int], messages: Iterable[Message], concurrency: int, deadline: float,
                    reuse_connections: bool) -> LoadResult:
    """Send every message over *concurrency* SMTP sessions sharing one queue, until done or *deadline*;
    session i talks to ``ports[i % len(ports)]`` (several intake nodes share the load evenly)."""
    result = LoadResult()
    queue = iter(messages)
    session = run_session if reuse_connections else run_connection_per_message
    result.started, cpu_started = time.perf_counter(), time.process_time()
    try:
        async with asyncio.timeout(max(deadline - time.monotonic(), 0.0)):
            await asyncio.gather(*(session(ports[i % len(ports)], queue, result) for i in range(concurrency)))
    except TimeoutError:
        result.timed_out = True
    result.elapsed = time.perf_counter() - result.started
    result.client_cpu = time.process_time() - cpu_started
    return result


async def run_session(port: int, messages: Iterator[Message], result: LoadResult) -> None:
    """One connection sending messages from the shared queue until it is empty."""
    client = aiosmtplib.SMTP(hostname=HOST, port=port, local_hostname=CLIENT_NAME, start_tls=False,
                             timeout=COMMAND_TIMEOUT)
    try:
        await client.connect()
        await client.ehlo()
        for sent, message in enumerate(messages):
            if sent:
                await client.rset()
            await send_transaction(client, message, result)
        await client.quit()
    except aiosmtplib.SMTPException as exc:
        result.session_errors.append(f"{type(exc).__name__}: {exc}")
    finally:
        client.close()


async def run_connection_per_message(port: int, messages: Iterator[Message], result: LoadResult) -> None:
    """One client slot sending messages from the shared queue, a fresh connection for each."""
    for message in messages:
        client = aiosmtplib.SMTP(hostname=HOST, port=port, local_hostname=CLIENT_NAME, start_tls=False,
                                 timeout=COMMAND_TIMEOUT)
        try:
            await client.connect()
            await client.ehlo()
            await send_transaction(client, message, result)
            await client.quit()
        except aiosmtplib.SMTPException as exc:
            result.session_errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            client.close()


async def send_transaction(client: aiosmtplib.SMTP, message: Message, result: LoadResult) -> None:
    """MAIL, RCPT, DATA; times the whole transaction and counts the final reply."""
    started = time.perf_counter()
    try:
        await client.mail(message.sender)
        await client.rcpt(RECIPIENT)
        await client.data(message.raw)
    except aiosmtplib.SMTPResponseException as exc:  # a 4xx/5xx reply; the session goes on
        result.refused[exc.code] += 1
    else:
        result.accepted += 1
    result.latencies.append(time.perf_counter() - started)


# -- the servers -----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


class ServerProcess:
    """A server in a process group of its own (one signal reaches its children too), logging to a file."""

    def __init__(self, name: str, command: list[str], env: dict[str, str], workdir: Path, port: int):
        self.name, self.port = name, port
        self._command, self._env, self._workdir = command, env, workdir
        self._log = workdir / f"{name}.log"
        self._process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> ServerProcess:
        with open(self._log, "wb") as log:
            self._process = subprocess.Popen(self._command, env=self._env, cwd=self._workdir, stdin=subprocess.DEVNULL,
                                             stdout=log, stderr=log, start_new_session=True)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def wait_until_ready(self, deadline: float) -> None:
        """Return once the server greets with 220; ServerFailed if it exits or *deadline* passes."""
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise ServerFailed(f"{self.name} exited with status {self._process.returncode}\n{self.log_tail()}")
            if self._banner().startswith(b"220"):
                return
            time.sleep(0.05)
        raise ServerFailed(f"{self.name} did not greet on {HOST}:{self.port} in time\n{self.log_tail()}")

    def _banner(self) -> bytes:
        try:
            with socket.create_connection((HOST, self.port), timeout=1) as probe:
                return probe.recv(100)
        except OSError:
            return b""

    @property
    def group(self) -> int:
        return self._process.pid

    @property
    def ports(self) -> list[int]:
        return [self.port]

    @property
    def groups(self) -> set[int]:
        return {self.group}

    def cpu_seconds(self) -> tuple[float, float]:
        """CPU seconds used so far by the server's main process and by its children."""
        main = children = 0.0
        for pid, fields in process_stats():
            if int(fields[PGRP]) == self.group:
                seconds = (int(fields[UTIME]) + int(fields[STIME])) / CLOCK_TICKS
                if pid == self.group:
                    main += seconds
                else:
                    children += seconds
        return main, children

    def stop(self) -> None:
        """SIGTERM to the whole group, SIGKILL to whatever is left after the grace period."""
        if self._process is None:
            return
        self._signal_group(signal.SIGTERM)
        try:
            self._process.wait(STOP_GRACE)
        except subprocess.TimeoutExpired:
            pass
        self._signal_group(signal.SIGKILL)  # also children that outlived the main process
        self._process.wait()

    def _signal_group(self, signum: int) -> None:
        try:
            os.killpg(self._process.pid, signum)
        except ProcessLookupError:
            pass

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self._log.read_text(errors="replace").splitlines()[-lines:])


class Nodes:
    """Several intake servers on one database, used as one server: started, waited for, measured
    (CPU summed) and stopped together."""

    def __init__(self, servers: list[ServerProcess]):
        self.servers = servers
        self.name = servers[0].name

    def __enter__(self) -> Nodes:
        for server in self.servers:
            server.__enter__()
        return self

    def __exit__(self, *exc_info: object) -> None:
        for server in self.servers:
            server.stop()

    @property
    def ports(self) -> list[int]:
        return [server.port for server in self.servers]

    @property
    def groups(self) -> set[int]:
        return {server.group for server in self.servers}

    def wait_until_ready(self, deadline: float) -> None:
        for server in self.servers:
            server.wait_until_ready(deadline)

    def cpu_seconds(self) -> tuple[float, float]:
        used = [server.cpu_seconds() for server in self.servers]
        return sum(main for main, _ in used), sum(children for _, children in used)

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(f"-- node {n}:\n{server.log_tail(lines)}" for n, server in enumerate(self.servers))


def bare_server(workdir: Path, port: int) -> ServerProcess:
    return ServerProcess("bare", [sys.executable, str(DISCARD_SERVER), str(port)], dict(os.environ), workdir, port)


def intake_server(workdir: Path, port: int, database_url: str, overrides: dict[str, str],
                  name: str = "intake") -> ServerProcess:
    """``intake serve`` with the shipped config.toml, its state in *workdir*, acknowledgements to a Maildir.

    *overrides* are further ``INTAKE_*`` variables (``--intake-env``), e.g. to compare a setting."""
    workdir.mkdir(exist_ok=True)
    config = workdir / "config.toml"
    shutil.copy(REPO / "config.toml", config)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("INTAKE_", "NOTIFY_SOCKET", "WATCHDOG_"))}
    env.update({
        "INTAKE_SMTP__LISTEN": f"{HOST}:{port}",
        "INTAKE_SMTP__ADDRESSES": json.dumps([RECIPIENT]),
        "INTAKE_DATABASE__URL": database_url,
        "INTAKE_OUTBOUND__TRANSPORT": "maildir",
        "INTAKE_OUTBOUND__MAILDIR": str(workdir / "outbox"),
        **overrides,
    })
    return ServerProcess(name, [str(INTAKE), "--config", str(config), "serve"], env, workdir, port)


# -- intake's processing, read from its database ---------------------------------------------


class ProcessingProbe:
    """Read-only view of intake's database: how many messages have been fully processed."""

    def __init__(self, database_url: str):
        if database_url.startswith("sqlite:///"):
            path = database_url.removeprefix("sqlite:///")
            self._connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=COMMAND_TIMEOUT)
        else:  # autocommit: each check reads the latest commits
            self._connection = psycopg.connect(database_url.replace("+psycopg", "", 1), autocommit=True)

    def progress(self) -> tuple[int, int]:
        """(messages with a ticket opened and an acknowledgement queued, messages still pending), one snapshot."""
        tickets, acknowledgements, pending = self._connection.execute(
            "SELECT (SELECT count(*) FROM ticket),"
            " (SELECT count(*) FROM outbox WHERE dedupe_key LIKE 'ack:%'),"
            " (SELECT count(*) FROM inbound_message WHERE status = 'pending')").fetchone()
        return min(tickets, acknowledgements), pending

    def wait_until_processed(self, count: int, deadline: float) -> bool:
        """True once *count* messages are processed; False at *deadline*, or at once when nothing is
        pending any more yet fewer were processed (some failed or were not taken for new reports)."""
        while time.monotonic() < deadline:
            processed, pending = self.progress()
            if processed >= count:
                return True
            if not pending:
                return False
            time.sleep(POLL_INTERVAL)
        return False

    def tickets(self) -> int:
        return self._connection.execute("SELECT count(*) FROM ticket").fetchone()[0]

    def inbound_status(self) -> dict[str, int]:
        return dict(self._connection.execute("SELECT status, count(*) FROM inbound_message GROUP BY status"))

    def close(self) -> None:
        self._connection.close()


# -- one scenario ----------------------------------------------------------------------------


def measure(server_kind: str, scenario: Scenario, args: argparse.Namespace) -> Measurement:
    """Run one scenario against a fresh *server_kind* ("bare", "intake" or "intake+enc"), within
    ``--timeout`` seconds."""
    deadline = time.monotonic() + args.timeout
    with tempfile.TemporaryDirectory(prefix=f"intake-bench-{server_kind}-") as tmp:
        workdir, port = Path(tmp), free_port()
        if server_kind == "bare":
            with bare_server(workdir, port) as server:
                return measure_accepting(server, scenario, deadline)
        overrides = dict(args.intake_env)
        if server_kind == ENCRYPTED:  # one key for every node, as a PostgreSQL deployment shares it
            key = workdir / "storage.key"
            subprocess.run([str(INTAKE), "storage", "keygen", str(key)], check=True, capture_output=True)
            overrides["INTAKE_STORAGE__KEY_FILE"] = str(key)
        with fresh_database(args, workdir) as database_url:
            nodes = Nodes([intake_server(workdir / f"node{n}", port if n == 0 else free_port(), database_url,
                                         overrides, server_kind) for n in range(args.nodes)])
            with nodes as server:
                return measure_processing(server, scenario, deadline, database_url)


@contextmanager
def fresh_database(args: argparse.Namespace, workdir: Path) -> Iterator[str]:
    """The URL of an empty database for one intake run (``intake serve`` migrates it): a SQLite file
    in *workdir*, or a new database on the ``--postgres-url`` server, dropped afterwards."""
    if args.database == "sqlite":
        yield f"sqlite:///{workdir / DATABASE_NAME}"
        return
    name = f"intake_bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(args.postgres_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield args.postgres_url.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1) + f"/{name}"
    finally:
        with psycopg.connect(args.postgres_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def measure_accepting(server: ServerProcess, scenario: Scenario, deadline: float) -> Measurement:
    messages = warm_up(server, scenario, deadline)
    load, cpu = send_measured(server, messages, scenario, deadline)
    return Measurement(server.name, scenario, load, cpu)


def measure_processing(server: Nodes, scenario: Scenario, deadline: float, database_url: str) -> Measurement:
    """As :func:`measure_accepting`, plus the time until intake has processed every accepted message."""
    messages = warm_up(server, scenario, deadline)
    with closing(ProcessingProbe(database_url)) as probe:
        if not probe.wait_until_processed(1, deadline):  # the worker is up and has handled the warm-up message
            raise ServerFailed(f"intake did not process the warm-up message ({probe.inbound_status()})\n"
                               f"{server.log_tail()}")
        load, cpu = send_measured(server, messages, scenario, deadline)
        measurement = Measurement(server.name, scenario, load, cpu)
        if probe.wait_until_processed(1 + load.accepted, deadline):
            measurement.processed_after = time.perf_counter() - load.started
        measurement.inbound_status = probe.inbound_status()
        measurement.tickets = probe.tickets() - 1  # the warm-up message's
    return measurement


def warm_up(server: ServerProcess | Nodes, scenario: Scenario, deadline: float) -> Iterator[Message]:
    """Wait for the greeting and send message 0, so connections, imports and caches are warm before the
    clock starts; returns the scenario's messages 1..N, built as they are sent."""
    server.wait_until_ready(deadline)
    run_tag, body = uuid.uuid4().hex[:12], make_body(scenario.body_size)
    load = asyncio.run(send_load(server.ports, [build_message(run_tag, 0, body)], 1, deadline,
                                  scenario.reuse_connections))
    if load.accepted != 1:
        raise ServerFailed(f"{server.name} did not accept the warm-up message: {load.refused or load.session_errors}"
                           f"\n{server.log_tail()}")
    return (build_message(run_tag, index, body) for index in range(1, scenario.messages + 1))


def send_measured(server: ServerProcess | Nodes, messages: Iterable[Message], scenario: Scenario,
                  deadline: float) -> tuple[LoadResult, CpuUse]:
    """The load, and the CPU the server and everything else on the machine used meanwhile."""
    (main_before, children_before), others_before = server.cpu_seconds(), others_cpu_seconds(server.groups)
    load = asyncio.run(send_load(server.ports, messages, scenario.concurrency, deadline, scenario.reuse_connections))
    (main_after, children_after), others_after = server.cpu_seconds(), others_cpu_seconds(server.groups)
    others = max(others_after - others_before, 0.0)  # a process that exits takes its CPU time with it
    return load, CpuUse(main_after - main_before, children_after - children_before, others)


def process_stats() -> Iterator[tuple[int, list[str]]]:
    """(pid, the fields after the command name) of every process, from /proc/<pid>/stat (Linux)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            yield int(stat.parent.name), stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # the process ended while we looked


def others_cpu_seconds(server_groups: set[int]) -> float:
    """CPU seconds used so far by user processes other than this client and the server (with their
    reaped children's), plus hypervisor steal. Kernel threads are left out: their work (the
    filesystem journal, for one) is mostly done for the server."""
    ticks = int(Path("/proc/stat").read_text().split()[8])  # the "cpu" line's steal
    for pid, fields in process_stats():
        if pid != os.getpid() and int(fields[PGRP]) not in server_groups and not int(fields[FLAGS]) & PF_KTHREAD:
            ticks += sum(int(fields[index]) for index in (UTIME, STIME, CUTIME, CSTIME))
    return ticks / CLOCK_TICKS


# -- results ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Goal:
    name: str
    scenario: str
    value: float | str | None  # None: not measured (the run was incomplete)
    target: str
    passed: bool


def evaluate_goals(pairs: list[tuple[Measurement, ...]]) -> list[Goal]:
    """The issue's goals, for each (bare, intake) pair of one scenario, and with ``--encryption``
    intake+enc against intake."""
    goals = []
    for bare, intake, *encrypted in pairs:
        label = intake.scenario.label
        if intake.scenario.is_goal_scenario:
            ratio = intake.accept_rate / bare.accept_rate if bare.accept_rate else None
            goals.append(_goal("accepted msg/s vs bare", label, ratio, f">= {ACCEPT_RATIO_GOAL}x",
                               intake.complete and ratio is not None and ratio >= ACCEPT_RATIO_GOAL))
        e2e = intake.end_to_end_rate
        e2e_ratio = e2e / bare.accept_rate if e2e is not None and bare.accept_rate else None
        goals.append(_goal("end-to-end msg/s vs bare", label, e2e_ratio, f">= {E2E_RATIO_GOAL}x",
                           intake.complete and e2e_ratio is not None and e2e_ratio >= E2E_RATIO_GOAL))
        p99 = intake.p99_ms
        goals.append(_goal("p99 SMTP transaction ms", label, p99, f"< {P99_GOAL_MS:g}",
                           intake.complete and p99 is not None and p99 < P99_GOAL_MS))
        for sealed in encrypted:
            goals += _encryption_goals(intake, sealed)
    return goals


def _encryption_goals(clear: Measurement, sealed: Measurement) -> list[Goal]:
    """Accepted and end-to-end msg/s with a storage key, as a share of intake's in clear."""
    label = sealed.scenario.label
    accepted = sealed.accept_rate / clear.accept_rate if clear.accept_rate else None
    e2e_clear, e2e_sealed = clear.end_to_end_rate, sealed.end_to_end_rate
    e2e = e2e_sealed / e2e_clear if e2e_clear and e2e_sealed is not None else None
    complete = clear.complete and sealed.complete
    return [_goal(f"{name} encrypted vs clear", label, ratio, f">= {ENCRYPTION_RATIO_GOAL}x",
                  complete and ratio is not None and ratio >= ENCRYPTION_RATIO_GOAL)
            for name, ratio in (("accepted", accepted), ("end-to-end", e2e))]


def _goal(name: str, scenario: str, value: float | None, target: str, passed: bool) -> Goal:
    return Goal(name, scenario, None if value is None else round(value, 2), target, passed)


def format_table(pairs: list[tuple[Measurement, ...]]) -> str:
    header = ("scenario", "server", "accepted", "msg/s", "x bare", "p50 ms", "p99 ms", "e2e msg/s", "e2e x bare",
              "client CPU", "server CPU", "other CPU")
    rows = [header]
    for bare, *intakes in pairs:
        for measurement in (bare, *intakes):
            rows.append(_table_row(measurement, bare.accept_rate))
    widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) if column < 2 else cell.rjust(width)
                               for column, (cell, width) in enumerate(zip(row, widths)))
                     for row in rows)


def _table_row(m: Measurement, bare_rate: float) -> tuple[str, ...]:
    is_intake = m.is_intake
    e2e = m.end_to_end_rate
    accepted = f"{m.load.accepted}/{m.scenario.messages}" + ("" if m.complete else " INCOMPLETE")
    main, children = m.cpu_percent(m.cpu.server_main), m.cpu_percent(m.cpu.server_children)
    server_cpu = f"{main:.0f}+{children:.0f}%" if is_intake else f"{main:.0f}%"
    return (
        m.scenario.label,
        m.server,
        accepted,
        f"{m.accept_rate:.1f}",
        f"{m.accept_rate / bare_rate:.2f}" if is_intake and bare_rate else "-",
        _ms(m.p50_ms),
        _ms(m.p99_ms),
        f"{e2e:.1f}" if e2e is not None else ("-" if not is_intake else "n/a"),
        f"{e2e / bare_rate:.2f}" if e2e is not None and bare_rate else "-",
        f"{m.cpu_percent(m.load.client_cpu):.0f}%",
        server_cpu,
        f"{m.cpu_percent(m.cpu.others):.0f}%",
    )


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def format_rates(pairs: list[tuple[Measurement, ...]], others: list[ModeResult]) -> str:
    """The ways into intake side by side, per body size: messages/s taken in (SMTP: accepted; fetch:
    stored by the IMAP pass) and into tickets, seconds until all were processed, tickets made."""
    header = ("size", "mode", "messages", "taken msg/s", "to tickets msg/s", "seconds", "tickets")
    rows = [header]
    for size in dict.fromkeys([pair[1].scenario.body_size for pair in pairs] + [m.body_size for m in others]):
        for intake in (pair[1] for pair in pairs if pair[1].scenario.body_size == size):
            e2e = intake.end_to_end_rate
            rows.append((human_size(size), f"smtp C={intake.scenario.concurrency}", str(intake.scenario.messages),
                         f"{intake.accept_rate:.1f}", f"{e2e:.1f}" if e2e is not None else "INCOMPLETE",
                         _seconds(intake.processed_after), str(intake.tickets)))
        for mode in (m for m in others if m.body_size == size):
            rate = ("unavailable" if mode.unavailable else f"{mode.rate:.1f}" if mode.rate is not None
                    else "INCOMPLETE")
            rows.append((human_size(size), mode.mode, str(mode.messages),
                         f"{mode.store_rate:.1f}" if mode.store_rate is not None else "-", rate,
                         _seconds(mode.seconds), str(mode.tickets)))
    widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) if column < 2 else cell.rjust(width)
                               for column, (cell, width) in enumerate(zip(row, widths)))
                     for row in rows)


def format_goals(goals: list[Goal]) -> str:
    lines = ["goals (intake vs bare, same run):"]
    for goal in goals:
        value = ("not measured" if goal.value is None else
                 f"{goal.value:g}" if isinstance(goal.value, (int, float)) else str(goal.value))
        target = f"  (goal {goal.target})" if goal.target else ""  # or in its name
        lines.append(f"  {'PASS' if goal.passed else 'FAIL'}  {goal.name:<30} {goal.scenario:<11} {value:>12}{target}")
    missed = sum(not goal.passed for goal in goals)
    lines.append(f"RESULT: {'PASS' if not missed else 'FAIL'} ({len(goals) - missed} of {len(goals)} goals met)")
    return "\n".join(lines)


def describe_machine() -> dict[str, object]:
    """What the figures depend on: CPUs, Python, and the intake commit (with local changes or not)."""
    def git(*args: str) -> str:
        try:
            done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=False)
        except OSError:  # no git here
            return ""
        return done.stdout.strip()

    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "intake_commit": git("rev-parse", "--short", "HEAD") or "unknown",
        "intake_tree_modified": bool(git("status", "--porcelain", "--untracked-files=no", "--", "src")),
    }


# -- command line ----------------------------------------------------------------------------


def parse_size(text: str) -> int:
    """'4096', '4k', '64K', '1m' -> bytes."""
    units = {"k": 1024, "m": 1024 * 1024}
    text = text.strip().lower()
    multiplier = units.get(text[-1:], 1)
    size = int(text[:-1] if text[-1:] in units else text) * multiplier
    if size < 64:
        raise argparse.ArgumentTypeError("body size must be at least 64 bytes")
    return size


def parse_intake_env(text: str) -> tuple[str, str]:
    """'INTAKE_PROCESSING__BATCH_SIZE=10' -> ('INTAKE_PROCESSING__BATCH_SIZE', '10')."""
    name, sep, value = text.partition("=")
    if not sep or not name.startswith("INTAKE_"):
        raise argparse.ArgumentTypeError("expected INTAKE_<SECTION>__<KEY>=VALUE")
    return name, value


def parse_modes(text: str) -> list[str]:
    """'smtp,import,fetch' -> ['smtp', 'import', 'fetch']."""
    modes = [mode.strip() for mode in text.split(",") if mode.strip()]
    unknown = [mode for mode in modes if mode not in MODES]
    if unknown or not modes:
        raise argparse.ArgumentTypeError(f"expected some of {', '.join(MODES)} separated by commas")
    return list(dict.fromkeys(modes))


def human_size(size: int) -> str:
    return f"{size // 1024} KB" if size % 1024 == 0 else f"{size} B"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", "-n", type=int, help=f"messages per scenario (default {FULL_RUN['messages']})")
    parser.add_argument("--concurrency", "-c", type=int, nargs="+",
                        help=f"concurrent SMTP sessions, one scenario each (default {FULL_RUN['concurrency']})")
    parser.add_argument("--sizes", "-s", type=parse_size, nargs="+",
                        help="body sizes, e.g. 4k 64k (default 4k 64k)")
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="hard limit in seconds for each server in each scenario (default 300)")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run: {QUICK_RUN['messages']} messages, C=20, 4 KB (explicit flags still win)")
    parser.add_argument("--intake-env", type=parse_intake_env, action="append", default=[], metavar="INTAKE_X=VALUE",
                        help="an intake setting to override, e.g. INTAKE_PROCESSING__BATCH_SIZE=10 (repeatable)")
    parser.add_argument("--connections", choices=["per-message", "per-session"], default="per-message",
                        help="a new connection for every message, as an MX receiving from many senders "
                             "(default), or one per session reused with RSET, as a relay with a queue")
    parser.add_argument("--database", choices=["sqlite", "postgresql"], default="sqlite",
                        help="intake's database: a SQLite file (default), or a fresh database on --postgres-url")
    parser.add_argument("--postgres-url", default=POSTGRES_SERVER,
                        help=f"a PostgreSQL server where each run creates (and then drops) its database "
                             f"(default {POSTGRES_SERVER})")
    parser.add_argument("--nodes", type=int, default=1,
                        help="intake servers on the one database, each on its own port (more than 1 needs "
                             "--database postgresql)")
    parser.add_argument("--modes", type=parse_modes, default=["smtp"],
                        help="ways in to measure on the same messages, comma-separated: smtp (bare and intake "
                             "serve), import (an mbox), fetch (a private Dovecot; needs root) (default smtp)")
    parser.add_argument("--encryption", action="store_true",
                        help="also run intake with a storage key (content encrypted at rest), compared with intake "
                             "in clear in the same run")
    parser.add_argument("--large", action="store_true",
                        help="also the 25 MB scenario (large_message.py): peak RSS per process, time to ticket")
    parser.add_argument("--scaling", action="store_true",
                        help="also processing on 1 then 2 PostgreSQL nodes, each pinned to a core (nodes.py)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    args = parser.parse_args(argv)
    defaults = QUICK_RUN if args.quick else FULL_RUN
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.messages < 1 or min(args.concurrency) < 1:
        parser.error("--messages and --concurrency must be at least 1")
    if args.nodes < 1 or (args.nodes > 1 and args.database != "postgresql"):
        parser.error("--nodes must be at least 1, and more than 1 only with --database postgresql")
    args.intake_env = dict(args.intake_env)
    return args


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> tuple[list[tuple[Measurement, ...]], list[ModeResult]]:
    """Every scenario, bare then intake (then intake+enc with ``--encryption``), then per body size
    the other --modes; returns the measurements per scenario in that order and the other modes' results."""
    pairs, others = [], []
    for size in args.sizes:
        if "smtp" in args.modes:
            for concurrency in args.concurrency:
                scenario = Scenario(size, concurrency, args.messages, args.connections == "per-session")
                bare = measure_and_tell("bare", scenario, args)
                intake = measure_and_tell("intake", scenario, args)
                encrypted = (measure_and_tell(ENCRYPTED, scenario, args),) if args.encryption else ()
                pairs.append((bare, intake, *encrypted))
        others += [measure_mode(mode, size, args) for mode in args.modes if mode != "smtp"]
    return pairs, others


def measure_mode(mode: str, size: int, args: argparse.Namespace) -> ModeResult:
    """``import`` or ``fetch`` of N messages built as the SMTP runs build them, within ``--timeout``."""
    import intake_modes  # the Dovecot harness and intake's modules: only when asked for

    run_tag, body = uuid.uuid4().hex[:12], make_body(size)
    messages = [build_message(run_tag, index, body).raw for index in range(1, args.messages + 1)]
    measure_it = intake_modes.measure_import if mode == "import" else intake_modes.measure_fetch
    progress(f"[{human_size(size)}] {mode}: {args.messages} messages ...")
    with tempfile.TemporaryDirectory(prefix=f"intake-bench-{mode}-") as tmp:
        result = measure_it(messages, Path(tmp), RECIPIENT, time.monotonic() + args.timeout)
    result.body_size = size  # the body's: the SMTP runs' scenarios are labelled by it
    progress(f"[{human_size(size)}] {mode}: " + (f"unavailable: {result.unavailable}" if result.unavailable else
                                                  f"{result.tickets} tickets in {_seconds(result.seconds)} s"))
    return result


def measure_and_tell(server_kind: str, scenario: Scenario, args: argparse.Namespace) -> Measurement:
    label = f"[{scenario.label}] {server_kind}"
    progress(f"{label}: {scenario.messages} messages ...")
    m = measure(server_kind, scenario, args)
    progress(f"{label}: {m.accept_rate:.1f} msg/s accepted, p99 {_ms(m.p99_ms)} ms, "
             f"other CPU {m.cpu_percent(m.cpu.others):.0f}%" + ("" if m.complete else ", INCOMPLETE"))
    return m


def run_extras(args: argparse.Namespace) -> tuple[list[str], list[Goal], dict[str, object]]:
    """With ``--large`` and ``--scaling``, the other scenarios of issue 18 in the same run: their
    tables, their goals and their JSON."""
    texts: list[str] = []
    goals: list[Goal] = []
    results: dict[str, object] = {}
    if args.large:
        import large_message  # only when asked for

        progress("25 MB messages (large_message.py) ...")
        large = large_message.run(large_message.parse_args(["--timeout", str(3 * args.timeout)]))
        results["large"] = large
        texts.append("25 MB messages, peak RSS above idle per process (large_message.py):\n" + "\n".join(
            "  " + large_message.format_phase(large_message.Phase(**phase)) for phase in large["phases"]))
        goals += [Goal(goal["goal"], "25 MB", goal["value"], "", goal["passed"]) for goal in large["goals"]]
    if args.scaling:
        import nodes  # only when asked for

        runs = nodes.measure(args.messages, args.sizes[0], [1, 2], args.postgres_url, args.timeout)
        results["scaling"] = [nodes.as_dict(run) for run in runs]
        texts.append("processing on PostgreSQL, each node pinned to a core of its own (nodes.py):\n"
                     + nodes.format_table(runs))
        one, two = runs
        rate = two.rate / one.rate if one.rate and two.rate else None
        cpu = two.cpu_ms_per_message / one.cpu_ms_per_message if one.cpu_ms_per_message else None
        goals.append(_goal("2 nodes msg/s vs 1 node", "nodes", rate, f">= {NODES_RATE_GOAL}x",
                           rate is not None and rate >= NODES_RATE_GOAL))
        goals.append(_goal("2 nodes CPU/msg vs 1 node", "nodes", cpu, f"<= {NODES_CPU_GOAL}x (no work done twice)",
                           cpu is not None and cpu <= NODES_CPU_GOAL))
    return texts, goals, results


def report(args: argparse.Namespace, pairs: list[tuple[Measurement, ...]], others: list[ModeResult],
           goals: list[Goal], extras: tuple[list[str], dict[str, object]] = ([], {})) -> str:
    machine = describe_machine()
    if args.json:
        return json.dumps({
            "machine": machine,
            "settings": {"messages": args.messages, "concurrency": args.concurrency, "sizes": args.sizes,
                         "connections": args.connections, "database": args.database, "nodes": args.nodes,
                         "encryption": args.encryption,
                         "timeout": args.timeout, "intake_env": args.intake_env, "modes": args.modes},
            "results": [m.as_dict() for pair in pairs for m in pair],
            "modes": [m.as_dict() for m in others],
            **extras[1],
            "goals": [asdict(goal) for goal in goals],
        }, indent=2)
    modified = " (src/ modified)" if machine["intake_tree_modified"] else ""
    title = (f"intake {machine['intake_commit']}{modified}, {machine['cpus']} CPUs, Python {machine['python']}, "
             f"{args.messages} messages per run, connections {args.connections}, "
             f"intake on {args.database}" + (f" x {args.nodes} nodes" if args.nodes > 1 else ""))
    if args.intake_env:
        title += "\nintake settings overridden: " + " ".join(f"{k}={v}" for k, v in args.intake_env.items())
    parts = [title]
    if pairs:
        parts.append(format_table(pairs) + busy_machine_note(pairs))
    if others:
        parts.append("ways in, the same messages each into a fresh SQLite database:\n" + format_rates(pairs, others))
    parts += extras[0]
    if goals:
        parts.append(format_goals(goals))
    return "\n\n".join(parts)


def busy_machine_note(pairs: list[tuple[Measurement, ...]]) -> str:
    """A warning when work outside the benchmark took CPU while it was sending."""
    busiest = max(m.cpu_percent(m.cpu.others) for pair in pairs for m in pair)
    if busiest < BUSY_MACHINE_PERCENT:
        return ""
    return (f"\nWARNING: other work used up to {busiest:.0f}% of a core while sending ('other CPU'): "
            "these figures are low; run again on a quiet machine.")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not INTAKE.exists():
        progress(f"{INTAKE} not found: run this with intake's virtualenv (.venv/bin/python {sys.argv[0]})")
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwinds like Ctrl-C: servers get stopped
    try:
        pairs, others = run(args)
    except ServerFailed as exc:
        progress(f"server failed: {exc}")
        return 2
    except KeyboardInterrupt:
        progress("interrupted; servers stopped")
        return 130
    goals = evaluate_goals(pairs)
    try:
        texts, more_goals, results = run_extras(args)
    except ServerFailed as exc:
        progress(f"server failed: {exc}")
        return 2
    goals += more_goals
    print(report(args, pairs, others, goals, (texts, results)))
    if any(mode.unavailable for mode in others):
        return 2
    return 0 if all(goal.passed for goal in goals) and all(mode.complete for mode in others) else 1


if __name__ == "__main__":
    sys.exit(main())
