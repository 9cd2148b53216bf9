"""Several `intake serve` nodes on one PostgreSQL database, each on its own loopback port (think:
several MX hosts), all relaying to one sink: each report is one ticket with one acknowledgement,
a copy delivered to two nodes is a `duplicate`, the nodes' processors share the pending messages
(each claims its own, and a node killed with claims leaves them to the others after its lease),
and sweeps on every node remind once."""

from __future__ import annotations

import email
import email.policy
import os
import re
import shutil
import smtplib
import socket
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path

import psycopg
import pytest

from conftest import SHIPPED_CONFIG, _fresh_postgres_database, free_port, report, smtp_send
from intake.store import inbound
from intake.store.db import make_engine
from test_serve import MONTH_POLICY, Serve

pytestmark = [pytest.mark.slow, pytest.mark.postgres]


@pytest.fixture
def pg_url(postgres_server: str, postgres_template: str):
    url, drop = _fresh_postgres_database(postgres_server, postgres_template)
    yield url
    drop()


def pg_query(url: str, sql: str) -> list[tuple]:
    with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://", 1)) as connection:
        return connection.execute(sql).fetchall()


@pytest.fixture
def nodes(tmp_path: Path, sink, pg_url: str):
    """A factory of N `intake serve` nodes on *pg_url*, each with its own config folder and port."""
    started: list[Serve] = []

    def make(count: int, config_extra: str = "", **env: str) -> list[Serve]:
        base = {k: v for k, v in os.environ.items() if not k.startswith(("INTAKE_", "NOTIFY_SOCKET", "WATCHDOG_"))}
        base.update({
            "INTAKE_DATABASE__URL": pg_url,
            "INTAKE_OUTBOUND__TRANSPORT": "smtp",
            "INTAKE_OUTBOUND__RELAY": f"127.0.0.1:{sink.port}",
            "INTAKE_OUTBOUND__TIMEOUT": "3",
            "INTAKE_OUTBOUND__POLL_INTERVAL": "0.2",
            "INTAKE_PROCESSING__POLL_INTERVAL": "0.2",
            **env,
        })
        for _ in range(count):
            folder = tmp_path / f"node{len(started)}"
            folder.mkdir()
            config = folder / "config.toml"
            shutil.copy(SHIPPED_CONFIG, config)
            config.write_text(config.read_text() + config_extra)
            port = free_port()
            # Each node its own SMTP and metrics port, as on separate hosts.
            server = Serve(config, {**base, "INTAKE_SMTP__LISTEN": f"127.0.0.1:{port}",
                                    "INTAKE_METRICS__LISTEN": f"127.0.0.1:{free_port()}"}, port)
            started.append(server)
        for server in started[-count:]:
            server.start()
        return started[-count:]

    yield make
    for server in started:
        if server.process and server.process.poll() is None:
            server.kill_hard()


def _wait(predicate, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def _send_all(port: int, batch: list[tuple[str, bytes]], accepted: list[str]) -> None:
    """One client session per batch; every message must get its 250."""
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as client:
        for message_id, data in batch:
            sender = email.message_from_bytes(data)["From"].split("<")[1].rstrip(">")
            client.sendmail(sender, ["security@example.com"], data)
            accepted.append(message_id)


def test_three_nodes_1000_messages_one_ticket_and_one_acknowledgement_per_report(nodes, pg_url, sink):
    servers = nodes(3)
    distinct, copies = 900, 100  # 1,000 deliveries: the first 100 reports go to two nodes each
    messages = []
    for n in range(distinct):
        # Distinct researchers: one address would (rightly) hit the automatic-reply rate limit.
        mid = f"<node-{n}-{uuid.uuid4().hex[:8]}@researcher.test>"
        messages.append((mid, report(subject=f"multi-node {n}", sender=f"r{n}@researcher.test",
                                     message_id=mid).as_bytes(policy=email.policy.SMTP)))
    # Delivery i goes to node i % 3; a copy goes to the next node, from another client at the same time.
    by_node: list[list[tuple[str, bytes]]] = [[] for _ in servers]
    for n, message in enumerate(messages):
        by_node[n % 3].append(message)
        if n < copies:
            by_node[(n + 1) % 3].append(message)
    # Four clients per node, each with its own session: 12 concurrent senders.
    batches = [(server.port, by_node[i][c::4]) for i, server in enumerate(servers) for c in range(4)]
    accepted: list[str] = []
    started = time.monotonic()
    with ThreadPoolExecutor(len(batches)) as pool:
        for future in [pool.submit(_send_all, port, batch, accepted) for port, batch in batches]:
            future.result(timeout=120)
    sending = time.monotonic() - started
    assert len(accepted) == distinct + copies

    # Every 250 is a stored row: each Message-ID as many times as it was accepted.
    stored = Counter(re.search(rb"Message-ID: (<[^>]+>)", bytes(raw)).group(1).decode()
                     for (raw,) in pg_query(pg_url, "SELECT raw FROM inbound_raw"))
    assert stored == Counter(accepted)

    _wait(lambda: pg_query(pg_url, "SELECT count(*) FROM outbox WHERE status = 'sent'")[0][0] >= distinct
              and not pg_query(pg_url, "SELECT 1 FROM inbound_message WHERE status = 'pending' LIMIT 1"),
          120, "every acknowledgement to be sent")
    time.sleep(1)  # a few more polls on every node: nothing more may be sent
    for server in servers:
        assert server.stop() == 0
    processing = time.monotonic() - started

    decisions = Counter(dict(pg_query(pg_url, "SELECT decision, count(*) FROM inbound_message GROUP BY decision")))
    assert decisions == {"new-ticket": distinct, "duplicate": copies}
    reports = Counter(mid for (mid,) in pg_query(pg_url, "SELECT message_id FROM thread_entry WHERE kind = 'report'"))
    assert reports == Counter(mid for mid, _ in messages)  # one ticket per report, none twice

    # References: unique (a unique key), and without gaps: the counter is raised in the transaction
    # that writes the tickets, so a transaction that loses a race rolls its numbers back too.
    references = [r for (r,) in pg_query(pg_url, "SELECT reference FROM ticket")]
    numbers = sorted(int(r.rsplit("-", 1)[1]) for r in references)
    assert len(set(references)) == distinct and numbers == list(range(1, distinct + 1))

    acknowledged = Counter(email.message_from_bytes(m.data)["In-Reply-To"] for m in sink.messages)
    assert acknowledged == Counter(mid for mid, _ in messages)  # exactly one each, nothing else
    assert len({email.message_from_bytes(m.data)["Message-ID"] for m in sink.messages}) == distinct
    for server in servers:
        assert "Traceback" not in server.log.read_text()
    print(f"3 nodes: {distinct + copies} deliveries sent in {sending:.1f} s, all acknowledged after {processing:.1f} s")


def test_sweeps_on_every_node_send_each_reminder_once(nodes, pg_url, sink):
    """Reports stored 16 days ago under a 30-day policy are past their 50% point when the nodes
    start; three schedulers sweep every second, and each reminder reaches the relay once."""
    count = 20
    engine = make_engine(pg_url)
    received = datetime.now(timezone.utc) - timedelta(days=16)
    inbound.store(engine, [inbound.Arrival(f"r{n}@researcher.test", ["security@example.com"], "127.0.0.1", "test",
                                           report(subject=f"old report {n}", sender=f"r{n}@researcher.test")
                                           .as_bytes(), received) for n in range(count)])
    engine.dispose()
    servers = nodes(3, config_extra=MONTH_POLICY, INTAKE_INTAKE__DEFAULT_POLICY="month", INTAKE_SCHEDULER__SWEEP_INTERVAL="1",
        INTAKE_SCHEDULER__QUIET_HOURS="false", INTAKE_SCHEDULER__MISFIRE_GRACE=str(7 * 86400),
        INTAKE_MAINTAINERS='[{"name": "Mia", "email": "mia@example.com"}]')

    def reminders() -> Counter[str]:
        subjects = (str(email.message_from_bytes(m.data, policy=email.policy.default)["Subject"])
                    for m in list(sink.messages))
        return Counter(s for s in subjects if " Reminder: " in s)

    _wait(lambda: len(reminders()) >= count, 60, "a reminder for every ticket")
    time.sleep(3)  # three more sweeps on each node: nothing more may arrive
    for server in servers:
        assert server.stop() == 0
    sent = reminders()
    by_ticket = Counter(subject.split("]")[0] + "]" for subject in sent.elements())
    assert by_ticket == {f"[SEC-{received.year}-{n:04d}]": 1 for n in range(1, count + 1)}, sent.most_common(3)
    keys = pg_query(pg_url, "SELECT key FROM notification WHERE kind = 'reminder'")
    assert len(keys) == count


def _store_reports(pg_url: str, count: int, tag: str) -> dict[int, str]:
    """*count* reports from distinct researchers stored straight into the database (as a node's
    listener stores them, but waking no worker: each finds them on its next poll); their
    Message-IDs by stored id."""
    message_ids = [f"<{tag}-{n}-{uuid.uuid4().hex[:8]}@researcher.test>" for n in range(count)]
    engine = make_engine(pg_url)
    ids = inbound.store(engine, [inbound.Arrival(f"r{n}@researcher.test", ["security@example.com"], "127.0.0.1",
                                                 "test", report(subject=f"{tag} {n}", sender=f"r{n}@researcher.test",
                                                                message_id=mid).as_bytes(policy=email.policy.SMTP),
                                                 datetime.now(timezone.utc))
                                 for n, mid in enumerate(message_ids)])
    engine.dispose()
    return dict(zip(ids, message_ids))


def _processor(claimed_by: str) -> str:
    """The host/pid part of a claim's owner: one per worker process (the rest names its batch)."""
    return claimed_by.rsplit("/", 1)[0]


def _acknowledged(sink) -> Counter[str]:  # type: ignore[no-untyped-def]
    return Counter(email.message_from_bytes(m.data)["In-Reply-To"] for m in list(sink.messages))


def test_two_nodes_share_200_pending_messages_each_acted_on_once(nodes, pg_url, sink):
    servers = nodes(2, INTAKE_PROCESSING__BATCH_SIZE="20")
    # Warm up both workers (imports, parse helper): a report to each node wakes that node's worker
    # at once (the other polls), until both have acted on one.
    workers: set[str] = set()
    for attempt in range(10):
        for server in servers:
            smtp_send(server.port, report(subject=f"warm-up {attempt}", sender=f"w{attempt}@researcher.test"))
        _wait(lambda: not pg_query(pg_url, "SELECT 1 FROM inbound_message WHERE status = 'pending'"), 60,
              "the warm-up reports to be processed")
        workers = {_processor(owner) for (owner,) in pg_query(pg_url, "SELECT claimed_by FROM inbound_message")}
        if len(workers) == 2:
            break
    assert len(workers) == 2, "both nodes' workers should have acted on a warm-up report"

    stored = _store_reports(pg_url, 200, "shared")
    _wait(lambda: set(stored.values()) <= set(_acknowledged(sink)), 120, "every report to be acknowledged")
    time.sleep(1)  # a few more polls on both nodes: nothing more may be sent
    for server in servers:
        assert server.stop() == 0

    rows = pg_query(pg_url, f"SELECT id, status, decision, claimed_by, claimed_until FROM inbound_message "
                            f"WHERE id >= {min(stored)}")
    assert {(status, decision, until) for _, status, decision, _, until in rows} == {("processed", "new-ticket", None)}
    shares = Counter(_processor(owner) for _, _, _, owner, _ in rows)
    assert set(shares) == workers and min(shares.values()) > 0, shares  # both did a share, neither all
    reports = Counter(mid for (mid,) in pg_query(pg_url, "SELECT message_id FROM thread_entry WHERE kind = 'report'"))
    assert all(reports[mid] == 1 for mid in stored.values())
    acknowledged = _acknowledged(sink)
    assert all(acknowledged[mid] == 1 for mid in stored.values())
    print(f"2 nodes: acted on {dict(shares)}")


def test_a_node_killed_mid_batch_leaves_its_claims_to_the_other_after_the_lease(nodes, pg_url, sink):
    """Node A claims a batch of up to 200 messages and is killed (-9, the whole process group)
    part way through; node B, running beside it, takes over what A held once A's claim has run
    out, and acts on it: nothing lost, nothing twice."""
    lease = {"INTAKE_PROCESSING__CLAIM_LEASE": "10", "INTAKE_PROCESSING__PARSE_TIMEOUT": "5",
             "INTAKE_OUTBOUND__RETRY_INITIAL": "0.5"}
    # A's relay refuses connections: none of its mail leaves, so a kill mid-send cannot send twice.
    [node_a] = nodes(1, INTAKE_PROCESSING__BATCH_SIZE="200", INTAKE_PROCESSING__MESSAGES_PER_TRANSACTION="2",
                     INTAKE_OUTBOUND__RELAY=f"127.0.0.1:{free_port()}", **lease)
    [node_b] = nodes(1, INTAKE_PROCESSING__BATCH_SIZE="20", **lease)
    for node in (node_a, node_b):
        _wait(lambda: "event=worker-ready" in node.log.read_text(), 60, "the workers to start")
    a_pid = re.search(r"event=worker-started pid=(\d+)", node_a.log.read_text()).group(1)
    a_claims = f"claimed_by LIKE '{socket.gethostname()}/{a_pid}/%'"
    stored = _store_reports(pg_url, 200, "killed")
    _wait(lambda: pg_query(pg_url, f"SELECT count(*) FROM inbound_message WHERE status <> 'pending' AND {a_claims}")
          [0][0] >= 6, 60, "node A to act on a few messages")
    node_a.kill_hard()
    killed_at = datetime.now(timezone.utc)
    held = dict(pg_query(pg_url, "SELECT id, claimed_until FROM inbound_message "
                                 f"WHERE status = 'pending' AND {a_claims}"))
    assert held and min(held.values()) > killed_at, "node A should have died holding live claims"

    _wait(lambda: set(stored.values()) <= set(_acknowledged(sink)), 120, "every report to be acknowledged")
    time.sleep(1)
    assert node_b.stop() == 0

    rows = {id_: (status, decision, owner, processed_at) for id_, status, decision, owner, processed_at in
            pg_query(pg_url, "SELECT id, status, decision, claimed_by, processed_at FROM inbound_message")}
    assert {rows[i][:2] for i in stored} == {("processed", "new-ticket")}
    for id_, until in held.items():  # taken over by B, and only once A's claim had run out
        assert _processor(rows[id_][2]) != f"{socket.gethostname()}/{a_pid}" and rows[id_][3] > until
    assert "event=claims-reclaimed" in node_b.log.read_text()
    reports = Counter(mid for (mid,) in pg_query(pg_url, "SELECT message_id FROM thread_entry WHERE kind = 'report'"))
    assert all(reports[mid] == 1 for mid in stored.values())
    assert pg_query(pg_url, "SELECT count(*) FROM ticket")[0][0] == 200
    acknowledged = _acknowledged(sink)
    assert all(acknowledged[mid] == 1 for mid in stored.values())
