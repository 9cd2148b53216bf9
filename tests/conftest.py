"""Shared fixtures: real SQLite files, a real PostgreSQL, a real listener on 127.0.0.1, and a
real SMTP sink (aiosmtpd) standing in for the relay. Nothing here mocks a part of intake."""

from __future__ import annotations

import asyncio
import os
import shutil
import smtplib
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email.message import EmailMessage
from pathlib import Path
from typing import NamedTuple

import psycopg
import pytest
from aiosmtpd.controller import Controller
from click.testing import CliRunner
from sqlalchemy import select

from intake.cli.app import main
from intake.config.settings import Settings, load_settings
from intake.receive.listener import IntakeHandler
from intake.run import processor
from intake.run.service import start_listener
from intake.send.outbox import OutboxSender, make_transport
from intake.store import schema
from intake.store.db import make_engine, read_session
from intake.store.group_commit import GroupCommitter
from intake.store.models import Ticket
from intake.tickets import undeliverable
from intake.understand import dns_lookups

ROOT = Path(__file__).resolve().parent.parent
SHIPPED_CONFIG = ROOT / "config.toml"
CORPUS = ROOT.parent / "shared" / "corpus"

PG_ENV = "INTAKE_TEST_POSTGRES"  # a server URL to use instead of looking for one


# -- DNS -------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def stub_dns(monkeypatch: pytest.MonkeyPatch) -> dns_lookups.StaticResolver:
    """Every test's DNS (sender authentication): these records only, none unless a test adds them
    (``stub_dns.records[name] = [...]``); ``stub_dns.lookups`` lists what was asked. Autouse, so
    no in-process test can reach real DNS; dnspython asking anything but a test's own loopback
    server fails too."""
    import ipaddress

    import dns.resolver

    resolver = dns_lookups.StaticResolver()
    monkeypatch.setattr(dns_lookups, "system_resolver", lambda config: resolver)
    resolve = dns.resolver.Resolver.resolve

    def loopback_only(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        # A test's own server: loopback, not port 53 (a local caching resolver forwards outside).
        if self.port == 53 or not all(ipaddress.ip_address(str(ns)).is_loopback for ns in self.nameservers):
            raise dns.resolver.NoNameservers("tests never query real DNS (use the stub_dns fixture)")
        return resolve(self, *args, **kwargs)

    monkeypatch.setattr(dns.resolver.Resolver, "resolve", loopback_only)
    return resolver


# -- PostgreSQL ------------------------------------------------------------------------------


def _reachable(url: str) -> bool:
    try:
        with psycopg.connect(url, connect_timeout=3):
            return True
    except psycopg.Error:
        return False


class ThrowawayPostgres(NamedTuple):
    url: str
    stop: Callable[[], None]  # immediate, as a crash of the server
    start: Callable[[], None]  # again: same data, same port
    directory: Path  # remove it once stopped for good


def _throwaway_postgres(base: Path) -> ThrowawayPostgres | None:
    """Start a private PostgreSQL with initdb/pg_ctl when they are installed; None otherwise."""
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin")) if Path("/usr/lib/postgresql").exists() else []
    bindir = next((d for d in reversed(candidates) if (d / "initdb").exists()), None)
    initdb = bindir / "initdb" if bindir else shutil.which("initdb")
    pg_ctl = bindir / "pg_ctl" if bindir else shutil.which("pg_ctl")
    if not initdb or not pg_ctl:
        return None
    prefix: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root
        if not shutil.which("runuser"):
            return None
        prefix = ["runuser", "-u", "postgres", "--"]
        # Not under pytest's temporary folder: it is private to root, and the server runs as postgres.
        base = Path(tempfile.mkdtemp(prefix="intake-test-pg-"))
        shutil.chown(base, "postgres")
    data = base / "data"
    port = free_port()
    subprocess.run([*prefix, str(initdb), "-D", str(data), "-U", "postgres", "--auth=trust"], check=True,
                   capture_output=True)

    def start() -> None:
        subprocess.run([*prefix, str(pg_ctl), "-D", str(data), "-w", "-l", str(base / "log"), "-o",
                        f"-p {port} -k {base} -c listen_addresses=127.0.0.1", "start"], check=True,
                       capture_output=True)

    def stop() -> None:
        subprocess.run([*prefix, str(pg_ctl), "-D", str(data), "-m", "immediate", "stop"], capture_output=True)

    start()
    return ThrowawayPostgres(f"postgresql://postgres@127.0.0.1:{port}/postgres", stop, start, base)


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of a PostgreSQL server: $INTAKE_TEST_POSTGRES, the local one, or a throwaway."""
    for url in filter(None, [os.environ.get(PG_ENV), "postgresql://postgres@127.0.0.1:5432/postgres"]):
        if _reachable(url):
            yield url
            return
    started = _throwaway_postgres(tmp_path_factory.mktemp("pg"))
    if started is None:
        pytest.skip("PostgreSQL tests skipped: no server on 127.0.0.1:5432 and no initdb/pg_ctl to start one")
    try:
        yield started.url
    finally:
        started.stop()
        shutil.rmtree(started.directory, ignore_errors=True)


def _fresh_postgres_database(server_url: str, template: str | None = None) -> tuple[str, callable]:
    """A new database, empty or a copy of *template* (a database name on the same server)."""
    name = f"intake_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else ""))
    url = server_url.rsplit("/", 1)[0] + f"/{name}"

    def drop() -> None:
        with psycopg.connect(server_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    return url.replace("postgresql://", "postgresql+psycopg://", 1), drop


# Schemas are made by the migrations, as in production, once per session: each test's database
# is a copy of a template at head (a file copy, CREATE DATABASE ... TEMPLATE), not a migration run.


def _migrate(url: str) -> None:
    engine = make_engine(url)
    try:
        schema.upgrade(engine)
    finally:
        engine.dispose()  # a PostgreSQL template must have no connections to be copied


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("template") / "intake.db"
    _migrate(f"sqlite:///{path}")
    return path


@pytest.fixture(scope="session")
def postgres_template(postgres_server: str) -> Iterator[str]:
    url, drop = _fresh_postgres_database(postgres_server)
    _migrate(url)
    try:
        yield url.rsplit("/", 1)[1]
    finally:
        drop()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Every test that asks for a database runs on a fresh SQLite file and a fresh PostgreSQL
    database, both with the schema at head."""
    if request.param == "sqlite":
        yield request.getfixturevalue("sqlite_url")
        return
    url, drop = _fresh_postgres_database(request.getfixturevalue("postgres_server"),
                                         request.getfixturevalue("postgres_template"))
    try:
        yield url
    finally:
        drop()


@pytest.fixture
def sqlite_url(tmp_path: Path, sqlite_template: Path) -> str:
    shutil.copy(sqlite_template, tmp_path / "intake.db")
    return f"sqlite:///{tmp_path / 'intake.db'}"


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def empty_database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A database with nothing in it, not even a schema: for the migrations' own tests."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'empty.db'}"
        return
    url, drop = _fresh_postgres_database(request.getfixturevalue("postgres_server"))
    try:
        yield url
    finally:
        drop()


# -- configuration ---------------------------------------------------------------------------


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    """A copy of the shipped config.toml in the test's own folder."""
    path = tmp_path / "config.toml"
    shutil.copy(SHIPPED_CONFIG, path)
    return path


@pytest.fixture
def cli(config_file: Path):
    """Run the intake CLI on the test's config file; asserts the exit code (0 unless *code* says)."""
    runner = CliRunner()

    def run(*args: str, code: int = 0):  # type: ignore[no-untyped-def]
        result = runner.invoke(main, ["--config", str(config_file), *args], catch_exceptions=False)
        assert result.exit_code == code, result.output
        return result

    return run


@pytest.fixture
def make_settings(config_file: Path, monkeypatch: pytest.MonkeyPatch, database_url: str):
    """Settings from the shipped config plus INTAKE_* overrides, as an operator would give them.

    A module that needs only SQLite overrides the ``database_url`` fixture with ``sqlite_url``."""

    def make(**env: str) -> Settings:
        for key in [k for k in os.environ if k.startswith("INTAKE_")]:
            monkeypatch.delenv(key)
        defaults = {
            "INTAKE_DATABASE__URL": database_url,
            "INTAKE_SMTP__LISTEN": "127.0.0.1:0",
            "INTAKE_OUTBOUND__MAILDIR": str(config_file.parent / "outbox"),
        }
        for key, value in {**defaults, **env}.items():
            monkeypatch.setenv(key, value)
        return load_settings(config_file)

    return make


# -- running parts ---------------------------------------------------------------------------


class LoopThread:
    """An asyncio event loop in a background thread, for servers the test talks to over TCP."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coroutine, timeout: float = 30):  # type: ignore[no-untyped-def]
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


@dataclass
class RunningListener:
    settings: Settings
    engine: object
    port: int
    committer: GroupCommitter
    stop: callable  # close connections, the loop and the writer; the fixture does it at the end
    handler: IntakeHandler | None = None  # the listener's hooks: its memory budget, for instance


@pytest.fixture
def start_intake_listener():
    """Start the real listener (group commit included) on a free loopback port."""
    stops: list[callable] = []

    def start(settings: Settings, engine=None) -> RunningListener:  # type: ignore[no-untyped-def]
        engine = engine or make_engine(settings.database_url, settings.database.busy_timeout)
        schema.upgrade(engine)  # as `intake serve` does; a no-op on the template copies
        committer = GroupCommitter(engine)
        loop = LoopThread()
        listener = loop.run(start_listener(settings, committer))
        stopped: list[bool] = []

        def stop() -> None:
            if not stopped:
                stopped.append(True)
                loop.run(listener.close_connections())
                loop.stop()
                committer.close()

        stops.append(stop)
        return RunningListener(settings, engine, listener.port, committer, stop, listener.handler)

    yield start
    for stop in stops:
        stop()


@dataclass
class Captured:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes


@dataclass
class SinkHandler:
    """A relay stand-in. `replies` is consumed one per DATA (e.g. ['451 4.3.0 busy']); then 250."""

    messages: list[Captured] = field(default_factory=list)
    replies: list[str] = field(default_factory=list)
    sessions: int = 0  # EHLOs seen: each is a client's session

    async def handle_EHLO(self, server, session, envelope, hostname, responses):  # type: ignore[no-untyped-def]
        self.sessions += 1
        session.host_name = hostname
        return responses

    async def handle_DATA(self, server, session, envelope):  # type: ignore[no-untyped-def]
        if self.replies:
            return self.replies.pop(0)
        self.messages.append(Captured(envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content))
        return "250 2.0.0 OK"


@dataclass
class Sink:
    handler: SinkHandler
    port: int

    @property
    def messages(self) -> list[Captured]:
        return self.handler.messages

    def wait_for(self, count: int, timeout: float = 30.0) -> list[Captured]:
        deadline = time.monotonic() + timeout
        while len(self.messages) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        return list(self.messages)


@pytest.fixture
def sink() -> Iterator[Sink]:
    """A real SMTP server on 127.0.0.1 capturing whatever the outbox relays to it."""
    handler = SinkHandler()
    port = free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port, enable_SMTPUTF8=True)
    controller.start()
    try:
        yield Sink(handler, port)
    finally:
        controller.stop()


# -- helpers ---------------------------------------------------------------------------------


_PORTS_GIVEN: set[int] = set()


def free_port() -> int:
    """A loopback port nothing listens on, never the same one twice in a run: the kernel can hand
    out a just-closed ephemeral port again, and a test that asks for two (SMTP and metrics) got
    one port for both."""
    while True:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if port not in _PORTS_GIVEN:
            _PORTS_GIVEN.add(port)
            return port


def report(subject: str = "XSS in the login form", sender: str = "alice@researcher.test",
           message_id: str | None = None, body: str = "Steps to reproduce:\n1. ...\n",
           **headers: str) -> EmailMessage:
    message = EmailMessage()
    message["From"] = f"Alice Researcher <{sender}>"
    message["To"] = "security@example.com"
    message["Subject"] = subject
    message["Message-ID"] = message_id or f"<{uuid.uuid4().hex}@researcher.test>"
    for name, value in headers.items():
        message[name.replace("_", "-")] = value
    message.set_content(body)
    return message


def smtp_send(port: int, message: EmailMessage | bytes, mail_from: str = "alice@researcher.test",
              rcpt_tos: list[str] | None = None) -> dict:
    # smtplib sends bytes as they are: line endings must already be CRLF, as on the wire.
    data = message if isinstance(message, bytes) else message.as_bytes(policy=message.policy.clone(linesep="\r\n"))
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        return client.sendmail(mail_from, rcpt_tos or ["security@example.com"], data)


def all_tickets(engine) -> list:  # type: ignore[no-untyped-def]
    """Every ticket, oldest first."""
    with read_session(engine) as session:
        return list(session.scalars(select(Ticket).order_by(Ticket.received_at, Ticket.id)))


def process(settings: Settings, engine, now: datetime | None = None) -> processor.BatchResult:  # type: ignore[no-untyped-def]
    return processor.process_all(engine, settings, now or datetime.now(timezone.utc))


def deliver_outbox(settings: Settings, engine, now: datetime | None = None) -> dict[str, int]:  # type: ignore[no-untyped-def]
    """Run the real outbox sender until nothing is due at *now*."""
    sender = OutboxSender(engine, settings, make_transport(settings), on_undelivered=undeliverable.record)
    totals: dict[str, int] = {}

    async def drain() -> None:
        while counts := await sender.send_due(now or datetime.now(timezone.utc)):
            for key, value in counts.items():
                totals[key] = totals.get(key, 0) + value

    asyncio.run(drain())
    return totals


# -- sender authentication -------------------------------------------------------------------

TRUSTED_MX = "mx.example.com"  # list it in [sender_auth] trusted_authserv_ids to believe trusted_results()


def trusted_results(domain: str) -> str:
    """The Authentication-Results header our MX adds to mail from *domain* that passed DMARC."""
    return f"{TRUSTED_MX}; dkim=pass header.d={domain}; dmarc=pass header.from={domain}"


