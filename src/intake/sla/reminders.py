"""The SLA sweep: reminders before a stage is due, breach notices until it is met, escalations.

One job: turn due deadlines into mail for maintainers, each notification exactly once.

* **Only due work.** Every unmet deadline carries ``notify_at``, the next instant something may
  have to be said about it (set from its due instant whenever the deadline is computed, see
  :func:`intake.sla.deadlines.first_notice_at`). The sweep reads deadlines with ``notify_at <= now``
  through a partial index, a page at a time, and moves each one's ``notify_at`` on to the next
  point: a sweep with nothing to send reads nothing.
* **Exactly once.** Each notification has a key — ``remind:<ref>:<stage>:<point>``,
  ``breach:<ref>:<stage>:<n>`` (n-th repeat), ``escalate:<ref>:<stage>`` — unique in the
  ``notification`` table and inserted (``ON CONFLICT DO NOTHING``) in the transaction that queues
  its mail in the outbox, whose own unique key makes sending idempotent. Two sweepers at once:
  on SQLite the cross-process writer lock runs their pages one after the other, and the second
  finds the keys taken; on PostgreSQL each locks its page (``FOR UPDATE SKIP LOCKED``) and the
  keys settle any overlap.
* **No storms.** Only the latest passed point of a stage matters: after downtime a stage gets
  one notice, not one per missed point or day, and all of a ticket's notices of one sweep go in
  one mail per audience, stating where the ticket stands ("catch-up" when they are late).
* **Quiet hours.** A reminder that is not a breach waits for the working hours of the stage's
  calendar when ``[scheduler] quiet_hours`` is on.
* **Imported history is not news.** A ticket ``intake import`` opened from an old mailbox keeps
  deadlines counted from the report's true arrival (``show``, stats and the digest say what was
  missed), but nothing that fell due before the import is mailed: a stage already past due then
  gets no breach notice, repeat or escalation ever, and a reminder point passed by then none. Each
  is recorded as a ``suppressed`` notification under the key it would have been sent with (so it
  stays once-only, and ``intake reminders REF`` says why); points after the import are mailed
  as for any ticket.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from sqlalchemy import Engine, and_, bindparam, or_, select, update
from sqlmodel import Session

from intake.config.settings import Settings
from intake.send import composer, outbox
from intake.sla import deadlines, disclosure_reminders
from intake.sla.calendars import format_span, parse_duration
from intake.sla.reminder_schedule import reminder_times
from intake.sla.notices import Notice, PlannedMail, notice_mails
from intake.store.db import insert_new, read_session, write_session
from intake.store.models import Deadline, Notification, Ticket
from intake.tickets import disclosure, keep_in_loop, undeliverable
from intake.tickets.reads import find
from intake.understand import reply_tokens
from intake.vocabulary import FINISHED_STATES, MailKind, NotificationKind

log = logging.getLogger(__name__)

# Deadlines read per transaction: short enough that the listener's commits never wait long.
SWEEP_PAGE = 200
# A bound on one sweep; anything beyond waits for the next one.
MAX_DEADLINES_PER_SWEEP = 100_000

_NOTIFY_AT = update(Deadline.__table__).where(Deadline.__table__.c.id == bindparam("row_id")).values(
    notify_at=bindparam("next_at"))


class Upcoming(NamedTuple):
    """The next notification a stage is due to get."""

    kind: str  # reminder | breach | escalation
    label: str
    at: datetime


@dataclass(frozen=True)
class StagePlan:
    deadline_id: int
    notices: list[Notice]
    next: Upcoming | None
    held: bool = False  # a reminder waits for working hours
    suppressed: tuple[Notice, ...] = ()  # fell due before the ticket was imported: recorded, never mailed


@dataclass
class SweepResult:
    now: datetime
    dry_run: bool
    examined: int = 0  # deadlines looked at
    held: int = 0  # reminders held for working hours
    mails: list[PlannedMail] = field(default_factory=list)
    suppressed: list[Notice] = field(default_factory=list)  # imported history: recorded, not mailed
    keep_in_loop: list[keep_in_loop.Planned] = field(default_factory=list)  # to reporters (tickets/keep_in_loop)

    def as_dict(self) -> dict[str, Any]:
        return {
            "now": self.now.isoformat(), "dry_run": self.dry_run, "examined": self.examined, "held": self.held,
            "mails": len(self.mails), NotificationKind.SUPPRESSED: [_suppressed_dict(n) for n in self.suppressed],
            MailKind.KEEP_IN_LOOP: [planned.as_dict() for planned in self.keep_in_loop],
            "notifications": [
                {"key": notice.key, "kind": notice.kind, "ticket": notice.reference, "stage": notice.stage,
                 "point": notice.label, "at": notice.at.isoformat(), "stage_due": notice.stage_due.isoformat(),
                 "catch_up": mail.kind == MailKind.CATCH_UP, "mail": mail.kind, "to": mail.recipients}
                for mail in self.mails for notice in mail.notices],
        }


def sweep(engine: Engine, settings: Settings, now: datetime, dry_run: bool = False) -> SweepResult:
    """Send what is due at *now*: reminders, breach notices and escalations, each once.

    With *dry_run*, work out the same mails without sending or recording anything."""
    result = SweepResult(now, dry_run)
    # Before any transaction (it may have to make one); a dry run composes no mail and needs none.
    reply_secret = b"" if dry_run else reply_tokens.secret(engine)
    after: tuple[datetime, int] | None = None
    seen: set[int] = set()  # tickets done (a dry run leaves their deadlines due)
    while result.examined < MAX_DEADLINES_PER_SWEEP:
        with (read_session(engine) if dry_run else write_session(engine)) as session:
            page = _due_page(session, now, after, lock=not dry_run)
            if not page:
                break
            after = (page[-1].notify_at, page[-1].id)
            ticket_ids = {row.ticket_id for row in page} - seen
            seen |= ticket_ids
            mails = _sweep_tickets(session, settings, ticket_ids, now, result, dry_run, reply_secret)
        result.mails += mails
    result.keep_in_loop = keep_in_loop.sweep(engine, settings, now, dry_run, reply_secret)
    result.mails += disclosure_reminders.sweep(engine, settings, now, dry_run)  # 7 and 1 days before agreed dates
    if (result.mails or result.suppressed) and not dry_run:
        log.info("event=sweep-sent mails=%d examined=%d held=%d suppressed=%d", len(result.mails), result.examined,
                 result.held, len(result.suppressed))
    return result


def _due_page(session: Session, now: datetime, after: tuple[datetime, int] | None, lock: bool) -> list[Any]:
    table = Deadline.__table__
    query = (select(table.c.id, table.c.ticket_id, table.c.notify_at)
             .where(table.c.met_at.is_(None), table.c.notify_at <= now)
             .order_by(table.c.notify_at, table.c.id).limit(SWEEP_PAGE))
    if after is not None:
        query = query.where(or_(table.c.notify_at > after[0], and_(table.c.notify_at == after[0], table.c.id > after[1])))
    if lock and session.get_bind().dialect.name == "postgresql":
        query = query.with_for_update(skip_locked=True)
    return list(session.execute(query))


def _sweep_tickets(session: Session, settings: Settings, ticket_ids: set[int], now: datetime, result: SweepResult,
                   dry_run: bool, reply_secret: bytes) -> list[PlannedMail]:
    """Plan (and unless *dry_run*, send and record) the notices of *ticket_ids* due at *now*."""
    if not ticket_ids:
        return []
    tickets = {t.id: t for t in session.scalars(select(Ticket).where(Ticket.id.in_(ticket_ids)))}
    stages: dict[int, list[Deadline]] = defaultdict(list)
    for row in session.scalars(select(Deadline).where(Deadline.ticket_id.in_(ticket_ids))
                               .order_by(Deadline.ticket_id, Deadline.position)):
        stages[row.ticket_id].append(row)
    sent = _sent_keys(session, ticket_ids)
    mails: list[PlannedMail] = []
    suppressed: list[Notice] = []
    moves = []
    for ticket_id, rows in stages.items():
        due = [row for row in rows if row.met_at is None and row.notify_at is not None and row.notify_at <= now]
        plans = [plan_stage(settings, tickets[ticket_id], row, sent, now) for row in due]
        result.examined += len(plans)
        result.held += sum(plan.held for plan in plans)
        moves += [{"row_id": plan.deadline_id, "next_at": plan.next.at if plan.next else None} for plan in plans]
        mails += _mails_for(settings, tickets[ticket_id], [n for plan in plans for n in plan.notices])
        suppressed += [notice for plan in plans for notice in plan.suppressed]
    result.suppressed += suppressed
    if dry_run:
        return mails
    _record_suppressed(session, suppressed, now)
    mails = _record(session, mails, now)
    # Said in every notice while the reporter is unreachable: the maintainers must find another way.
    unreachable = undeliverable.reasons(session, {m.ticket_id for m in mails
                                                  if tickets[m.ticket_id].reporter_unreachable_at})
    disclosure_lines = disclosure.lines(session, {m.ticket_id for m in mails})
    outbox.enqueue_many(session, [(mail, m.ticket_id) for m in mails
                                  for mail in _compose(settings, tickets[m.ticket_id], stages[m.ticket_id], m, now,
                                                       reply_secret, unreachable.get(m.ticket_id),
                                                       disclosure_lines.get(m.ticket_id))], now=now)
    if moves:
        session.execute(_NOTIFY_AT, moves)
    return mails


def _sent_keys(session: Session, ticket_ids: Iterable[int]) -> set[str]:
    return set(session.scalars(select(Notification.key).where(Notification.ticket_id.in_(set(ticket_ids)))))


def plan_stage(settings: Settings, ticket: Ticket, row: Deadline, sent: set[str], now: datetime) -> StagePlan:
    """What one unmet stage needs at *now*, given the notification keys already *sent*: at most
    one reminder, or a breach notice (and an escalation), and when to look at it next."""
    policy = settings.policies.get(ticket.policy)
    if policy is None or row.due_at is None or row.started_at is None or row.met_at is not None \
            or ticket.state in FINISHED_STATES:
        return StagePlan(row.id, [], None)
    if ticket.imported_at is not None and row.due_at <= ticket.imported_at:
        return _plan_due_before_import(ticket, row, sent)
    if now < row.due_at:
        return _plan_before_due(settings, ticket, row, sent, now)
    return _plan_breached(settings, ticket, row, sent, now)


def _plan_due_before_import(ticket: Ticket, row: Deadline, sent: set[str]) -> StagePlan:
    """A stage already past due when its ticket was imported: its breach is suppressed (once, under
    the breach notice's key) and nothing about it is looked at again: no repeat, no escalation."""
    assert row.due_at is not None
    key = f"breach:{ticket.reference}:{row.stage}:0"
    if key in sent:
        return StagePlan(row.id, [], None)
    breach = Notice(key, NotificationKind.BREACH, ticket.id, ticket.reference, row.stage, NotificationKind.BREACH,
                    row.due_at, row.due_at, late=True)
    return StagePlan(row.id, [], None, suppressed=(breach,))


def _plan_before_due(settings: Settings, ticket: Ticket, row: Deadline, sent: set[str], now: datetime) -> StagePlan:
    scheduler = settings.scheduler
    calendar = deadlines.stage_calendar(settings, ticket.policy, row.stage)

    def when(at: datetime) -> datetime:  # a reminder goes out no earlier than working hours
        return calendar.next_working_instant(at) if scheduler.quiet_hours else at

    def key(label: str) -> str:
        return f"remind:{ticket.reference}:{row.stage}:{label}"

    points = reminder_times(settings.policies[ticket.policy], row.stage, settings.all_calendars,
                            start=row.started_at, due=row.due_at, severity=ticket.severity)
    passed = [(label, at) for label, at in points if at <= now]
    upcoming = [Upcoming(NotificationKind.REMINDER, label, when(at)) for label, at in points if at > now]
    breach = Upcoming(NotificationKind.BREACH, NotificationKind.BREACH, row.due_at)
    following = min([*upcoming, breach], key=lambda u: u.at)
    if not passed or key(passed[-1][0]) in sent:
        return StagePlan(row.id, [], following)
    label, at = passed[-1]
    if ticket.imported_at is not None and at < ticket.imported_at:  # passed before the import: not news
        notice = Notice(key(label), NotificationKind.REMINDER, ticket.id, ticket.reference, row.stage, label, at,
                        row.due_at, late=True)
        return StagePlan(row.id, [], following, suppressed=(notice,))
    if when(now) > now:  # quiet hours: hold it until the calendar's next opening (or the breach)
        held = Upcoming(NotificationKind.REMINDER, label, when(now))
        return StagePlan(row.id, [], min(held, following, key=lambda u: u.at), held=True)
    # Points before an import were never to be mailed: skipping them makes nothing late.
    missed = any(key(other) not in sent for other, other_at in passed
                 if other_at < at and (ticket.imported_at is None or other_at >= ticket.imported_at))
    late = missed or now - when(at) > timedelta(seconds=scheduler.misfire_grace)
    notice = Notice(key(label), NotificationKind.REMINDER, ticket.id, ticket.reference, row.stage, label, at,
                    row.due_at, late)
    return StagePlan(row.id, [notice], following)


def _plan_breached(settings: Settings, ticket: Ticket, row: Deadline, sent: set[str], now: datetime) -> StagePlan:
    scheduler = settings.scheduler
    grace = timedelta(seconds=scheduler.misfire_grace)
    repeat = parse_duration(scheduler.breach_repeat).elapsed
    ref, due = ticket.reference, row.due_at
    number = (now - due) // repeat  # 0: the breach itself; n: its n-th repeat
    at = due + number * repeat
    notices = []
    key = f"breach:{ref}:{row.stage}:{number}"
    if key not in sent:
        missed = number > 0 and f"breach:{ref}:{row.stage}:{number - 1}" not in sent
        label = NotificationKind.BREACH if number == 0 else f"repeat {number}"
        notices.append(Notice(key, NotificationKind.BREACH, ticket.id, ref, row.stage, label, at, due,
                              missed or now - at > grace))
    following = Upcoming(NotificationKind.BREACH, f"repeat {number + 1}", at + repeat)
    if scheduler.escalate_to:
        escalate_at = due + parse_duration(scheduler.escalation_delay).elapsed
        escalate_key = f"escalate:{ref}:{row.stage}"
        if escalate_at > now:
            escalation = Upcoming(NotificationKind.ESCALATION, NotificationKind.ESCALATION, escalate_at)
            following = min(following, escalation, key=lambda u: u.at)
        elif escalate_key not in sent:
            notices.append(Notice(escalate_key, NotificationKind.ESCALATION, ticket.id, ref, row.stage,
                                  NotificationKind.ESCALATION, escalate_at, due, now - escalate_at > grace))
    return StagePlan(row.id, notices, following)


def _suppressed_dict(notice: Notice) -> dict[str, Any]:
    return {"key": notice.key, "ticket": notice.reference, "stage": notice.stage, "point": notice.label,
            "at": notice.at.isoformat()}


def _mails_for(settings: Settings, ticket: Ticket, notices: list[Notice]) -> list[PlannedMail]:
    """One mail for the notice recipients (reminders, breaches), one for escalate_to (escalations)."""
    mails = []
    escalations = [n for n in notices if n.kind == NotificationKind.ESCALATION]
    others = [n for n in notices if n.kind != NotificationKind.ESCALATION]
    for recipients, group in ((settings.notice_recipients, others),
                              (list(settings.scheduler.escalate_to), escalations)):
        if not recipients or not group:
            continue
        if any(notice.late for notice in group):
            kind = MailKind.CATCH_UP
        else:
            kind = MailKind.BREACH if any(n.kind == NotificationKind.BREACH for n in group) else group[0].kind
        mails.append(PlannedMail(kind, ticket.id, ticket.reference, recipients, group))
    return mails


def _record(session: Session, mails: list[PlannedMail], now: datetime) -> list[PlannedMail]:
    """Insert the mails' notification keys; return the mails cut down to the keys inserted now (a
    concurrent sweeper may have taken some), dropping those left with none."""
    if not mails:
        return []
    rows = [dict(key=n.key, kind=n.kind, ticket_id=n.ticket_id, stage=n.stage, label=n.label, due_at=n.at,
                 created_at=now, recipients=mail.recipients, outbox_key=mail.key)
            for mail in mails for n in mail.notices]
    inserted = insert_new(session, Notification.__table__, "key", rows)
    kept = []
    for mail in mails:
        notices = [notice for notice in mail.notices if notice.key in inserted]
        if notices:
            kept.append(mail if len(notices) == len(mail.notices) else
                        PlannedMail(mail.kind, mail.ticket_id, mail.reference, mail.recipients, notices))
    return kept


def _record_suppressed(session: Session, notices: list[Notice], now: datetime) -> None:
    """Record *notices* as suppressed under their own keys: never mailed, and never planned again."""
    if notices:
        insert_new(session, Notification.__table__, "key", [
            dict(key=n.key, kind=NotificationKind.SUPPRESSED, ticket_id=n.ticket_id, stage=n.stage, label=n.label,
                 due_at=n.at, created_at=now, recipients=[], outbox_key="") for n in notices])


_SUBJECTS = {MailKind.REMINDER: "Reminder", MailKind.BREACH: "Breached", MailKind.ESCALATION: "Escalation",
             MailKind.CATCH_UP: "Catch-up"}


def _compose(settings: Settings, ticket: Ticket, rows: list[Deadline], mail: PlannedMail, now: datetime,
             reply_secret: bytes, unreachable: str | None, disclosure_line: str | None) -> list[composer.OutgoingMail]:
    """The mail for *mail*'s notices, with where the ticket stands now (*unreachable*: why mail to
    the reporter fails, when it does; *disclosure_line*: its proposed or agreed disclosure date):
    one per recipient, each replying to that recipient's own reply address."""
    def local(stage: str, at: datetime) -> str:
        zone = deadlines.stage_calendar(settings, ticket.policy, stage).timezone
        return composer.PromisedDate(stage, at, zone).due_local

    statuses = deadlines.statuses_of(settings, ticket, rows, now)
    headlines = [_headline(notice, local(notice.stage, notice.stage_due), now) for notice in mail.notices]
    first = mail.notices[0]
    summary = f"{first.stage} {'due' if now < first.stage_due else 'was due'} {local(first.stage, first.stage_due)}"
    if len(mail.notices) > 1:
        summary += f" (+{len(mail.notices) - 1} more)"
    subject = f"[{ticket.reference}] {_SUBJECTS[mail.kind]}: {summary}"
    context = dict(
        reference=ticket.reference, subject=ticket.subject,
        headlines=headlines, catch_up=mail.kind == MailKind.CATCH_UP, now=f"{now:%Y-%m-%d %H:%M} UTC",
        state=ticket.state, severity=ticket.severity, reporter=ticket.reporter, policy=ticket.policy,
        unreachable=unreachable, disclosure=disclosure_line,
        stages=[{"stage": s.stage, "state": s.state, "due": local(s.stage, s.due_at) if s.due_at else None,
                 "met": f"{s.met_at:%Y-%m-%d %H:%M} UTC" if s.met_at else None} for s in statuses],
        from_name=settings.intake.from_name)
    return notice_mails(settings, ticket, mail, subject, context, now, reply_secret)


def _headline(notice: Notice, due_local: str, now: datetime) -> str:
    if notice.kind == NotificationKind.REMINDER:
        return f"Reminder ({notice.label}): {notice.stage} is due {due_local}, in {format_span(notice.stage_due - now)}"
    overdue = format_span(now - notice.stage_due)
    if notice.kind == NotificationKind.ESCALATION:
        return f"Escalated: {notice.stage} was due {due_local} and is still not met, {overdue} later"
    if notice.label == NotificationKind.BREACH:
        return f"Breached: {notice.stage} was due {due_local} ({overdue} ago) and is not met"
    return f"Still breached ({notice.label}): {notice.stage} was due {due_local}, {overdue} ago"


# -- read side: `intake reminders REF` -----------------------------------------------------


@dataclass(frozen=True)
class Suppressed:
    """A notification never mailed because it fell due before its ticket was imported."""

    key: str
    stage: str | None
    point: str
    at: datetime  # when it fell due
    imported_at: datetime
    recorded_at: datetime | None  # when a sweep recorded it; None: the next sweep will

    @property
    def why(self) -> str:
        if self.point == NotificationKind.BREACH:
            return (f"{self.stage} was past due when the ticket was imported from history at "
                    f"{self.imported_at:%Y-%m-%d %H:%M} UTC: no breach notice, repeat or escalation is mailed for it")
        return (f"fell due before the ticket was imported from history at {self.imported_at:%Y-%m-%d %H:%M} UTC: "
                "not mailed")

    def as_dict(self) -> dict[str, Any]:
        return {"key": self.key, "stage": self.stage, "point": self.point, "at": self.at.isoformat(),
                "recorded_at": self.recorded_at.isoformat() if self.recorded_at else None, "why": self.why}


@dataclass(frozen=True)
class TicketReminders:
    reference: str
    sent: list[Notification]
    due_now: list[Notice]  # due at *now*, for the next sweep to send
    next: dict[str, Upcoming]  # per unmet stage: what comes after
    imported_at: datetime | None = None  # opened by `intake import`
    suppressed: list[Suppressed] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "ticket": self.reference,
            "imported_at": self.imported_at.isoformat() if self.imported_at else None,
            "sent": [{"key": n.key, "kind": n.kind, "stage": n.stage, "point": n.label, "at": n.due_at.isoformat(),
                      "queued_at": n.created_at.isoformat(), "to": n.recipients} for n in self.sent],
            NotificationKind.SUPPRESSED: [item.as_dict() for item in self.suppressed],
            "due_now": [{"key": n.key, "kind": n.kind, "stage": n.stage, "point": n.label, "at": n.at.isoformat()}
                        for n in self.due_now],
            "next": [{"stage": stage, "kind": u.kind, "point": u.label, "at": u.at.isoformat()}
                     for stage, u in self.next.items()],
        }


def ticket_reminders(engine: Engine, settings: Settings, reference: str, now: datetime) -> TicketReminders:
    """What was sent for ticket *reference*, what is due now and what each stage gets next."""
    with read_session(engine) as session:
        ticket = find(session, reference)
        sent = list(session.scalars(select(Notification).where(Notification.ticket_id == ticket.id)
                                    .order_by(Notification.created_at, Notification.id)))
        rows = list(session.scalars(select(Deadline).where(Deadline.ticket_id == ticket.id)
                                    .order_by(Deadline.position)))
    keys = {notification.key for notification in sent}
    plans = [(row.stage, plan_stage(settings, ticket, row, keys, now)) for row in rows]
    suppressed = []
    if ticket.imported_at is not None:
        suppressed = [Suppressed(n.key, n.stage, n.label, n.due_at, ticket.imported_at, n.created_at)
                      for n in sent if n.kind == NotificationKind.SUPPRESSED]
        suppressed += [Suppressed(n.key, n.stage, n.label, n.at, ticket.imported_at, None)
                       for _, plan in plans for n in plan.suppressed]
    return TicketReminders(ticket.reference, [n for n in sent if n.kind != NotificationKind.SUPPRESSED],
                           [n for _, plan in plans for n in plan.notices],
                           {stage: plan.next for stage, plan in plans if plan.next}, ticket.imported_at, suppressed)

