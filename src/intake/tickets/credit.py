"""How reporters want to be credited, and who to thank in release notes.

A preference is recognised in the report when the reporter states it on a line of its own text
("please credit me as Jane Doe (@janed, https://jane.example)", "Credit: Jane Doe", "I'd like to be
credited as …", "please keep me anonymous", "no credit"), and later in a reply of theirs that states
it (:mod:`intake.understand.credit_words` reads those statements); a maintainer sets or corrects it
with ``intake credit``. It is stored on the ticket (``credit``) and each change is a ``credit-set``
event.

``intake credits`` lists the credits of tickets that went out since a date: a ticket counts from
its first *released*, *disclosed* or *resolved* milestone (the time the milestone happened, as
recorded with ``--at``). Anonymous reporters are listed as "anonymous reporter", so the notes
still count every report; tickets with no preference are named separately so someone asks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, select
from sqlmodel import Session

from intake import patterns
from intake.store import audit
from intake.store.db import read_session
from intake.store.models import Event, Ticket
from intake.understand.credit_words import ANONYMOUS_LABEL, Credit
from intake.vocabulary import MILESTONE_SPECS, EventKind, Milestone

# The milestones after which a report's credit belongs in release notes.
OUT_MILESTONES = tuple(spec.name for spec in MILESTONE_SPECS if spec.credit_out)
_MARKDOWN_SPECIAL = patterns.compile(r"([\\`*_{}\[\]()<>#+!|~])")


def event_detail(credit: Credit | None) -> dict[str, Any]:
    """The detail of a ``credit-set`` event (``{"cleared": True}`` when the preference is removed)."""
    return credit.as_dict() if credit else {"cleared": True}


def set_credit(session: Session, ticket: Ticket, credit: Credit | None, now: datetime, actor: str) -> bool:
    """Record *credit* (None: forget it) on *ticket*, with an event; False if it was already so."""
    stored = credit.as_dict() if credit else None
    if _same_preference(ticket.credit, stored):
        return False
    ticket.credit = stored
    ticket.updated_at = now
    # Not records.add_event: records imports this module to set the credit a reply states.
    audit.add_events(session, [dict(ticket_id=ticket.id, at=now, actor=actor, kind=EventKind.CREDIT_SET,
                                    detail=event_detail(credit))])
    return True


def _same_preference(a: dict[str, Any] | None, b: dict[str, Any] | None) -> bool:
    """Equal in what is credited (not in where it was learnt)."""
    keys = ("anonymous", "name", "handle", "url")
    return (a is None) == (b is None) and (a is None or all(a.get(k) == b.get(k) for k in keys))


def credit_of(ticket: Ticket) -> Credit | None:
    return Credit.from_dict(ticket.credit) if ticket.credit else None


# -- release notes ------------------------------------------------------------------------------


@dataclass(frozen=True)
class CreditLine:
    """A ticket that went out, and whom to thank for it."""

    reference: str
    subject: str
    milestone: str  # the first of OUT_MILESTONES it reached
    at: datetime  # when that happened
    version: str | None  # the release that carries the fix, if recorded
    credit: Credit | None  # None: no preference recorded

    def as_dict(self) -> dict[str, Any]:
        credit = self.credit
        return {"reference": self.reference, "subject": self.subject, "milestone": self.milestone,
                "at": self.at.isoformat(), "version": self.version,
                "anonymous": bool(credit and credit.anonymous),
                "name": credit.name if credit else None, "handle": credit.handle if credit else None,
                "url": credit.url if credit else None, "credited_as": credit.display if credit else None}


def went_out(engine: Engine, since: datetime | None) -> list[CreditLine]:
    """Tickets whose first released/disclosed/resolved milestone happened at or after *since*
    (all such tickets when None), in the order they went out."""
    with read_session(engine) as session:
        rows = session.execute(
            select(Event.ticket_id, Event.detail).where(Event.kind == EventKind.MILESTONE).order_by(Event.at, Event.id)
        ).all()
        reached: dict[int, dict[str, tuple[datetime, dict[str, Any]]]] = {}
        for ticket_id, detail in rows:
            if detail.get("milestone") in OUT_MILESTONES:
                # The latest recording of a milestone is the one in force (as for the deadlines).
                reached.setdefault(ticket_id, {})[detail["milestone"]] = (datetime.fromisoformat(detail["at"]), detail)
        if not reached:
            return []
        found = {t.id: t for t in session.scalars(select(Ticket).where(Ticket.id.in_(reached)))}
    lines = []
    for ticket_id, milestones in reached.items():
        milestone, (at, _) = min(milestones.items(), key=lambda item: item[1][0])
        if since is not None and at < since:
            continue
        ticket = found[ticket_id]
        version = milestones[Milestone.RELEASED][1].get("version") if Milestone.RELEASED in milestones else None
        lines.append(CreditLine(ticket.reference, ticket.subject, milestone, at, version, credit_of(ticket)))
    return sorted(lines, key=lambda line: (line.at, line.reference))


def render(lines: list[CreditLine], fmt: str, since: datetime | None) -> str:
    """The credits of *lines* as ``text``, ``markdown`` or ``json`` (tickets without a preference
    appear only in JSON, under ``without_preference``)."""
    known = [line for line in lines if line.credit is not None]
    if fmt == "json":
        return json.dumps({"since": since.isoformat() if since else None,
                           "credits": [line.as_dict() for line in known],
                           "without_preference": [line.reference for line in lines if line.credit is None]},
                          indent=2, ensure_ascii=False)
    if fmt == "markdown":
        return "\n".join(f"- {_markdown_credit(line.credit)} ({line.reference})" for line in known)
    return "\n".join(f"{line.reference}  {line.milestone} {line.at:%Y-%m-%d}  {line.credit.display}"
                     f"{'  ' + line.credit.url if line.credit.url else ''}" for line in known)


def _markdown_credit(credit: Credit) -> str:
    if credit.anonymous:
        return ANONYMOUS_LABEL.capitalize()
    shown = _markdown_escape(credit.display)
    return f"[{shown}]({credit.url.replace(')', '%29')})" if credit.url else shown


def _markdown_escape(text: str) -> str:
    """Reporter-chosen text, literal in Markdown (no links, emphasis or HTML of theirs)."""
    return _MARKDOWN_SPECIAL.sub(r"\\\1", text)
