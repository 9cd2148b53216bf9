"""A store that hangs (a lock held for ever, a stuck disk): the client waits at most
``smtp.store_timeout`` and hears ``451``; a commit that lands after that 451 and the client's
retry make one ticket and one acknowledgement; the store is reported stuck while it hangs.

The hang is real: another connection holds the database's write lock (SQLite, PostgreSQL) or
intake's writer flock, longer than the configured time limit and shorter than the busy timeout.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import re
import smtplib
import threading
import time
import urllib.error
import urllib.request

import pytest
from sqlalchemy import select

import test_serve
from conftest import all_tickets, free_port, process
from intake.run import metrics
from intake.store.db import read_session
from intake.store.models import InboundMessage, Outbox
from intake.vocabulary import DUPLICATE, NEW_TICKET, MailKind
from test_faults import holding_the_lock
from test_listener import message_bytes, stored_rows
from test_serve import NotifyListener, _query

serve, serve_env = test_serve.serve, test_serve.serve_env  # fixtures

# smtp.store_timeout here: room for a second client to reach DATA while the first one's commit
# hangs; the lock waits (busy_timeout) are far longer.
TIME_LIMIT = 2.0


def _reply(port: int, message: bytes) -> int:
    """The reply code to *message* on a new session (451 is an answer, not an error)."""
    # The client's own patience is under the busy timeout: without a time limit of ours it gives up first.
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as client:
        try:
            client.sendmail("alice@researcher.test", ["security@example.com"], message)
        except smtplib.SMTPDataError as refused:
            assert refused.smtp_error.startswith(b"4.3.0"), refused
            return refused.smtp_code
    return 250


def _wait_until(condition, timeout: float = 30) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def _without_message_id(marker: str) -> bytes:
    """A message the duplicate rule can know again only by its bytes."""
    return re.sub(rb"Message-ID: [^\r]*\r\n", b"", message_bytes(marker))


def test_a_hung_commit_gets_451_in_time_and_its_late_landing_plus_the_retry_make_one_ticket(
        make_settings, start_intake_listener, database_url, caplog):
    settings = make_settings(INTAKE_DATABASE__BUSY_TIMEOUT="60", INTAKE_SMTP__STORE_TIMEOUT=str(TIME_LIMIT))
    running = start_intake_listener(settings)
    committer, engine = running.committer, running.engine
    timeouts_before = metrics.RECEIVED.labels("store-timeout")._value.get()
    hung, behind, later = _without_message_id("hung"), message_bytes("behind"), message_bytes("later")
    watch = metrics.StoreWatch(committer.stalled, TIME_LIMIT)
    loop = asyncio.new_event_loop()
    health = metrics.Health(loop, engine, lambda: True, lambda: True, 3600.0, store=watch)
    caplog.set_level(logging.INFO)
    replies: dict[str, int] = {}
    with holding_the_lock(database_url), smtplib.SMTP("127.0.0.1", running.port, timeout=20) as second:
        # The second client gets as far as DATA first: then it is queued well within the time limit.
        second.ehlo()
        second.mail("bob@researcher.test")
        second.rcpt("security@example.com")
        first = threading.Thread(target=lambda: replies.update(hung=_reply(running.port, hung)))
        first.start()
        _wait_until(lambda: committer.stalled() > 0)  # its commit has begun, and hangs
        replies["behind"] = second.data(behind)[0]  # queued behind it, given up on in time
        first.join(30)
        assert replies == {"hung": 451, "behind": 451}
        # The store is stuck, and says so.
        assert watch.check()
        assert "event=store-stuck" in caplog.text
        ready, checks = health.ready()
        assert not ready and checks["store"].startswith("stuck: the listener's commit has run"), checks
        # Mail arriving now is not queued behind the hung commit: 451 at once.
        assert _reply(running.port, later) == 451
        assert "the store is stuck" in caplog.text
    # The lock is gone: the hung commit lands after all, its client having heard 451. The message
    # queued behind it is not stored: its client heard 451 before the writer took it up.
    _wait_until(lambda: committer.stalled() == 0)
    assert [bytes(row["raw"]) for row in stored_rows(engine)] == [hung]
    assert "event=stored-after-timeout" in caplog.text and "event=store-dropped messages=1" in caplog.text
    assert not watch.check() and "event=store-recovered" in caplog.text
    assert health.ready()[1]["store"] == "ok"
    loop.close()
    assert metrics.RECEIVED.labels("store-timeout")._value.get() - timeouts_before == 3
    # Each client sends its message again, as a client does after a 451.
    assert [_reply(running.port, message) for message in (hung, behind, later)] == [250, 250, 250]
    assert [bytes(row["raw"]) for row in stored_rows(engine)] == [hung, hung, behind, later]

    process(settings, engine)
    with read_session(engine) as session:
        decisions = list(session.scalars(select(InboundMessage.decision).order_by(InboundMessage.id)))
        acknowledgements = list(session.scalars(select(Outbox.ticket_id)
                                                .where(Outbox.kind == MailKind.ACKNOWLEDGEMENT)))
    assert decisions == [NEW_TICKET, DUPLICATE, NEW_TICKET, NEW_TICKET]  # the hung one's copy: by its bytes
    tickets = all_tickets(engine)
    assert sorted(t.subject for t in tickets) == ["report behind", "report hung", "report later"]
    assert sorted(acknowledgements) == sorted(t.id for t in tickets)  # one each


def _scrape(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def _gauge(text: str, name: str) -> float:
    return float(re.search(rf"^{re.escape(name)} (\S+)$", text, re.M).group(1))


@pytest.mark.slow
def test_intake_serve_stops_its_watchdog_pings_while_a_commit_hangs_and_says_why(serve, serve_env, sink, tmp_path):
    notify_path = tmp_path / "notify.sock"
    notify = NotifyListener(notify_path)
    metrics_port = free_port()
    serve_env.update(NOTIFY_SOCKET=str(notify_path), WATCHDOG_USEC="400000",  # a check and a ping every 0.2 s
                     INTAKE_METRICS__LISTEN=f"127.0.0.1:{metrics_port}", INTAKE_DATABASE__BUSY_TIMEOUT="60",
                     INTAKE_SMTP__STORE_TIMEOUT="1", INTAKE_SERVICE__SHUTDOWN_GRACE="2")
    server = serve()
    server.start()
    database = serve_env["INTAKE_DATABASE__URL"]
    notify.wait_for(lambda m: m == "WATCHDOG=1")
    pings = lambda: sum(m == "WATCHDOG=1" for m in list(notify.messages))  # noqa: E731
    report = message_bytes("during-hang")
    # A writer frozen inside a write holds intake's writer lock (as test_faults does).
    with open(database.removeprefix("sqlite:///") + ".writer", "a+b") as frozen_writer:
        fcntl.flock(frozen_writer, fcntl.LOCK_EX)
        assert _reply(server.port, report) == 451
        test_serve._wait_for_log(server, "event=store-stuck")
        pinged = pings()
        status, body = _scrape(metrics_port, "/readyz")
        assert status == 503 and '"store": "stuck: ' in body, body
        text = _scrape(metrics_port, "/metrics")[1]
        assert _gauge(text, "intake_store_stuck") == 1
        stalled = _gauge(text, "intake_store_stalled_seconds")
        assert stalled > 1
        assert _gauge(text, 'intake_messages_received_total{result="store-timeout"}') == 1
        # Five more checks' worth of hanging: no ping (one may have been on its way when counted).
        _wait_until(lambda: _gauge(_scrape(metrics_port, "/metrics")[1], "intake_store_stalled_seconds") > stalled + 1)
        assert pings() <= pinged + 1
        fcntl.flock(frozen_writer, fcntl.LOCK_UN)
    test_serve._wait_for_log(server, "event=store-recovered")
    pinged = pings()
    notify.wait_for(lambda m: pings() > pinged)  # pinging again
    assert _scrape(metrics_port, "/readyz")[0] == 200
    assert _reply(server.port, report) == 250  # the client's retry
    # Both copies processed, the outbox empty: one acknowledgement went out.
    _wait_until(lambda: _query(database, "SELECT count(*) FROM inbound_message WHERE status = 'pending'") == [(0,)]
                and _query(database, "SELECT count(*) FROM outbox WHERE status = 'pending'") == [(0,)], 60)
    assert _query(database, "SELECT decision FROM inbound_message ORDER BY id") == [(NEW_TICKET,), (DUPLICATE,)]
    assert len(sink.messages) == 1
    # Stopped while a commit hangs: the stop does not wait for it for ever (that message got 451).
    with open(database.removeprefix("sqlite:///") + ".writer", "a+b") as frozen_writer:
        fcntl.flock(frozen_writer, fcntl.LOCK_EX)
        assert _reply(server.port, message_bytes("at-stop")) == 451
        assert server.stop() == 0
    assert "event=commit-thread-stuck-at-stop" in server.log.read_text()
    notify.close()
