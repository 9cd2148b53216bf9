"""`intake serve` as a real subprocess: systemd notify protocol, clean SIGTERM, and kill -9."""

from __future__ import annotations

import email
import email.policy
import json
import os
import signal
import smtplib
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path

import psycopg
import pytest
from aiosmtpd.controller import Controller

from conftest import SinkHandler, free_port, report
from intake.run.worker import WORKER_NICENESS
from intake.store import inbound, schema
from intake.store.db import make_engine

pytestmark = pytest.mark.slow
INTAKE = Path(sys.executable).parent / "intake"


class Serve:
    """One `intake serve` process on a fixed loopback port."""

    def __init__(self, config: Path, env: dict[str, str], port: int):
        self.config, self.env, self.port = config, env, port
        self.process: subprocess.Popen | None = None
        self.log = config.parent / "serve.log"

    def start(self) -> None:
        with open(self.log, "ab") as log:
            # Own process group: kill -9 of the group is a crash of the whole service.
            self.process = subprocess.Popen([str(INTAKE), "--config", str(self.config), "serve"], env=self.env,
                                            stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log.read_text()
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as probe:
                    if probe.recv(100).startswith(b"220"):
                        return
            except OSError:
                time.sleep(0.05)
        raise AssertionError("intake serve did not start listening:\n" + self.log.read_text())

    def kill_hard(self) -> None:
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    def stop(self, timeout: float = 30) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)


@pytest.fixture
def serve_env(tmp_path: Path, sink, sqlite_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("INTAKE_", "NOTIFY_SOCKET", "WATCHDOG_"))}
    env.update({
        "INTAKE_DATABASE__URL": sqlite_url,
        "INTAKE_SMTP__LISTEN": f"127.0.0.1:{free_port()}",
        "INTAKE_OUTBOUND__TRANSPORT": "smtp",
        "INTAKE_OUTBOUND__RELAY": f"127.0.0.1:{sink.port}",
        "INTAKE_OUTBOUND__TIMEOUT": "3",
        "INTAKE_OUTBOUND__POLL_INTERVAL": "0.2",
        "INTAKE_PROCESSING__POLL_INTERVAL": "0.2",
    })
    return env


@pytest.fixture
def serve(config_file: Path, serve_env: dict[str, str]):
    servers: list[Serve] = []

    def make() -> Serve:
        server = Serve(config_file, serve_env, int(serve_env["INTAKE_SMTP__LISTEN"].rsplit(":", 1)[1]))
        servers.append(server)
        return server

    yield make
    for server in servers:
        if server.process and server.process.poll() is None:
            server.kill_hard()


def _query(database: str, sql: str) -> list[tuple]:
    if database.startswith("postgresql"):
        with psycopg.connect(database.replace("postgresql+psycopg://", "postgresql://", 1)) as conn:
            return conn.execute(sql).fetchall()
    path = database.removeprefix("sqlite:///")
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
        return conn.execute(sql).fetchall()


class NotifyListener:
    """What systemd does with $NOTIFY_SOCKET: read every datagram as it comes."""

    def __init__(self, path: Path):
        self.messages: list[str] = []
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._socket.bind(str(path))
        self._socket.settimeout(0.1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                self.messages.append(self._socket.recv(4096).decode())
            except TimeoutError:
                continue

    def wait_for(self, predicate, timeout: float = 30) -> None:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout
        while not any(predicate(m) for m in list(self.messages)):
            assert time.monotonic() < deadline, self.messages[-20:]
            time.sleep(0.02)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._socket.close()


def _child(parent: int) -> int:
    """The pid of *parent*'s multiprocessing child (the worker, or the worker's parse helper)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            command = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == parent and b"spawn_main" in command:
            return int(stat.parent.name)
    raise AssertionError(f"no multiprocessing child of {parent}")


def test_notify_protocol_and_clean_sigterm(serve, serve_env, sink, tmp_path):
    notify = NotifyListener(tmp_path / "notify.sock")
    serve_env.update(NOTIFY_SOCKET=str(tmp_path / "notify.sock"), WATCHDOG_USEC="400000")
    server = serve()
    server.start()
    notify.wait_for(lambda m: m.startswith("READY=1"))
    assert notify.messages[0].startswith("READY=1"), notify.messages

    with smtplib.SMTP("127.0.0.1", server.port) as client:
        client.send_message(report(message_id="<e2e@researcher.test>"))
    [ack] = sink.wait_for(1)
    parsed = email.message_from_bytes(ack.data, policy=email.policy.default)
    assert parsed["In-Reply-To"] == "<e2e@researcher.test>"

    # The listener keeps its CPU priority; the worker and (lowest) its parse helper yield to it.
    worker = _child(server.process.pid)
    helper = _child(worker)
    ours = os.nice(0)
    assert [os.getpriority(os.PRIO_PROCESS, pid) for pid in (server.process.pid, worker)] == [
        ours, min(19, ours + WORKER_NICENESS)]
    assert os.getpriority(os.PRIO_PROCESS, helper) == 19

    notify.wait_for(lambda m: m == "WATCHDOG=1")  # pinged from the event loop, every 0.2 s here
    assert server.stop() == 0
    notify.wait_for(lambda m: m.startswith("STOPPING=1"), timeout=5)
    notify.close()
    log = server.log.read_text()
    assert "event=stopped" in log
    assert "Traceback" not in log


def test_sigterm_finishes_in_flight_work(serve, serve_env):
    server = serve()
    server.start()
    sent = []
    with smtplib.SMTP("127.0.0.1", server.port) as client:
        for n in range(20):
            client.send_message(report(subject=f"burst {n}", message_id=f"<burst{n}@researcher.test>"))
            sent.append(f"<burst{n}@researcher.test>")
        server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(30) == 0
    stored = _query(serve_env["INTAKE_DATABASE__URL"], "SELECT count(*) FROM inbound_message")
    assert stored == [(20,)]  # every 250 was durable before the stop
    with pytest.raises(OSError):  # and the port is closed
        socket.create_connection(("127.0.0.1", server.port), timeout=1).close()


def _client(port: int, messages: list[tuple[str, str, bytes]], accepted: list[str], stop_at: float) -> None:
    """Send each message until it gets a 250, reconnecting across a server crash (like an MTA)."""
    index = 0
    while index < len(messages) and time.monotonic() < stop_at:
        try:
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
                while index < len(messages):
                    message_id, sender, data = messages[index]
                    client.sendmail(sender, ["security@example.com"], data)
                    accepted.append(message_id)
                    index += 1
        except (OSError, smtplib.SMTPException):
            time.sleep(0.1)  # server gone: retry the same message once it is back


def test_kill_9_under_load_loses_and_duplicates_nothing(serve, serve_env, sink, database_url):
    serve_env["INTAKE_DATABASE__URL"] = database_url  # SQLite, then PostgreSQL
    clients, per_client = 8, 30  # 240 messages
    server = serve()
    server.start()
    # Distinct researchers: one address would (rightly) hit the automatic-reply rate limit.
    batches = [[(f"<crash-{c}-{n}-{uuid.uuid4().hex[:6]}@researcher.test>", f"r{c}-{n}@researcher.test")
                for n in range(per_client)] for c in range(clients)]
    batches = [[(mid, sender, report(subject=f"crash test {mid}", sender=sender, message_id=mid).as_bytes())
                for mid, sender in batch] for batch in batches]
    accepted: list[str] = []
    stop_at = time.monotonic() + 120
    threads = [threading.Thread(target=_client, args=(server.port, batch, accepted, stop_at)) for batch in batches]
    for thread in threads:
        thread.start()
    while len(accepted) < 100 and time.monotonic() < stop_at:
        time.sleep(0.005)
    server.kill_hard()  # main process and worker, mid-stream
    killed_after = len(accepted)
    server.start()
    for thread in threads:
        thread.join(120)
    all_ids = {mid for batch in batches for mid, _, _ in batch}
    assert set(accepted) == all_ids, "clients could not deliver every message"
    assert 100 <= killed_after < len(all_ids)

    database = serve_env["INTAKE_DATABASE__URL"]
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        sent = _query(database, "SELECT count(*) FROM outbox WHERE status = 'sent'")[0][0]
        if sent >= len(all_ids):
            break
        time.sleep(0.2)
    assert server.stop() == 0

    reports = _query(database, "SELECT message_id FROM thread_entry WHERE kind = 'report'")
    assert Counter(mid for (mid,) in reports) == Counter(all_ids)  # one ticket per message, none twice
    assert _query(database, "SELECT count(*) FROM ticket") == [(len(all_ids),)]
    outbox_rows = _query(database, "SELECT message_id, status FROM outbox")
    assert len(outbox_rows) == len(all_ids) and {s for _, s in outbox_rows} == {"sent"}

    ack_ids = {mid for mid, _ in outbox_rows}
    delivered = Counter(email.message_from_bytes(m.data)["Message-ID"] for m in sink.messages)
    assert set(delivered) == ack_ids  # every acknowledgement arrived, nothing else did
    # A crash can land between the relay's 250 and our record of it (RFC 1047): at most the one
    # message in flight is sent again, with the same Message-ID.
    assert sum(delivered.values()) - len(delivered) <= 1, delivered.most_common(3)


def test_relay_down_for_a_while_then_back_each_acknowledgement_arrives_once(serve, serve_env, config_file):
    """Acknowledgements wait in the outbox, retried with backoff, while nothing listens at the relay's
    address; once a relay is there each arrives, once."""
    relay_port = free_port()  # nothing listens here yet
    serve_env.update(INTAKE_OUTBOUND__RELAY=f"127.0.0.1:{relay_port}", INTAKE_OUTBOUND__RETRY_INITIAL="1",
                     INTAKE_OUTBOUND__RETRY_MAX="2")
    server = serve()
    server.start()
    ids = [f"<relay-down-{n}@researcher.test>" for n in range(5)]
    started = time.monotonic()
    with smtplib.SMTP("127.0.0.1", server.port) as client:
        for n, mid in enumerate(ids):
            client.send_message(report(subject=f"relay down {n}", sender=f"r{n}@researcher.test", message_id=mid))

    def outbox() -> list[dict]:
        return json.loads(subprocess.run([str(INTAKE), "--config", str(config_file), "outbox", "--json"],
                                         env=serve_env, capture_output=True, text=True, timeout=60, check=True).stdout)

    # Until each has been tried again (bounded), however slowly a loaded machine gets there.
    listed = outbox()
    while (len(listed) < len(ids) or min(entry["attempts"] for entry in listed) < 2) and time.monotonic() < started + 60:
        time.sleep(0.5)
        listed = outbox()
    elapsed = time.monotonic() - started
    assert {entry["status"] for entry in listed} == {"pending"} and len(listed) == len(ids)
    assert all("relay unreachable" in entry["last_error"] for entry in listed)
    # Tried again, but on the backoff schedule (1 s, then 2 s): at most once a second, not at every 0.2 s poll.
    assert all(2 <= entry["attempts"] <= 1 + elapsed for entry in listed), ([e["attempts"] for e in listed], elapsed)

    relay = SinkHandler()
    controller = Controller(relay, hostname="127.0.0.1", port=relay_port)
    controller.start()
    try:
        deadline = time.monotonic() + 30
        while len(relay.messages) < len(ids) and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(2.5)  # past the longest backoff: nothing more may arrive
    finally:
        controller.stop()
    assert server.stop() == 0
    delivered = Counter(email.message_from_bytes(m.data)["In-Reply-To"] for m in relay.messages)
    assert delivered == Counter(ids)
    assert _query(serve_env["INTAKE_DATABASE__URL"], "SELECT DISTINCT status FROM outbox") == [("sent",)]


# What systemd does for a socket-activated service (sd_listen_fds(3)): the listening socket at
# file descriptor 3, LISTEN_FDS/LISTEN_FDNAMES, and LISTEN_PID set to the pid that execs intake.
_AS_SYSTEMD_WOULD = """
import os, sys
os.dup2(int(os.environ.pop("PASSED_FD")), 3)
os.environ.update(LISTEN_FDS="1", LISTEN_FDNAMES="smtp", LISTEN_PID=str(os.getpid()))
os.execv(sys.argv[1], sys.argv[1:])
"""


def test_socket_activation_serves_on_the_socket_systemd_passes(serve_env, config_file, sink):
    passed = socket.create_server(("127.0.0.1", 0))
    port = passed.getsockname()[1]
    configured_port = int(serve_env["INTAKE_SMTP__LISTEN"].rsplit(":", 1)[1])
    log_path = config_file.parent / "activated.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-c", _AS_SYSTEMD_WOULD, str(INTAKE), "--config", str(config_file), "serve"],
            # A limit below 35 MiB: serve logs check-config's warning about it at start.
            env={**serve_env, "PASSED_FD": str(passed.fileno()), "INTAKE_SMTP__MAX_MESSAGE_SIZE": "26214400"},
            pass_fds=(passed.fileno(),), stdout=log,
            stderr=log, start_new_session=True)
    passed.close()  # the service holds it now
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
            client.send_message(report(message_id="<activated@researcher.test>"))
        [ack] = sink.wait_for(1)
        assert email.message_from_bytes(ack.data)["In-Reply-To"] == "<activated@researcher.test>"
        with pytest.raises(OSError):  # smtp.listen was not bound: the passed socket replaces it
            socket.create_connection(("127.0.0.1", configured_port), timeout=1).close()
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    log_text = log_path.read_text()
    assert "event=socket-activation sockets=1" in log_text and "Traceback" not in log_text
    assert "logger=alembic" not in log_text  # its set-up lines at every start are noise
    assert any("event=config-warning" in line and "smtp.max_message_size is 26214400 bytes, below 36700160" in line
               for line in log_text.splitlines())


def test_a_notify_socket_nobody_reads_never_freezes_the_service(serve, serve_env, tmp_path):
    notify_path = tmp_path / "notify.sock"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))  # and never read: its queue fills after a few pings
    serve_env.update(NOTIFY_SOCKET=str(notify_path), WATCHDOG_USEC="20000")  # a ping every 10 ms
    server = serve()
    server.start()
    deadline = time.monotonic() + 20
    while "event=sd-notify-failed" not in server.log.read_text():  # the queue is full
        assert time.monotonic() < deadline, server.log.read_text()
        time.sleep(0.05)
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
        assert client.noop()[0] == 250  # the event loop still answers
    assert server.stop() == 0
    notify.close()


# A 30-day stage reminded at its half-way point: a report stored 16 days ago is due a reminder.
MONTH_POLICY = """
[policies.month]
calendar = "utc"
auto_ack_counts = true
remind = ["50%"]

[[policies.month.stages]]
name = "resolve"
duration = "30 days"
"""


def test_the_scheduler_in_serve_sends_a_real_reminder(serve, serve_env, sink, config_file):
    """`intake serve` sweeps every second: a report stored 16 days ago under a 30-day policy is
    past its 50% point, and the reminder arrives at the relay, once."""
    config_file.write_text(config_file.read_text() + MONTH_POLICY)
    serve_env.update(INTAKE_INTAKE__DEFAULT_POLICY="month", INTAKE_SCHEDULER__SWEEP_INTERVAL="1",
                     INTAKE_SCHEDULER__QUIET_HOURS="false", INTAKE_SCHEDULER__MISFIRE_GRACE=str(7 * 86400),
                     INTAKE_MAINTAINERS='[{"name": "Mia", "email": "mia@example.com"}]')
    engine = make_engine(serve_env["INTAKE_DATABASE__URL"])
    schema.upgrade(engine)
    received = datetime.now(timezone.utc) - timedelta(days=16)
    inbound.store(engine, [inbound.Arrival("alice@researcher.test", ["security@example.com"], "127.0.0.1", "test",
                                           report(subject="Old report").as_bytes(), received)])
    engine.dispose()
    server = serve()
    server.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not any(b"Reminder" in m.data for m in sink.messages):
        time.sleep(0.1)
    time.sleep(2)  # two more sweeps: nothing more may arrive
    assert server.stop() == 0
    subjects = Counter(str(email.message_from_bytes(m.data, policy=email.policy.default)["Subject"])
                       for m in sink.messages)
    reference = f"SEC-{received.year}-0001"
    [reminder] = [s for s in subjects if s.startswith(f"[{reference}] Reminder: resolve due")]
    assert subjects[reminder] == 1
    assert [m.rcpt_tos for m in sink.messages if b"Reminder" in m.data] == [["mia@example.com"]]
    assert f"[{reference}] New report: Old report" in subjects


def test_sighup_reloads_a_valid_configuration_and_survives_a_broken_one(serve, serve_env, config_file, sink):
    server = serve()
    server.start()
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
        assert client.ehlo()[0] == 250
        assert client.mail("alice@researcher.test")[0] == 250
        assert client.rcpt("psirt@example.com")[0] == 550  # not one of ours yet
    original = config_file.read_text()
    config_file.write_text(original.replace('addresses = ["security@example.com"]',
                                            'addresses = ["security@example.com", "psirt@example.com"]', 1))
    assert "psirt@example.com" in config_file.read_text()
    server.process.send_signal(signal.SIGHUP)
    _wait_for_log(server, "event=reloaded")
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
        client.sendmail("alice@researcher.test", ["psirt@example.com"], report(message_id="<reload@t>").as_bytes())
    [ack] = sink.wait_for(1)  # the restarted worker processed it
    assert email.message_from_bytes(ack.data)["In-Reply-To"] == "<reload@t>"

    config_file.write_text(original + "\n[nonsense]\nkey = 1\n")
    server.process.send_signal(signal.SIGHUP)
    _wait_for_log(server, "event=reload-refused")
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:  # still serving, on the last good config
        assert client.ehlo()[0] == 250
        assert client.mail("alice@researcher.test")[0] == 250
        assert client.rcpt("psirt@example.com")[0] == 250
    assert server.stop() == 0
    assert "Traceback" not in server.log.read_text()


def _wait_for_log(server, text: str, timeout: float = 30) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while text not in server.log.read_text():
        assert time.monotonic() < deadline and server.process.poll() is None, server.log.read_text()
        time.sleep(0.05)
