"""Reminders, breach notices, escalations, quiet hours, catch-up and exactly-once: the SLA sweep.

Reports are stored as the listener stores them (with the instant they arrived) and processed
into tickets by the real processor; every sweep gets an explicit ``now``. Mail is read back from
the outbox, the only place it goes.
"""

from __future__ import annotations

import email
import email.policy
import threading
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import select, update

from conftest import TRUSTED_MX, process, report, trusted_results
from intake.send import outbox
from intake.sla import deadlines, reminders
from intake.store import inbound, schema
from intake.store.db import make_engine, read_session, write_session
from intake.store.models import Deadline, Notification
from intake.tickets import milestones, reads
from intake.understand import reply_tokens

UTC = timezone.utc
BRISBANE = timezone(timedelta(hours=10))
MAINTAINERS = '[{"name": "Mia", "email": "mia@example.com"}, {"name": "Raj", "email": "raj@example.com"}]'

TEST_POLICIES = """
[policies.tenday]
calendar = "utc"
auto_ack_counts = true
remind = ["50%", "24 hours before"]

[[policies.tenday.stages]]
name = "resolve"
duration = "10 days"

[policies.twoday]
calendar = "utc"
auto_ack_counts = true
remind = ["50%"]

[[policies.twoday.stages]]
name = "resolve"
duration = "2 days"
"""


@pytest.fixture
def desk(make_settings, config_file):
    """Settings (with two maintainers and the test policies), an engine, and a way to open tickets
    at a given instant."""
    config_file.write_text(config_file.read_text() + TEST_POLICIES)

    class Desk:
        settings = None
        engine = None

        def configure(self, **env: str) -> Desk:
            env = {"INTAKE_MAINTAINERS": MAINTAINERS, "INTAKE_SCHEDULER__QUIET_HOURS": "false", **env}
            self.settings = make_settings(**env)
            self.engine = make_engine(self.settings.database_url)
            schema.upgrade(self.engine)
            return self

        def open(self, received: datetime, subject: str = "RCE in the importer",
                 sender: str = "alice@researcher.test") -> str:
            raw = report(subject=subject, sender=sender).as_bytes()
            inbound.store(self.engine, [inbound.Arrival(sender, ["security@example.com"], "127.0.0.1", "test", raw,
                                                        received)])
            [reference] = process(self.settings, self.engine, received).tickets_opened
            return reference

        def sweep(self, now: datetime, **kwargs: bool) -> reminders.SweepResult:
            return reminders.sweep(self.engine, self.settings, now, **kwargs)

        def notified(self, reference: str | None = None) -> list[str]:
            with read_session(self.engine) as session:
                query = select(Notification.key).order_by(Notification.id)
                return [key for key in session.scalars(query) if reference is None or reference in key]

        def mails(self, kind: str | None = None, to: str | None = "mia@example.com") -> list:
            """Queued mail of *kind*, to *to* (each maintainer gets their own copy; None: all)."""
            rows = sorted(outbox.listing(self.engine, limit=10_000), key=lambda r: r.id)
            return [r for r in rows if (kind is None or r.kind == kind) and (to is None or to in r.recipients)]

    return Desk()


def keys(result: reminders.SweepResult) -> list[str]:
    return [notice.key for mail in result.mails for notice in mail.notices]


def body(raw: bytes) -> str:
    return email.message_from_bytes(raw, policy=email.policy.default).get_body(("plain",)).get_content()


def header(raw: bytes, name: str) -> str:
    return str(email.message_from_bytes(raw, policy=email.policy.default)[name])


T0 = datetime(2026, 6, 1, 10, 0, tzinfo=UTC)  # a Monday


# -- reminder points -----------------------------------------------------------------------


def test_reminder_points_in_calendar_time_each_sent_once(desk):
    desk.configure(INTAKE_INTAKE__DEFAULT_POLICY="tenday")
    ref = desk.open(T0)  # resolve due T0 + 10 days; 50% at +5 days; 24 hours before at +9 days
    assert keys(desk.sweep(T0 + timedelta(days=5) - timedelta(minutes=1))) == []
    assert keys(desk.sweep(T0 + timedelta(days=5))) == [f"remind:{ref}:resolve:50%"]
    assert keys(desk.sweep(T0 + timedelta(days=5, hours=1))) == []  # exactly once
    assert keys(desk.sweep(T0 + timedelta(days=9, minutes=1))) == [f"remind:{ref}:resolve:24 hours before"]

    [first, second] = desk.mails("reminder")  # Mia's copies; Raj has his own
    assert [m.recipients for m in desk.mails("reminder", to=None)] == [["mia@example.com"], ["raj@example.com"]] * 2
    assert header(first.raw, "Subject").startswith(f"[{ref}] Reminder: resolve due")
    assert "Reminder (50%): resolve is due Thu 11 Jun 2026 10:00 UTC, in 5d" in body(first.raw)
    # Replies go to Mia's own signed reply address for the ticket, which threads back into it.
    assert header(second.raw, "Reply-To") == reply_tokens.reply_address(
        reply_tokens.secret(desk.engine), "security@example.com", ref, "mia@example.com",
        T0 + timedelta(days=9, minutes=1))


def test_reminder_points_in_business_time_count_working_days(desk, config_file):
    # vectis-mail: acknowledge within 2 business days in Brisbane; received Friday 15:00 AEST, so
    # due Tuesday 15:00 and 50% is one *working* day in: Monday 15:00, not Sunday 15:00.
    config_file.write_text(config_file.read_text().replace("[policies.vectis-mail]\n",
                                                           '[policies.vectis-mail]\nremind = ["50%"]\n'))
    desk.configure(INTAKE_INTAKE__DEFAULT_POLICY="vectis-mail")
    received = datetime(2026, 6, 5, 15, 0, tzinfo=BRISBANE)
    ref = desk.open(received)
    assert keys(desk.sweep(datetime(2026, 6, 7, 15, 1, tzinfo=BRISBANE))) == []  # Sunday
    assert keys(desk.sweep(datetime(2026, 6, 8, 15, 1, tzinfo=BRISBANE))) == [f"remind:{ref}:acknowledge:50%"]


def test_a_policys_stage_can_have_its_own_reminder_points(desk, config_file):
    config_file.write_text(config_file.read_text().replace(
        'name = "resolve"\nduration = "2 days"', 'name = "resolve"\nduration = "2 days"\nremind = ["6 hours before"]'))
    desk.configure(INTAKE_INTAKE__DEFAULT_POLICY="twoday")
    ref = desk.open(T0)
    assert keys(desk.sweep(T0 + timedelta(days=1, minutes=1))) == []  # the policy's 50% does not apply
    assert keys(desk.sweep(T0 + timedelta(hours=42))) == [f"remind:{ref}:resolve:6 hours before"]


# -- breaches, repeats, escalation ------------------------------------------------------------


def test_breach_notice_repeats_daily_until_the_stage_is_met(desk):
    desk.configure(INTAKE_INTAKE__DEFAULT_POLICY="twoday")
    ref = desk.open(T0)
    due = T0 + timedelta(days=2)
    assert keys(desk.sweep(due + timedelta(minutes=1))) == [f"breach:{ref}:resolve:0"]
    assert keys(desk.sweep(due + timedelta(hours=23))) == []
    assert keys(desk.sweep(due + timedelta(days=1, minutes=1))) == [f"breach:{ref}:resolve:1"]
    [breach, repeat] = desk.mails("breach")
    assert "Breached: resolve was due" in body(breach.raw)
    assert "Still breached (repeat 1)" in body(repeat.raw)

    with write_session(desk.engine) as session:
        ticket = reads.find(session, ref)
        now = due + timedelta(days=1, hours=2)
        milestones.record(session, desk.settings, ticket, "acknowledged", at=now, now=now, actor="mia", force=True)
        milestones.assess(session, desk.settings, ticket, "low", at=now, now=now, actor="mia", force=True)
        milestones.record(session, desk.settings, ticket, "resolved", at=now, now=now, actor="mia")
    assert keys(desk.sweep(due + timedelta(days=5))) == []  # met: no more notices


def test_escalation_goes_to_the_second_list_after_the_delay_once(desk):
    desk.configure(INTAKE_INTAKE__DEFAULT_POLICY="twoday", INTAKE_SCHEDULER__ESCALATE_TO='["ciso@example.com"]',
                   INTAKE_SCHEDULER__ESCALATION_DELAY="12 hours")
    ref = desk.open(T0)
    due = T0 + timedelta(days=2)
    assert keys(desk.sweep(due + timedelta(hours=1))) == [f"breach:{ref}:resolve:0"]
    assert keys(desk.sweep(due + timedelta(hours=11, minutes=59))) == []
    assert keys(desk.sweep(due + timedelta(hours=12))) == [f"escalate:{ref}:resolve"]
    assert keys(desk.sweep(due + timedelta(hours=18))) == []
    [escalation] = desk.mails("escalation", to=None)
    assert escalation.recipients == ["ciso@example.com"]
    assert "Escalated: resolve was due" in body(escalation.raw)
    # Not a maintainer: no signed reply address, the ticket's +tag address instead.
    assert header(escalation.raw, "Reply-To") == f"security+{ref}@example.com"
    # The breach notice (an hour after the due time, past misfire_grace: sent as a catch-up) went to
    # each maintainer, not to the escalation list.
    assert sorted(m.recipients[0] for m in desk.mails("catch-up", to=None)) == ["mia@example.com", "raj@example.com"]


# -- quiet hours ------------------------------------------------------------------------------


def test_quiet_hours_hold_reminders_to_working_hours_but_not_breaches(desk):
    # twoday from Thursday 03:00 UTC: 50% is Friday 03:00 (night), due Saturday 03:00 (weekend).
    desk.configure(INTAKE_INTAKE__DEFAULT_POLICY="twoday", INTAKE_SCHEDULER__QUIET_HOURS="true")
    received = datetime(2026, 6, 4, 3, 0, tzinfo=UTC)
    ref = desk.open(received)
    night = desk.sweep(datetime(2026, 6, 5, 3, 1, tzinfo=UTC))
    assert keys(night) == [] and night.held == 1
    [upcoming] = reminders.ticket_reminders(desk.engine, desk.settings, ref, night.now).as_dict()["next"]
    assert (upcoming["kind"], upcoming["at"]) == ("reminder", "2026-06-05T09:00:00+00:00")
    assert keys(desk.sweep(datetime(2026, 6, 5, 8, 59, tzinfo=UTC))) == []
    assert keys(desk.sweep(datetime(2026, 6, 5, 9, 0, tzinfo=UTC))) == [f"remind:{ref}:resolve:50%"]
    # The breach on Saturday 03:00 is not held for Monday.
    assert keys(desk.sweep(datetime(2026, 6, 6, 3, 1, tzinfo=UTC))) == [f"breach:{ref}:resolve:0"]


def test_without_quiet_hours_a_reminder_goes_at_its_point(desk):
    desk.configure(INTAKE_INTAKE__DEFAULT_POLICY="twoday", INTAKE_SCHEDULER__QUIET_HOURS="false")
    ref = desk.open(datetime(2026, 6, 4, 3, 0, tzinfo=UTC))
    assert keys(desk.sweep(datetime(2026, 6, 5, 3, 1, tzinfo=UTC))) == [f"remind:{ref}:resolve:50%"]


# -- restarts, downtime, concurrency ----------------------------------------------------------


def test_a_restart_between_two_sweeps_sends_nothing_twice(desk, make_settings):
    desk.configure(INTAKE_INTAKE__DEFAULT_POLICY="tenday")
    ref = desk.open(T0)
    first = desk.sweep(T0 + timedelta(days=5, minutes=1))
    desk.engine.dispose()
    desk.configure(INTAKE_INTAKE__DEFAULT_POLICY="tenday")  # a new process: fresh settings and engine
    assert keys(desk.sweep(T0 + timedelta(days=5, minutes=2))) == []
    assert keys(first) == [f"remind:{ref}:resolve:50%"]
    assert [m.dedupe_key for m in desk.mails("reminder", to=None)] == [
        f"remind:{ref}:resolve:50%>mia@example.com", f"remind:{ref}:resolve:50%>raj@example.com"]


def test_after_three_days_down_one_catch_up_per_ticket_states_where_it_stands(desk):
    desk.configure(INTAKE_INTAKE__DEFAULT_POLICY="vectis-mail")
    received = datetime(2026, 6, 1, 9, 0, tzinfo=BRISBANE)  # Monday
    first, second = desk.open(received), desk.open(received, subject="SSRF", sender="bob@researcher.test")
    assert keys(desk.sweep(received + timedelta(hours=1))) == []
    # Stopped for three days: acknowledge (due Wed 09:00) passed its 50%, 80% and 24-hours-before
    # points and breached; assess passed its 50% point too.
    after = desk.sweep(received + timedelta(days=3, hours=4))
    assert sorted(mail.reference for mail in after.mails) == [first, second]
    for mail in after.mails:
        assert mail.kind == "catch-up"
        assert sorted(notice.key.split(":")[0] + ":" + notice.stage for notice in mail.notices) == [
            "breach:acknowledge", "remind:assess"]
    [catch_up, _] = desk.mails("catch-up")
    text = body(catch_up.raw)
    assert header(catch_up.raw, "Subject").startswith(f"[{first}] Catch-up:")
    assert "here is where" in text and "- acknowledge: breached" in text and "- assess: ok" in text
    assert keys(desk.sweep(received + timedelta(days=3, hours=4, minutes=1))) == []
    # Missed points were never sent one by one.
    assert not [key for key in desk.notified() if key.endswith((":80%", ":24 hours before"))]


def sweep_twice_at_once(settings, now: datetime) -> list[str]:  # type: ignore[no-untyped-def]
    """Two sweeps at *now* started together, each with an engine of its own (as two nodes have);
    the keys of the notices they sent, all together."""
    results: list[reminders.SweepResult] = []
    start = threading.Barrier(2)

    def run() -> None:
        engine = make_engine(settings.database_url)
        start.wait()
        results.append(reminders.sweep(engine, settings, now))
        engine.dispose()

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return [notice.key for result in results for mail in result.mails for notice in mail.notices]


def test_two_sweepers_at_once_never_send_twice(desk):
    desk.configure(INTAKE_INTAKE__DEFAULT_POLICY="twoday")
    references = [desk.open(T0 + timedelta(seconds=n), sender=f"r{n}@researcher.test") for n in range(40)]
    now = T0 + timedelta(days=1, minutes=2)  # every ticket's 50% point passed within misfire_grace
    sent = sweep_twice_at_once(desk.settings, now)
    assert sorted(sent) == sorted(f"remind:{ref}:resolve:50%" for ref in references)
    assert len(desk.mails("reminder")) == 40


def test_recompute_gives_a_deadline_stored_without_a_notice_time_its_first(desk):
    desk.configure(INTAKE_INTAKE__DEFAULT_POLICY="tenday")
    ref = desk.open(T0)
    with write_session(desk.engine) as session:
        session.execute(update(Deadline).values(notify_at=None))
    assert keys(desk.sweep(T0 + timedelta(days=5, minutes=1))) == []  # invisible to the sweep
    deadlines.recompute_all(desk.engine, desk.settings, T0 + timedelta(days=5, minutes=2))
    assert keys(desk.sweep(T0 + timedelta(days=5, minutes=3))) == [f"remind:{ref}:resolve:50%"]


# -- dry run, `intake reminders` ---------------------------------------------------------------


def test_dry_run_lists_what_would_be_sent_and_records_nothing(desk):
    desk.configure(INTAKE_INTAKE__DEFAULT_POLICY="twoday")
    ref = desk.open(T0)
    now = T0 + timedelta(days=1, hours=1)
    planned = desk.sweep(now, dry_run=True)
    assert keys(planned) == [f"remind:{ref}:resolve:50%"]
    assert desk.mails("reminder") == [] and desk.notified(ref) == [f"new:{ref}"]
    assert keys(desk.sweep(now)) == keys(planned)


def test_reminders_lists_what_was_sent_and_what_comes_next(desk):
    desk.configure(INTAKE_INTAKE__DEFAULT_POLICY="tenday")
    ref = desk.open(T0)
    desk.sweep(T0 + timedelta(days=5, minutes=1))
    listed = reminders.ticket_reminders(desk.engine, desk.settings, ref, T0 + timedelta(days=6)).as_dict()
    assert [(s["kind"], s["point"]) for s in listed["sent"]] == [("new-ticket", "new-ticket"), ("reminder", "50%")]
    assert listed["next"] == [{"stage": "resolve", "kind": "reminder", "point": "24 hours before",
                               "at": (T0 + timedelta(days=9)).isoformat()}]
    with pytest.raises(reads.TicketNotFound):
        reminders.ticket_reminders(desk.engine, desk.settings, "SEC-1999-0001", T0)


# -- new-ticket notice --------------------------------------------------------------------------


def test_new_ticket_notice_tells_maintainers_text_sender_decision_and_dates(desk):
    desk.configure(INTAKE_INTAKE__DEFAULT_POLICY="vectis-mail")
    ref = desk.open(datetime(2026, 6, 5, 15, 0, tzinfo=BRISBANE), subject="RCE in the importer")
    [notice] = desk.mails("new-ticket")
    text = body(notice.raw)
    assert notice.recipients == ["mia@example.com"] and notice.dedupe_key == f"new:{ref}>mia@example.com"
    assert [m.recipients for m in desk.mails("new-ticket", to=None)] == [["mia@example.com"], ["raj@example.com"]]
    assert desk.notified(ref) == [f"new:{ref}"]
    assert header(notice.raw, "Subject") == f"[{ref}] New report: RCE in the importer"
    assert header(notice.raw, "Reply-To").startswith(f"security+{ref}.")  # Mia's signed reply address
    assert header(notice.raw, "Auto-Submitted") == "auto-generated"
    assert "From:      Alice Researcher <alice@researcher.test>" in text
    assert "Decision:  new-ticket" in text and "Steps to reproduce:" in text
    assert "Acknowledgement by a person: by Tue 09 Jun 2026 15:00 AEST" in text


def test_a_maintainer_replying_to_the_notice_threads_into_the_ticket(desk):
    desk.configure(INTAKE_INTAKE__DEFAULT_POLICY="tenday", INTAKE_SENDER_AUTH__VERIFY="false",
                   INTAKE_SENDER_AUTH__TRUSTED_AUTHSERV_IDS=f'["{TRUSTED_MX}"]')
    ref = desk.open(T0)
    [notice] = desk.mails("new-ticket")
    reply = report(subject=f"Re: {header(notice.raw, 'Subject')}", sender="mia@example.com", body="Looking at it.\n",
                   Authentication_Results=trusted_results("example.com"))
    inbound.store(desk.engine, [inbound.Arrival("mia@example.com", [header(notice.raw, "Reply-To")], "127.0.0.1",
                                                "test", reply.as_bytes(), T0 + timedelta(hours=1))])
    result = process(desk.settings, desk.engine, T0 + timedelta(hours=1))
    assert result.decisions == {"maintainer-reply": 1}
    assert reads.ticket_detail(desk.engine, ref).entries[-1].body_text.startswith("Looking at it.")
