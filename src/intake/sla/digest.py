"""Digests: a summary of the open tickets for maintainers, on the schedules in ``[scheduler.digests]``.

One job: build a named digest as of ``now`` and send it once per scheduled period. Each schedule
is a crontab line read in its own IANA time zone (08:00 Europe/Berlin is 07:00 UTC in winter and
06:00 UTC in summer); the period a digest belongs to is the schedule's latest fire time at or
before ``now``, and ``digest:<name>:<period>`` in the ``notification`` table makes it go out once
whoever sends it (the scheduler of either of two ``intake serve`` processes, or ``intake digest
--send``). Sections: new since the last digest, due soon, breached, waiting on the reporter,
disclosure dates coming up, reporters who became unreachable since the last digest (a bounce, or
the relay refusing our mail to them), mail held since the last digest (made no ticket: counted per
decision, the spam, failed and unthreaded automatic ones named by message id), and counts by state
and severity. Each section names at most the schedule's ``list_limit`` tickets (held mail:
``HELD_LIMIT`` messages) and counts the rest ("... and N more"); every count, the footer's
figures included (:mod:`intake.sla.stats`), is an SQL aggregate, so building one takes the same
memory for ten tickets or a hundred thousand.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from apscheduler.triggers.cron import CronTrigger
from sqlalchemy import Engine, func, select
from sqlmodel import Session

from intake.config.scheduler_section import DigestSchedule
from intake.config.settings import Settings
from intake.send import composer, outbox
from intake.sla import stats
from intake.sla.calendars import format_span, parse_duration
from intake.store.db import insert_new, read_session, write_session
from intake.store.models import Deadline, DisclosurePlan, Notification, Ticket
from intake.tickets import held, undeliverable
from intake.vocabulary import (
    FINISHED_STATES, SEVERITIES, DigestStatus, MailKind, Milestone, NotificationKind, TicketState,
)

HELD_LIMIT = 20  # held messages named in the digest; the rest are counted
# How far back the latest fire time of a schedule is looked for, widening step by step.
_LOOKBACKS = (timedelta(hours=2), timedelta(days=2), timedelta(days=9), timedelta(days=32), timedelta(days=367),
              timedelta(days=4 * 366 + 1))
_MAX_FIRES_STEPPED = 3000
_NO_SEVERITY = "unassessed"


class DigestNotFound(LookupError):
    """No digest schedule of that name in the configuration."""


def schedule_of(settings: Settings, name: str) -> DigestSchedule:
    try:
        return settings.scheduler.digests[name]
    except KeyError:
        known = ", ".join(sorted(settings.scheduler.digests)) or "none configured"
        raise DigestNotFound(f"no digest schedule {name!r} (known: {known})") from None


def latest_fire_time(trigger: CronTrigger, now: datetime) -> datetime | None:
    """The schedule's latest fire time at or before *now* (None if it has none in four years)."""
    for lookback in _LOOKBACKS:
        fire = trigger.get_next_fire_time(None, now - lookback)
        if fire is None or fire > now:
            continue
        for _ in range(_MAX_FIRES_STEPPED):  # bounded: the lookbacks keep the steps few
            following = trigger.get_next_fire_time(fire, fire + timedelta(seconds=1))
            if following is None or following > now:
                return fire
            fire = following
        return fire
    return None


@dataclass(frozen=True)
class DigestLine:
    reference: str
    subject: str
    detail: str


@dataclass(frozen=True)
class DigestSection:
    key: str
    title: str
    total: int
    lines: list[DigestLine]
    counts: dict[str, int] = field(default_factory=dict)  # held mail: per decision
    listable: int | None = None  # held mail: how many could be named (of total)

    @property
    def more(self) -> int:
        return (self.total if self.listable is None else self.listable) - len(self.lines)


@dataclass(frozen=True)
class Digest:
    name: str
    period: datetime  # the scheduled time it is for
    since: datetime  # "new" means received after this: the last digest's period
    now: datetime
    timezone: str
    list_limit: int  # the most tickets a section names
    sections: list[DigestSection]
    counts: dict[str, dict[str, int]]  # open tickets: state -> severity -> count
    metrics: stats.Stats | None = None  # the footer: `intake stats` over the last STATS_WINDOW

    @property
    def empty(self) -> bool:
        return not any(section.total for section in self.sections)

    @property
    def key(self) -> str:
        return f"digest:{self.name}:{self.period.astimezone(ZoneInfo('UTC')):%Y-%m-%dT%H:%MZ}"

    def local(self, instant: datetime) -> str:
        return instant.astimezone(ZoneInfo(self.timezone)).strftime("%a %d %b %Y %H:%M %Z")

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "period": self.period.isoformat(), "since": self.since.isoformat(),
            "now": self.now.isoformat(), "timezone": self.timezone, "empty": self.empty, "key": self.key,
            "sections": {section.key: {"title": section.title, "total": section.total,
                                       "tickets": [line.reference for line in section.lines],
                                       "lines": [vars(line) for line in section.lines],
                                       **({"counts": section.counts} if section.key == "held" else {})}
                         for section in self.sections},
            "counts": self.counts,
            "metrics": self.metrics.as_dict() if self.metrics else None,
        }


# The footer's figures cover this much history (what `intake stats` shows by default).
STATS_WINDOW = timedelta(days=90)


def build(engine: Engine, settings: Settings, name: str, now: datetime) -> Digest:
    """Digest *name* as of *now*."""
    schedule = schedule_of(settings, name)
    trigger = schedule.trigger()
    period = latest_fire_time(trigger, now) or now
    with read_session(engine) as session:
        last = session.scalar(select(func.max(Notification.due_at))
                              .where(Notification.kind == NotificationKind.DIGEST, Notification.label == name))
        since = last or latest_fire_time(trigger, period - timedelta(seconds=1)) or period - timedelta(days=1)
        due_within = parse_duration(schedule.due_within).elapsed
        disclosures_within = parse_duration(schedule.disclosures_within).elapsed
        digest = Digest(name, period, since, now, schedule.timezone, schedule.list_limit, [], {})
        sections = [
            _new_tickets(session, digest),
            _deadlines(session, digest, "due_soon", f"Due in the next {schedule.due_within}",
                       Deadline.due_at > now, Deadline.due_at <= now + due_within),
            _deadlines(session, digest, "breached", "Breached (past due, not met)", Deadline.due_at <= now),
            _waiting(session, digest),
            _deadlines(session, digest, "disclosures", f"Disclosure dates in the next {schedule.disclosures_within}",
                       Deadline.due_at > now, Deadline.due_at <= now + disclosures_within,
                       Deadline.stage.in_(_disclosure_stages(settings))),
            _coordinated_disclosures(session, digest, schedule.disclosures_within),
            _unreachable(session, digest),
            _held(session, digest),
        ]
        counts = _counts(session)
    return Digest(name, period, since, now, schedule.timezone, schedule.list_limit, sections, counts,
                  stats.compute(engine, now - STATS_WINDOW, now))


def _disclosure_stages(settings: Settings) -> set[str]:
    """Names of stages met by a disclosure (embargo ends), in any policy."""
    return {stage.name for policy in settings.policies.values() for stage in policy.stages
            if stage.milestone == Milestone.DISCLOSED}


def _section(session: Session, digest: Digest, query: Any, key: str, title: str, line: Any) -> DigestSection:
    """The section of *query*'s rows: counted in the database, the first ``list_limit`` named."""
    total = session.scalar(select(func.count()).select_from(query.order_by(None).subquery())) or 0
    lines = [line(*row) for row in session.execute(query.limit(digest.list_limit))]
    return DigestSection(key, title, total, lines)


def _new_tickets(session: Session, digest: Digest) -> DigestSection:
    query = (select(Ticket.reference, Ticket.subject, Ticket.reporter, Ticket.received_at, Ticket.state)
             .where(Ticket.received_at > digest.since, Ticket.received_at <= digest.now)
             .order_by(Ticket.received_at, Ticket.id))
    return _section(session, digest, query, "new", "New since the last digest",
                    lambda ref, subject, reporter, received, state: DigestLine(
                        ref, subject, f"from {reporter}, received {digest.local(received)}, {state}"))


def _deadlines(session: Session, digest: Digest, key: str, title: str, *conditions: Any) -> DigestSection:
    """Unmet stages of open tickets matching *conditions* on their due instant (the indexed
    ``due_at`` of unmet deadlines), soonest first."""
    query = (select(Ticket.reference, Ticket.subject, Deadline.stage, Deadline.due_at, Ticket.severity)
             .join(Ticket, Ticket.id == Deadline.ticket_id)
             .where(Deadline.met_at.is_(None), *conditions, Ticket.state.not_in(FINISHED_STATES))
             .order_by(Deadline.due_at, Deadline.id))

    def line(ref: str, subject: str, stage: str, due: datetime, severity: str | None) -> DigestLine:
        when = f"in {format_span(due - digest.now)}" if due > digest.now else f"{format_span(digest.now - due)} ago"
        return DigestLine(ref, subject, f"{stage} due {digest.local(due)} ({when}), severity {severity or _NO_SEVERITY}")

    return _section(session, digest, query, key, title, line)


def _coordinated_disclosures(session: Session, digest: Digest, within: str) -> DigestSection:
    """Tickets not closed whose agreed disclosure date, or else the reporter's proposed one, falls
    within *within* (see :mod:`intake.tickets.disclosure`), soonest first."""
    when = func.coalesce(DisclosurePlan.agreed_date, DisclosurePlan.proposed_date)
    query = (select(Ticket.reference, Ticket.subject, DisclosurePlan.agreed_date, DisclosurePlan.proposed_date)
             .join(Ticket, Ticket.id == DisclosurePlan.ticket_id)
             .where(when >= digest.now.date(), when <= (digest.now + parse_duration(within).elapsed).date(),
                    Ticket.state != TicketState.CLOSED)
             .order_by(when, Ticket.id))

    def line(ref: str, subject: str, agreed: date | None, proposed: date | None) -> DigestLine:
        parts = [f"agreed for {agreed:%a %d %b %Y}"] if agreed else []
        if proposed and proposed != agreed:
            parts.append(f"the reporter proposes {proposed:%a %d %b %Y}" + ("" if agreed else ", not agreed yet"))
        return DigestLine(ref, subject, "disclosure " + "; ".join(parts))

    return _section(session, digest, query, "coordinated_disclosures", f"Coordinated disclosure dates in the next {within}",
                    line)


def _waiting(session: Session, digest: Digest) -> DigestSection:
    query = (select(Ticket.reference, Ticket.subject, Ticket.reporter, Ticket.updated_at)
             .where(Ticket.state == TicketState.WAITING).order_by(Ticket.updated_at, Ticket.id))
    return _section(session, digest, query, "waiting", "Waiting on the reporter",
                    lambda ref, subject, reporter, updated: DigestLine(
                        ref, subject, f"asked {reporter}; last change {digest.local(updated)}"))


def _unreachable(session: Session, digest: Digest) -> DigestSection:
    """Tickets whose reporter was flagged unreachable since the last digest, with why."""
    query = (select(Ticket.id, Ticket.reference, Ticket.subject, Ticket.reporter, Ticket.reporter_unreachable_at)
             .where(Ticket.reporter_unreachable_at > digest.since, Ticket.reporter_unreachable_at <= digest.now)
             .order_by(Ticket.reporter_unreachable_at, Ticket.id))
    total = session.scalar(select(func.count()).select_from(query.order_by(None).subquery())) or 0
    rows = session.execute(query.limit(digest.list_limit)).all()
    why = undeliverable.reasons(session, [row.id for row in rows])
    return DigestSection("unreachable", "Reporter unreachable since the last digest", total, [
        DigestLine(row.reference, row.subject, f"{row.reporter} since {digest.local(row.reporter_unreachable_at)}: "
                                               f"{why.get(row.id) or 'no reason recorded'}")
        for row in rows])


def _held(session: Session, digest: Digest) -> DigestSection:
    """Messages held (no ticket of their own) since the last digest: a count per decision, and the
    spam, failures and automatic mail threading nowhere by id, for `intake messages show ID`."""
    counts = held.counts(session, digest.since, digest.now)
    listable, messages = held.listed(session, digest.since, digest.now, HELD_LIMIT)
    return DigestSection("held", "Held since the last digest", sum(counts.values()), [
        DigestLine(f"message {message.id}", message.subject,
                   f"{message.label}, from <{message.mail_from}>, {digest.local(message.processed_at)}")
        for message in messages], counts, listable)


def _counts(session: Session) -> dict[str, dict[str, int]]:
    rows = session.execute(select(Ticket.state, Ticket.severity, func.count())
                           .where(Ticket.state.not_in(FINISHED_STATES)).group_by(Ticket.state, Ticket.severity))
    counts: dict[str, dict[str, int]] = {}
    for state, severity, count in rows:
        by_severity = counts.setdefault(state, {each: 0 for each in (*SEVERITIES, _NO_SEVERITY)})
        by_severity[severity or _NO_SEVERITY] += count
    return dict(sorted(counts.items()))


def _context(settings: Settings, digest: Digest) -> dict[str, Any]:
    return dict(
        name=digest.name, period=digest.local(digest.period), sections=digest.sections,
        severities=[*SEVERITIES, _NO_SEVERITY], from_name=settings.intake.from_name,
        counts=[{"state": state, "counts": by, "total": sum(by.values())} for state, by in digest.counts.items()],
        metrics=digest.metrics.render_text() if digest.metrics else "",
        metrics_window=f"{STATS_WINDOW.days} days")


def text(settings: Settings, digest: Digest) -> str:
    """The digest's plain text (what ``intake digest NAME --preview`` shows)."""
    return composer.render("digest.txt.j2", settings.templates_path, **_context(settings, digest))


def render(settings: Settings, digest: Digest, recipients: list[str]) -> composer.OutgoingMail:
    """The digest as mail: plain text with an HTML alternative."""
    html = composer.render("digest.html.j2", settings.templates_path, **_context(settings, digest))
    totals = ", ".join(f"{section.total} {section.key.replace('_', ' ')}" for section in digest.sections[:3])
    return composer.notice(
        MailKind.DIGEST, dedupe_key=digest.key, ticket=None,
        subject=f"[intake] {digest.name} digest {digest.local(digest.period)}: {totals}", recipients=recipients,
        sender=(settings.intake.from_name, settings.smtp.addresses[0]), reply_to=None, text=text(settings, digest), html=html,
        message_id_domain=settings.intake.message_id_domain, now=digest.now)


@dataclass(frozen=True)
class DigestOutcome:
    status: str  # DigestStatus
    digest: Digest


def send(engine: Engine, settings: Settings, name: str, now: datetime) -> DigestOutcome:
    """Send digest *name* for its period at *now*, unless it went out for that period already or
    it is empty (and the schedule does not send empty ones)."""
    digest = build(engine, settings, name, now)
    recipients = settings.digest_recipients(name)
    if not recipients:
        return DigestOutcome(DigestStatus.NO_RECIPIENTS, digest)
    if digest.empty and not settings.scheduler.digests[name].send_empty:
        return DigestOutcome(DigestStatus.EMPTY, digest)
    mail = render(settings, digest, recipients)
    with write_session(engine) as session:
        recorded = insert_new(session, Notification.__table__, "key", [dict(
            key=digest.key, kind=NotificationKind.DIGEST, ticket_id=None, stage=None, label=name, due_at=digest.period,
            created_at=now, recipients=recipients, outbox_key=digest.key)])
        if not recorded:
            return DigestOutcome(DigestStatus.ALREADY_SENT, digest)
        outbox.enqueue(session, mail, ticket_id=None, now=now)
    return DigestOutcome(DigestStatus.SENT, digest)
