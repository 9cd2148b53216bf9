"""How the team is doing: stage times, deadlines met on time, breaches, and what came in.

:func:`compute` reads the stored deadlines (:class:`intake.store.models.Deadline`), tickets and stored
messages; ``intake stats`` prints it and the digest's footer can use :meth:`Stats.render_text`.

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

import math
import statistics
from collections import Counter
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, func, select

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


def _p90(values: list[float]) -> float:
    """The 90th percentile by nearest rank: a time that was actually measured."""
    ordered = sorted(values)
    return ordered[math.ceil(0.9 * len(ordered)) - 1]


def compute(engine: Engine, since: datetime, now: datetime) -> Stats:
    """The figures for tickets and messages received at or after *since*, as they stand at *now*."""
    with read_session(engine) as session:
        stage_rows = session.execute(
            select(Deadline.stage, Deadline.position, Deadline.due_at, Deadline.started_at, Deadline.met_at,
                   Ticket.received_at, Ticket.state)
            .join(Ticket, Ticket.id == Deadline.ticket_id).where(Ticket.received_at >= since)
        ).all()
        by_state = dict(session.execute(select(Ticket.state, func.count()).where(Ticket.received_at >= since)
                                        .group_by(Ticket.state)).all())
        by_severity = dict(session.execute(select(Ticket.severity, func.count()).where(Ticket.received_at >= since)
                                           .group_by(Ticket.severity)).all())
        by_decision = dict(session.execute(select(InboundMessage.decision, func.count())
                                           .where(InboundMessage.received_at >= since)
                                           .group_by(InboundMessage.decision)).all())
        held_since = held.counts(session, since, now)
        purged = held.purged_total(session)
    return Stats(since, now, sum(by_state.values()), _stage_stats(stage_rows, now), _sorted(by_state),
                 _sorted({(key or UNASSESSED): count for key, count in by_severity.items()}),
                 _sorted({(key or UNDECIDED): count for key, count in by_decision.items()}), held_since, purged)


def _sorted(counts: dict[str, int]) -> dict[str, int]:
    """Most first, then by name: stable output."""
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))


def _stage_stats(rows: list[Any], now: datetime) -> list[StageStats]:
    times: dict[str, list[float]] = {}
    on_time: Counter[str] = Counter()
    breaches: Counter[str] = Counter()
    position: dict[str, int] = {}
    for stage, pos, due_at, started_at, met_at, received_at, state in rows:
        position[stage] = min(pos, position.get(stage, pos))
        times.setdefault(stage, [])
        if met_at is not None:
            times[stage].append(max(0.0, (met_at - (started_at or received_at)).total_seconds()))
            on_time[stage] += due_at is None or met_at <= due_at
        elif due_at is not None and due_at < now and state not in FINISHED_STATES:
            breaches[stage] += 1
    result = []
    for stage in sorted(times, key=lambda name: (position[name], name)):
        met = times[stage]
        decided = len(met) + breaches[stage]
        result.append(StageStats(stage, len(met), on_time[stage],
                                 statistics.median(met) if met else None, _p90(met) if met else None,
                                 on_time[stage] / decided if decided else None, breaches[stage]))
    return result
