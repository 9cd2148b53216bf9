"""Claims on pending messages (intake.store.claims), on SQLite and PostgreSQL: processors take
distinct messages, in id order, up to a byte budget; a claim that ran out is taken over; a
processor whose claim was taken over acts on none of those messages; a live claim is renewed."""

from __future__ import annotations

import email.policy
import os
import socket
import subprocess
from collections import Counter
from datetime import datetime, timedelta, timezone

from sqlalchemy import func, select

from conftest import report
from intake.run import processor
from intake.store import claims, inbound
from intake.store.db import make_engine, read_session
from intake.store.models import InboundMessage, Outbox, ThreadEntry, Ticket
from intake.vocabulary import EntryKind

NOW = datetime(2026, 12, 3, 12, 0, tzinfo=timezone.utc)
LEASE = timedelta(minutes=1)


def _store(engine, raws: list[bytes]) -> list[int]:  # type: ignore[no-untyped-def]
    return inbound.store(engine, [inbound.Arrival(f"r{n}@researcher.test", ["security@example.com"], "127.0.0.1",
                                                  "test", raw, NOW) for n, raw in enumerate(raws)])


def _reports(count: int) -> list[bytes]:
    """*count* reports from distinct researchers (one ticket and one acknowledgement each)."""
    return [report(subject=f"claimed {n}", sender=f"r{n}@researcher.test").as_bytes(policy=email.policy.SMTP)
            for n in range(count)]


def _rows(engine) -> dict[int, InboundMessage]:  # type: ignore[no-untyped-def]
    with read_session(engine) as session:
        return {row.id: row for row in session.scalars(select(InboundMessage))}


def test_two_processors_claim_distinct_messages_in_order_and_a_run_out_claim_is_taken_over(make_settings):
    settings = make_settings()
    engine = make_engine(settings.database_url)
    ids = _store(engine, _reports(12))
    first = claims.claim(engine, "node-a/1/x", NOW, LEASE, 5, 1 << 20)
    second = claims.claim(engine, "node-b/2/y", NOW, LEASE, 5, 1 << 20)
    assert (first.ids, second.ids) == (ids[:5], ids[5:10])
    assert (first.reclaimed, second.reclaimed, first.full, second.full) == (0, 0, True, True)
    rows = _rows(engine)
    assert {rows[i].claimed_by for i in ids[:5]} == {"node-a/1/x"}
    assert {rows[i].claimed_until for i in ids[5:10]} == {NOW + LEASE}

    # Node A dies: nothing renews its claim; node B renews its own. Before A's runs out its
    # messages are left alone...
    assert claims.renew(engine, "node-b/2/y", ids, NOW + 2 * LEASE) == 5
    third = claims.claim(engine, "node-b/2/z", NOW + LEASE, LEASE, 10, 1 << 20)
    assert (third.ids, third.reclaimed, third.full) == (ids[10:], 0, False)
    # ...once it has, the next processor to look takes them, and says so.
    later = NOW + LEASE + timedelta(seconds=1)
    taken = claims.claim(engine, "node-b/2/w", later, LEASE, 10, 1 << 20)
    assert (taken.ids, taken.reclaimed) == (ids[:5], 5)
    assert claims.claim(engine, "node-c/3/v", later, LEASE, 10, 1 << 20).ids == []


def test_a_batch_claims_up_to_its_byte_budget_and_a_large_message_alone(make_settings):
    settings = make_settings()
    budget = settings.processing.batch_bytes
    assert budget < 5 * 1024 * 1024  # the shipped default: a 5 MB message is over it
    engine = make_engine(settings.database_url)
    large = report(subject="a large one", body="x" * 76 + "\n").as_bytes(policy=email.policy.SMTP)
    large = large.replace(b"x" * 76, (b"x" * 76 + b"\r\n") * (5 * 1024 * 1024 // 78))
    assert len(large) > 5 * 1024 * 1024
    small = _reports(6)
    ids = _store(engine, small[:3] + [large] + small[3:])

    batches = []
    while claim := claims.claim(engine, claims.new_owner(), NOW, LEASE, settings.processing.batch_size, budget):
        if not claim.ids:
            break
        batches.append(claim.ids)
        assert len(batches) <= 3
    # Small ones up to the large one (which would go over the budget), the large one alone, the rest.
    assert batches == [ids[:3], [ids[3]], ids[4:]]

    # A budget smaller than any message still claims one at a time.
    more = _store(engine, _reports(2))
    assert claims.claim(engine, claims.new_owner(), NOW, LEASE, 10, 1).ids == more[:1]


def test_a_processor_whose_claim_ran_out_while_it_parsed_acts_on_nothing_taken_over(make_settings):
    """Node A claims and parses; its claim runs out (it stalled) and node B takes the messages and
    acts on them; then A's act finds them no longer its own: one ticket and one acknowledgement
    per report, and A's outcomes are none."""
    settings = make_settings()
    engine = make_engine(settings.database_url)
    ids = _store(engine, _reports(4))
    stalled = claims.claim(engine, claims.new_owner(), NOW, LEASE, 10, 1 << 20)
    parsed = [processor.prepare(settings, stored) for stored in inbound.by_ids(engine, stalled.ids)]

    later = NOW + LEASE + timedelta(seconds=1)
    taken_over = processor.process_batch(engine, settings, later)
    assert (taken_over.claimed, taken_over.reclaimed, len(taken_over.tickets_opened)) == (4, 4, 4)

    assert processor._act_on_chunk(engine, settings, parsed, later, stalled.owner) == []
    with read_session(engine) as session:
        tickets = session.scalar(select(func.count()).select_from(Ticket))
        reports = Counter(session.scalars(select(ThreadEntry.inbound_id).where(ThreadEntry.kind == EntryKind.REPORT)))
        acks = list(session.scalars(select(Outbox.dedupe_key).where(Outbox.dedupe_key.like("ack:%"))))
    assert (tickets, reports, len(acks)) == (4, Counter(ids), 4)
    rows = _rows(engine)
    owners = {rows[i].claimed_by for i in ids}
    assert len(owners) == 1 and stalled.owner not in owners  # B acted on all four
    assert {rows[i].claimed_until for i in ids} == {None}  # acted on: the claim is over


def test_a_claim_that_ran_out_unnoticed_is_still_acted_on_by_its_processor(make_settings):
    """Running past the lease is harmless while nobody else took the messages: the act checks
    who holds the claim, not the clock, and the next claim finds nothing."""
    settings = make_settings()
    engine = make_engine(settings.database_url)
    _store(engine, _reports(2))
    slow = claims.claim(engine, claims.new_owner(), NOW, LEASE, 10, 1 << 20)
    parsed = [processor.prepare(settings, stored) for stored in inbound.by_ids(engine, slow.ids)]
    later = NOW + 2 * LEASE
    assert len(processor._act_on_chunk(engine, settings, parsed, later, slow.owner)) == 2
    assert processor.process_batch(engine, settings, later).claimed == 0


def test_a_live_claim_is_renewed_once_a_third_of_its_lease_has_passed(make_settings):
    settings = make_settings()
    engine = make_engine(settings.database_url)
    ids = _store(engine, _reports(3))
    claim = claims.claim(engine, claims.new_owner(), NOW, LEASE, 10, 1 << 20)
    elapsed = [0.0]
    lease = claims.Lease(engine, claim, NOW, LEASE, clock=lambda: elapsed[0])
    kept = lease.kept(iter(ids))
    assert next(kept) == ids[0] and lease.renewals == 0
    elapsed[0] = 19.0  # under a third of 60 s
    assert next(kept) == ids[1] and lease.renewals == 0
    elapsed[0] = 20.0
    assert next(kept) == ids[2] and lease.renewals == 1
    assert {row.claimed_until for row in _rows(engine).values()} == {NOW + timedelta(seconds=20) + LEASE}


def test_a_starting_worker_releases_the_claims_of_gone_processes_of_its_own_host(make_settings):
    """A process of this host that is gone (it exited here) loses its claims at once; a live one
    (this test's) keeps them, and so does any process of another host (only its lease ends it)."""
    settings = make_settings()
    engine = make_engine(settings.database_url)
    ids = _store(engine, _reports(3))
    gone = _exited_pid()
    host = socket.gethostname()
    owners = [f"{host}/{gone}/a", f"{host}/{os.getpid()}/b", f"elsewhere/{gone}/c"]
    for owner in owners:
        claims.claim(engine, owner, NOW, LEASE, 1, 1 << 20)
    assert claims.release_dead(engine, NOW) == 1
    rows = _rows(engine)
    assert [rows[i].claimed_until for i in ids] == [None, NOW + LEASE, NOW + LEASE]
    assert claims.claim(engine, claims.new_owner(), NOW, LEASE, 10, 1 << 20).ids == ids[:1]


def _exited_pid() -> int:
    """The pid of a process of this host that has exited (and been reaped)."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_claiming_renewing_and_acting_on_a_large_message_never_write_its_bytes_again(make_settings):
    """A message's bytes (inbound_raw) are written once, when it is stored: its claim, a renewal
    and its outcome update only its inbound_message row. SQLite: the WAL written from the claim
    to the outcome stays far below the message's size; PostgreSQL: the bytes' row version is
    still the one the listener wrote, while the message's row has new ones."""
    settings = make_settings()
    engine = make_engine(settings.database_url)
    message = report(subject="a crash dump attached", sender="r0@researcher.test")
    message.add_attachment(os.urandom(4 * 1024 * 1024), maintype="application", subtype="octet-stream",
                           filename="dump.bin")
    raw = message.as_bytes(policy=email.policy.SMTP)
    [message_id] = _store(engine, [raw])
    before = _row_versions(engine, message_id)
    claim = claims.claim(engine, claims.new_owner(), NOW, LEASE, 10, 1 << 20)
    assert claims.renew(engine, claim.owner, claim.ids, NOW + 2 * LEASE) == 1
    parsed = [processor.prepare(settings, stored) for stored in inbound.by_ids(engine, claim.ids)]
    [outcome] = processor._act_on_chunk(engine, settings, parsed, NOW, claim.owner)
    assert outcome.reference is not None and _rows(engine)[message_id].status == "processed"
    after = _row_versions(engine, message_id)
    if engine.dialect.name == "sqlite":
        assert after["wal"] < len(raw) // 8, (after["wal"], len(raw))
    else:
        assert after["raw"] == before["raw"] and after["message"] != before["message"]


def _row_versions(engine, message_id: int) -> dict[str, object]:  # type: ignore[no-untyped-def]
    """SQLite: the WAL truncated by a checkpoint, then its size (bytes written since the last
    call). PostgreSQL: the xmin of the message's row and of its bytes' row."""
    if engine.dialect.name == "sqlite":
        size = os.path.getsize(f"{engine.url.database}-wal")
        connection = engine.raw_connection()
        try:
            assert connection.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 0
        finally:
            connection.close()
        return {"wal": size}
    with engine.connect() as connection:
        return {name: connection.exec_driver_sql(f"SELECT xmin::text FROM {table} WHERE id = {message_id}").scalar_one()
                for name, table in (("message", "inbound_message"), ("raw", "inbound_raw"))}


def test_byte_groups_hold_a_budget_a_count_and_go_as_soon_as_they_are_full():
    """The one grouping of a read, a claim and a write transaction: at most *budget* bytes but for
    a larger message alone, at most *most* messages, and a full group handed on before the next
    message is even made (so a large one is acted on before the next is read)."""
    made: list[int] = []

    class Sized:
        def __init__(self, size: int):
            self.size = size

    def lazily(sizes: list[int]):  # type: ignore[no-untyped-def]
        for size in sizes:
            made.append(size)
            yield Sized(size)

    groups = inbound.byte_groups(lazily([40, 50, 30, 200, 10, 10, 10, 100]), 100, most=3)
    assert [item.size for item in next(groups)] == [40, 50]  # 30 more would be over 100
    assert made == [40, 50, 30]
    assert [item.size for item in next(groups)] == [30]  # with the 200 it would be over
    assert [item.size for item in next(groups)] == [200]  # larger than the budget: alone
    assert made == [40, 50, 30, 200]  # full: handed on before the 10 is made
    assert [[item.size for item in group] for group in groups] == [[10, 10, 10], [100]]  # three at most
