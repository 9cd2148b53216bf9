"""The digest and `intake stats` at scale: figures the database aggregates equal a plain Python
computation over every row (SQLite and PostgreSQL), a section names at most ``list_limit``
tickets and counts the rest, and building a digest takes no more memory for more tickets.

Tickets and deadlines are inserted in bulk, as stored rows: what is measured is reading them."""

from __future__ import annotations

import email
import email.policy
import json
import math
import random
import statistics
import tracemalloc
from datetime import datetime, timedelta, timezone

from sqlalchemy import insert, select

from intake.sla import digest, stats
from intake.store.db import make_engine, write_session
from intake.store.models import Deadline, Ticket
from intake.vocabulary import FINISHED_STATES, SEVERITIES, Milestone, TicketState

NOW = datetime(2026, 6, 10, 22, 0, tzinfo=timezone.utc)
STATES = (TicketState.NEW, Milestone.ACKNOWLEDGED, TicketState.WAITING, TicketState.RESOLVED, TicketState.CLOSED)
STAGES = ("acknowledge", "assess", "resolve")


def _digests(list_limit: int) -> str:
    return json.dumps({"team": {"cron": "0 22 * * *", "timezone": "UTC", "list_limit": list_limit}})


def _instant(rng: random.Random, around: datetime, days: float) -> datetime:
    """An instant up to *days* either side of *around*, to the microsecond; every fifth one on a
    whole minute, so that some stage times tie."""
    at = around + timedelta(microseconds=rng.randrange(-int(days * 86400e6), int(days * 86400e6)))
    return at.replace(second=0, microsecond=0) if rng.random() < 0.2 else at


def _seed(engine, count: int, seed: int, first: int = 0) -> None:  # type: ignore[no-untyped-def]
    """*count* tickets received over the 120 days before NOW, in every state and severity, each with
    some of three stages: met (early, late, before their start: a time of 0, or with no due time),
    unmet past due, unmet not yet due, or not started."""
    rng = random.Random(seed)
    received = [NOW - timedelta(days=60) + (_instant(rng, NOW, 60) - NOW) for _ in range(count)]
    with write_session(engine, durable=False) as session:
        ids = session.scalars(insert(Ticket.__table__).returning(Ticket.__table__.c.id), [dict(
            reference=f"SEC-2026-{first + n + 1:06d}", subject=f"Report {first + n}", reporter=f"r{n}@researcher.test",
            reporter_name="", intake_address="security@example.com", state=rng.choice(STATES),
            severity=rng.choice((None, *SEVERITIES)), policy="vaixus", labels=[], links=[], quality={},
            received_at=at, created_at=at, updated_at=at) for n, at in enumerate(received)]).all()
        rows = []
        for ticket_id, at in zip(ids, received):
            for position, stage in enumerate(STAGES):
                if rng.random() < 0.15:
                    continue  # a policy without this stage
                started = None if rng.random() < 0.3 else _instant(rng, at + timedelta(days=1), 1)
                due = None if rng.random() < 0.1 else _instant(rng, (started or at) + timedelta(days=5), 4)
                met = None if rng.random() < 0.4 else _instant(rng, (started or at) + timedelta(days=4), 4.5)
                rows.append(dict(ticket_id=ticket_id, stage=stage, position=position, due_at=due, started_at=started,
                                 met_at=met, basis="seeded", severity_assumed=False, computed_at=at,
                                 notify_at=None if met else due))
        session.execute(insert(Deadline.__table__), rows)


def _python_stage_stats(engine, since: datetime, now: datetime) -> list[stats.StageStats]:  # type: ignore[no-untyped-def]
    """The figures computed the plain way: every deadline of the window read and sorted in Python."""
    with engine.connect() as connection:
        rows = connection.execute(select(Deadline.stage, Deadline.position, Deadline.due_at, Deadline.started_at,
                                         Deadline.met_at, Ticket.received_at, Ticket.state)
                                  .join(Ticket, Ticket.id == Deadline.ticket_id)
                                  .where(Ticket.received_at >= since)).all()
    by_stage: dict[str, list] = {}
    for row in rows:
        by_stage.setdefault(row.stage, []).append(row)
    result = []
    for stage, stage_rows in sorted(by_stage.items(), key=lambda item: (min(r.position for r in item[1]), item[0])):
        met = sorted(max(0.0, (r.met_at - (r.started_at or r.received_at)).total_seconds())
                     for r in stage_rows if r.met_at is not None)
        on_time = sum(1 for r in stage_rows if r.met_at is not None and (r.due_at is None or r.met_at <= r.due_at))
        breaches = sum(1 for r in stage_rows if r.met_at is None and r.due_at is not None and r.due_at < now
                       and r.state not in FINISHED_STATES)
        decided = len(met) + breaches
        result.append(stats.StageStats(stage, len(met), on_time, statistics.median(met) if met else None,
                                       met[math.ceil(0.9 * len(met)) - 1] if met else None,
                                       on_time / decided if decided else None, breaches))
    return result


def test_stats_from_the_database_equal_a_python_computation_over_every_row(make_settings):
    settings = make_settings()
    engine = make_engine(settings.database_url)
    _seed(engine, 1500, seed=18)
    for since in (NOW - timedelta(days=200), NOW - timedelta(days=30), NOW - timedelta(days=1, microseconds=7)):
        figures = stats.compute(engine, since, NOW)
        expected = _python_stage_stats(engine, since, NOW)
        assert figures.stages == expected
        assert sum(stage.met for stage in expected) > 0
        with engine.connect() as connection:
            states = [state for (state,) in connection.execute(select(Ticket.state).where(Ticket.received_at >= since))]
        assert figures.tickets == len(states) and sum(figures.by_state.values()) == len(states)
        assert figures.by_state == {state: states.count(state) for state in set(states)}
    # Even and odd counts, one met stage, none: the median's two ranks and the 90th percentile's.
    for count in (1, 2, 3, 10, 11):
        fresh = NOW + timedelta(days=1)
        _seed(engine, count, seed=count, first=10_000 + 100 * count)
        assert stats.compute(engine, NOW - timedelta(days=60), fresh).stages == _python_stage_stats(
            engine, NOW - timedelta(days=60), fresh)


def test_a_section_names_list_limit_tickets_and_counts_the_rest(make_settings):
    settings = make_settings(INTAKE_SCHEDULER__DIGESTS=_digests(3))
    engine = make_engine(settings.database_url)
    _seed(engine, 200, seed=7)
    built = digest.build(engine, settings, "team", NOW)
    with engine.connect() as connection:
        breached = connection.execute(
            select(Ticket.reference, Deadline.due_at, Deadline.id).join(Deadline, Deadline.ticket_id == Ticket.id)
            .where(Deadline.met_at.is_(None), Deadline.due_at <= NOW, Ticket.state.not_in(FINISHED_STATES))).all()
    section = next(section for section in built.sections if section.key == "breached")
    assert len(breached) > 3 and section.total == len(breached)
    assert [line.reference for line in section.lines] == [ref for ref, *_ in sorted(breached, key=lambda r: r[1:])][:3]
    assert section.more == len(breached) - 3
    assert all(len(section.lines) <= 3 for section in built.sections)
    mail = digest.render(settings, built, ["team@example.com"])
    parsed = email.message_from_bytes(mail.raw, policy=email.policy.default)
    assert f"... and {len(breached) - 3} more" in parsed.get_body(("plain",)).get_content()
    assert f"and {len(breached) - 3} more" in parsed.get_body(("html",)).get_content()


def _digest_peak(engine, settings) -> int:  # type: ignore[no-untyped-def]
    """Peak bytes Python allocated while building the digest (the footer's stats included)."""
    tracemalloc.start()
    try:
        digest.build(engine, settings, "team", NOW)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_building_a_digest_takes_no_more_memory_for_five_times_the_tickets(make_settings):
    settings = make_settings(INTAKE_SCHEDULER__DIGESTS=_digests(50))
    engine = make_engine(settings.database_url)
    _seed(engine, 1000, seed=1)
    _digest_peak(engine, settings)  # the first build compiles statements and templates: not counted
    small = _digest_peak(engine, settings)
    _seed(engine, 4000, seed=2, first=1000)
    large = _digest_peak(engine, settings)
    # Reading every deadline of the window (as the footer once did) cost ~1.4 KiB a ticket: 5.6 MiB more here.
    assert large - small < 512 * 1024, (small, large)
