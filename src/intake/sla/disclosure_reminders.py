"""The sweep's disclosure reminders: 7 and 1 days before a ticket's agreed disclosure date.

One job: for each ticket with an agreed date (``intake disclose-date``, see
:mod:`intake.tickets.disclosure`) coming within :data:`POINTS`' reach, tell the maintainers (the
sweep's notice recipients, as other reminders) and the reporter (threaded, from the intake address,
encrypted where a key is on file), each once per point and date.

* **Points** are midnight 7 days and 1 day before the date, in the time zone of the calendar
  the policy's ``disclose`` stage counts in (else the policy's; UTC for a policy no longer
  configured): a date agreed with a team in Brisbane is a Brisbane day. Only the latest point passed
  counts: after downtime the 1-day reminder goes, not both. A point that had passed when the date
  was agreed is skipped, not sent late (a date agreed 5 days ahead gets the 1-day reminder only).
* **Exactly once** per point, date and audience: the keys ``disclose:<ref>:<date>:<N>d`` (the
  maintainers) and ``…:reporter`` are unique in the ``notification`` table and inserted (``ON
  CONFLICT DO NOTHING``) in the transaction that queues their mail, so repeated or concurrent
  sweeps, on any node, send it once; a moved date has other keys and is reminded again.
* **Not** for a ticket that is closed or disclosed already, nor to an unreachable reporter (the
  maintainers' reminder says so instead).
"""

from __future__ import annotations

from datetime import date, datetime, time, timedelta, timezone, tzinfo

from sqlalchemy import Engine, select
from sqlmodel import Session

from intake.config.settings import Settings
from intake.send import composer, outbox
from intake.sla import deadlines
from intake.sla.notices import Notice, PlannedMail, notice_mails
from intake.store.db import insert_new, read_session, write_session
from intake.store.models import Deadline, DisclosurePlan, Notification, Ticket
from intake.tickets import correspondence, milestones, updates
from intake.understand import reply_tokens
from intake.understand.header_text import clean_text
from intake.vocabulary import MILESTONE_SPEC, SYSTEM_ACTOR, MailKind, Milestone, NotificationKind, TicketState

# Days before the agreed date, farthest first.
POINTS = (7, 1)
# How the notices name what they are about (their "stage").
STAGE = "disclosure-date"
_REPORTER = "reporter"
# Tickets looked at per sweep at most; the rest wait for the next.
MAX_PER_SWEEP = 10_000


def zone_of(settings: Settings, policy_name: str) -> tzinfo:
    """The zone a disclosure date of a ticket under *policy_name* is a day in (see the module)."""
    if policy_name not in settings.policies:
        return timezone.utc
    return deadlines.stage_calendar(settings, policy_name, MILESTONE_SPEC[Milestone.DISCLOSED].stage).zone


def _point_at(day: date, days_before: int, zone: tzinfo) -> datetime:
    return datetime.combine(day - timedelta(days=days_before), time(), tzinfo=zone).astimezone(timezone.utc)


def _label(days_before: int) -> str:
    return f"{days_before} day{'s' if days_before > 1 else ''} before"


def due_point(plan: DisclosurePlan, now: datetime, zone: tzinfo) -> int | None:
    """The point (days before) of *plan*'s agreed date (a day in *zone*) due at *now*: the latest
    one passed, unless it had passed already when the date was agreed."""
    assert plan.agreed_date is not None and plan.agreed_at is not None
    if now >= _point_at(plan.agreed_date, 0, zone):
        return None  # the day itself has come
    passed = [days for days in POINTS if _point_at(plan.agreed_date, days, zone) <= now]
    if not passed or _point_at(plan.agreed_date, passed[-1], zone) < plan.agreed_at:
        return None
    return passed[-1]


def sweep(engine: Engine, settings: Settings, now: datetime, dry_run: bool = False) -> list[PlannedMail]:
    """Send (unless *dry_run*) the disclosure reminders due at *now*; the mails planned."""
    # Before any transaction (it may have to make one), as the sweep's own.
    reply_secret = b"" if dry_run else reply_tokens.secret(engine)
    with (read_session(engine) if dry_run else write_session(engine)) as session:
        # A day either side of UTC's date: every zone's date now is among them (due_point decides).
        candidates = session.execute(
            select(DisclosurePlan, Ticket).join(Ticket, Ticket.id == DisclosurePlan.ticket_id)
            .where(DisclosurePlan.agreed_date >= now.date(),
                   DisclosurePlan.agreed_date <= now.date() + timedelta(days=max(POINTS) + 1),
                   Ticket.state != TicketState.CLOSED)
            .order_by(DisclosurePlan.agreed_date, DisclosurePlan.ticket_id).limit(MAX_PER_SWEEP)).all()
        sent = set(session.scalars(select(Notification.key).where(
            Notification.ticket_id.in_([ticket.id for _, ticket in candidates]),
            Notification.kind == NotificationKind.DISCLOSURE_REMINDER)))
        planned = [mail for plan, ticket in candidates
                   for mail in _plan(session, settings, plan, ticket, sent, now)]
        if dry_run or not planned:
            return planned
        inserted = insert_new(session, Notification.__table__, "key", [
            dict(key=n.key, kind=n.kind, ticket_id=n.ticket_id, stage=n.stage, label=n.label, due_at=n.at,
                 created_at=now, recipients=mail.recipients, outbox_key=mail.key)
            for mail in planned for n in mail.notices])
        kept = [mail for mail in planned if mail.key in inserted]  # a concurrent sweep took the rest
        _send(session, settings, kept, {ticket.id: (plan, ticket) for plan, ticket in candidates}, now, reply_secret)
    return kept


def _plan(session: Session, settings: Settings, plan: DisclosurePlan, ticket: Ticket, sent: set[str],
          now: datetime) -> list[PlannedMail]:
    zone = zone_of(settings, ticket.policy)
    days = due_point(plan, now, zone)
    if days is None or milestones.reached(session, settings, ticket, Milestone.DISCLOSED):
        return []
    assert plan.agreed_date is not None
    key = f"disclose:{ticket.reference}:{plan.agreed_date.isoformat()}:{days}d"
    at, due = _point_at(plan.agreed_date, days, zone), _point_at(plan.agreed_date, 0, zone)
    mails = []
    if key not in sent and settings.notice_recipients:
        notice = Notice(key, NotificationKind.DISCLOSURE_REMINDER, ticket.id, ticket.reference, STAGE,
                        _label(days), at, due, late=False)
        mails.append(PlannedMail(MailKind.REMINDER, ticket.id, ticket.reference, settings.notice_recipients,
                                 [notice]))
    reporter_key = f"{key}:{_REPORTER}"
    if reporter_key not in sent and ticket.reporter_unreachable_at is None:
        notice = Notice(reporter_key, NotificationKind.DISCLOSURE_REMINDER, ticket.id, ticket.reference, STAGE,
                        f"{_label(days)} ({_REPORTER})", at, due, late=False)
        mails.append(PlannedMail(MailKind.DISCLOSURE_REMINDER, ticket.id, ticket.reference, [ticket.reporter],
                                 [notice]))
    return mails


def _send(session: Session, settings: Settings, mails: list[PlannedMail],
          tickets: dict[int, tuple[DisclosurePlan, Ticket]], now: datetime, reply_secret: bytes) -> None:
    for mail in mails:
        plan, ticket = tickets[mail.ticket_id]
        assert plan.agreed_date is not None
        days = (plan.agreed_date - now.astimezone(zone_of(settings, ticket.policy)).date()).days
        if mail.kind == MailKind.DISCLOSURE_REMINDER:
            language = settings.language_for(ticket.language)
            text = composer.render(
                "disclosure-reminder.txt.j2", settings.templates_path, language, reference=ticket.reference,
                subject=clean_text(ticket.subject), date=updates.date_words(plan.agreed_date, language), days=days,
                message="", from_name=settings.intake.from_name, intake_address=ticket.intake_address)
            correspondence.mail_reporter(session, settings, ticket, text, kind=MailKind.DISCLOSURE_REMINDER, now=now,
                                         actor=SYSTEM_ACTOR, dedupe_key=mail.key, language=language,
                                         detail={"date": plan.agreed_date.isoformat(), "point": mail.notices[0].label})
        else:
            outbox.enqueue_many(session, [(notice, ticket.id) for notice in
                                          _maintainer_notices(session, settings, plan, ticket, mail, days, now,
                                                              reply_secret)], now=now)


def _maintainer_notices(session: Session, settings: Settings, plan: DisclosurePlan, ticket: Ticket,
                        mail: PlannedMail, days: int, now: datetime, reply_secret: bytes) -> list[composer.OutgoingMail]:
    """The maintainers' reminder, in the sweep's notice format, one per recipient."""
    assert plan.agreed_date is not None
    when = updates.date_words(plan.agreed_date)
    rows = session.scalars(select(Deadline).where(Deadline.ticket_id == ticket.id).order_by(Deadline.position))
    statuses = deadlines.statuses_of(settings, ticket, rows, now)
    reporter_told = ("the reporter gets a reminder too" if ticket.reporter_unreachable_at is None
                     else "the reporter is unreachable: they get no reminder")
    context = dict(
        reference=ticket.reference, subject=ticket.subject, catch_up=False, now=f"{now:%Y-%m-%d %H:%M} UTC",
        headlines=[f"Disclosure in {days} day{'s' if days > 1 else ''}: the date agreed with the reporter is {when} "
                   f"(set by {plan.agreed_by}); {reporter_told}"],
        state=ticket.state, severity=ticket.severity, reporter=ticket.reporter, policy=ticket.policy,
        unreachable=None, disclosure=f"{plan.agreed_date.isoformat()} agreed; move it with `intake disclose-date "
                                     f"{ticket.reference} DATE`, record it with `intake disclose {ticket.reference}`",
        stages=[{"stage": s.stage, "state": s.state, "due": f"{s.due_at:%Y-%m-%d %H:%M} UTC" if s.due_at else None,
                 "met": f"{s.met_at:%Y-%m-%d %H:%M} UTC" if s.met_at else None} for s in statuses],
        from_name=settings.intake.from_name)
    subject = f"[{ticket.reference}] Reminder: disclosure on {when}, in {days} day{'s' if days > 1 else ''}"
    return notice_mails(settings, ticket, mail, subject, context, now, reply_secret)
