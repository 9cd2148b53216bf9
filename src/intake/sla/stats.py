"""How the team is doing: stage times, deadlines met on time, breaches, and what came in.

:func:`compute` counts the stored deadlines (:class:`intake.store.models.Deadline`), tickets and
stored messages in the database (GROUP BY; a median or percentile is the row at its rank), so it
reads a few rows whatever the number of tickets; ``intake stats`` prints it and the digest's
footer can use :meth:`Stats.render_text`.

Every figure covers the tickets *received* since ``since`` (and, for decisions, the messages
received since then), at the instant ``now``:

* per stage (by name, across policies): how many were met; the median and 90th percentile
  (nearest rank) of the time to meet it, from the stage's start (its ``started_at``, else the
  receipt) to when it was met; how many were met on time (``met_at <= due_at``; a stage met while
  it had no due time, e.g. paused, counts as on time, as ``intake show`` calls it "met"); the
  share met on time out of those met plus those breached and still open; and the open breaches:
  unmet stages past their due time, on tickets not resolved;
* tickets by state and by severity (``unassessed`` while none), and stored messages by the
  router's decision (``new-ticket``, ``duplicate``, ``spam``, …; ``undecided`` while pending);
* held mail (messages that made no ticket of their own) by decision, ``failed`` for those
  processing failed on, counted by when they were processed; and how many held messages
  ``intake messages purge`` deleted, ever (not only since ``since``).
"""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, and_, case, func, or_, select
from sqlmodel import Session

from intake.store import elapsed
from intake.store.db import read_session
from intake.store.models import Deadline, InboundMessage, Ticket
from intake.tickets import held
from intake.vocabulary import FINISHED_STATES

UNASSESSED = "unassessed"
UNDECIDED = "undecided"


@dataclass(frozen=True)
class StageStats:
    stage: str
    met: int
    met_on_time: int
    median_seconds: float | None  # time to meet, of those met; None when none was
    p90_seconds: float | None
    on_time_share: float | None  # met_on_time / (met + open_breaches); None when both are 0
    open_breaches: int


@dataclass(frozen=True)
class Stats:
    since: datetime
    now: datetime
    tickets: int
    stages: list[StageStats]
    by_state: dict[str, int]
    by_severity: dict[str, int]
    by_decision: dict[str, int]
    held: dict[str, int]  # held since *since*, per decision (failed: processing failed)
    purged: int  # held messages purged, ever

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: instants as ISO 8601 strings, durations in seconds."""
        return {"since": self.since.isoformat(), "now": self.now.isoformat(), "tickets": self.tickets,
                "stages": [asdict(stage) for stage in self.stages], "by_state": self.by_state,
                "by_severity": self.by_severity, "by_decision": self.by_decision, "held": self.held, "purged": self.purged}

    def render_text(self) -> str:
        """A few lines for people (the CLI, the digest's footer)."""
        lines = [f"{self.tickets} ticket(s) received since {self.since:%Y-%m-%d %H:%M} UTC"]
        if self.stages:
            rows = [["STAGE", "MET", "MEDIAN", "P90", "ON TIME", "OPEN BREACHES"]]
            rows += [[s.stage, str(s.met), _span(s.median_seconds), _span(s.p90_seconds),
                      "-" if s.on_time_share is None else f"{s.on_time_share:.0%}", str(s.open_breaches)]
                     for s in self.stages]
            widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
            lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
        for label, counts in (("state", self.by_state), ("severity", self.by_severity),
                              ("decision", self.by_decision)):
            shown = ", ".join(f"{key} {count}" for key, count in counts.items()) or "none"
            lines.append(f"by {label}: {shown}")
        shown = ", ".join(f"{key} {count}" for key, count in self.held.items()) or "none"
        lines.append(f"held: {shown}; purged, ever: {self.purged}")
        return "\n".join(lines)


def _span(seconds: float | None) -> str:
    """3d 4h, 5h 12m, 42m, 30s."""
    if seconds is None:
        return "-"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    return f"{minutes}m" if minutes else f"{secs}s"


def compute(engine: Engine, since: datetime, now: datetime) -> Stats:
    """The figures for tickets and messages received at or after *since*, as they stand at *now*."""
    with read_session(engine) as session:
        stages = _stage_stats(session, since, now)
        # One pass over the window's tickets for both.
        by_state: Counter[str] = Counter()
        by_severity: Counter[str | None] = Counter()
        for state, severity, count in session.execute(select(Ticket.state, Ticket.severity, func.count())
                                                      .where(Ticket.received_at >= since)
                                                      .group_by(Ticket.state, Ticket.severity)):
            by_state[state] += count
            by_severity[severity] += count
        by_decision = dict(session.execute(select(InboundMessage.decision, func.count())
                                           .where(InboundMessage.received_at >= since)
                                           .group_by(InboundMessage.decision)).all())
        held_since = held.counts(session, since, now)
        purged = held.purged_total(session)
    return Stats(since, now, sum(by_state.values()), stages, _sorted(by_state),
                 _sorted({(key or UNASSESSED): count for key, count in by_severity.items()}),
                 _sorted({(key or UNDECIDED): count for key, count in by_decision.items()}), held_since, purged)


def _sorted(counts: dict[str, int]) -> dict[str, int]:
    """Most first, then by name: stable output."""
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))


# A stage's deadlines of the tickets received in the window.
_DEADLINES = Deadline.__table__.join(Ticket.__table__, Ticket.__table__.c.id == Deadline.__table__.c.ticket_id)


def _stage_stats(session: Session, since: datetime, now: datetime) -> list[StageStats]:
    """Per stage, counted by one GROUP BY; the median and the 90th percentile read as the one or
    two ranked rows they are (:func:`_ranked_times`): the memory is the same for ten tickets or a
    hundred thousand, and the figures are those of sorting every time in Python."""
    deadline, ticket = Deadline.__table__.c, Ticket.__table__.c
    on_time = and_(deadline.met_at.is_not(None), or_(deadline.due_at.is_(None), deadline.met_at <= deadline.due_at))
    breached = and_(deadline.met_at.is_(None), deadline.due_at.is_not(None), deadline.due_at < now,
                    ticket.state.not_in(FINISHED_STATES))
    rows = session.execute(
        select(deadline.stage, func.min(deadline.position), func.count(deadline.met_at),
               func.sum(case((on_time, 1), else_=0)), func.sum(case((breached, 1), else_=0)))
        .select_from(_DEADLINES).where(ticket.received_at >= since).group_by(deadline.stage)).all()
    times = _ranked_times(session, since)
    result = []
    for stage, _, met, met_on_time, breaches in sorted(rows, key=lambda row: (row[1], row[0])):
        median, p90 = times.get(stage, (None, None))
        decided = met + breaches
        result.append(StageStats(stage, met, met_on_time, median, p90, met_on_time / decided if decided else None,
                                 breaches))
    return result


def _ranked_times(session: Session, since: datetime) -> dict[str, tuple[float, float]]:
    """Per stage met at least once: (median, 90th percentile by nearest rank) of the time to meet
    it, in seconds. The database ranks the times; only the rows at the median's rank(s) and the
    90th percentile's come back (of n: ranks (n+1)//2 and n//2+1, and ceil(0.9 n) = (9n+9)//10)."""
    deadline, ticket = Deadline.__table__.c, Ticket.__table__.c
    start = func.coalesce(deadline.started_at, ticket.received_at)
    order = elapsed.sort_key(session.get_bind().dialect.name, deadline.met_at, start)
    ranked = (select(deadline.stage, deadline.met_at, deadline.started_at, ticket.received_at,
                     func.row_number().over(partition_by=deadline.stage, order_by=order).label("rank"),
                     func.count().over(partition_by=deadline.stage).label("n"))
              .select_from(_DEADLINES).where(ticket.received_at >= since, deadline.met_at.is_not(None)).subquery())
    median_low, median_high, p90 = (ranked.c.n + 1) // 2, ranked.c.n // 2 + 1, (9 * ranked.c.n + 9) // 10
    rows = session.execute(select(ranked.c.stage, ranked.c.met_at, ranked.c.started_at, ranked.c.received_at,
                                  ranked.c.rank, median_low, median_high, p90)
                           .where(ranked.c.rank.in_([median_low, median_high, p90])))
    medians: dict[str, list[float]] = {}
    p90s: dict[str, float] = {}
    for stage, met_at, started_at, received_at, rank, low, high, p90_rank in rows:
        seconds = max(0.0, (met_at - (started_at or received_at)).total_seconds())
        if rank in (low, high):
            medians.setdefault(stage, []).append(seconds)
        if rank == p90_rank:
            p90s[stage] = seconds
    return {stage: (statistics.median(values), p90s[stage]) for stage, values in medians.items()}
