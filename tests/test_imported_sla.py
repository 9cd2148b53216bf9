"""Imported history does not flood the maintainers: `intake import` of a mailbox of old reports,
then SLA sweeps at explicit instants, on SQLite and PostgreSQL.

Deadlines stay counted from each report's true arrival, so the imported tickets are honestly
breached; but no breach notice, repeat or escalation for a stage already past due at the import
reaches the (real aiosmtpd) sink, nor a reminder point passed by then, while a point after the
import is mailed at its time. A ticket that came in live, received as long ago, is swept exactly
as before, in the same runs.
"""

from __future__ import annotations

import email
import json
import mailbox
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime
from pathlib import Path

import pytest

from conftest import all_tickets, deliver_outbox, process, report
from intake.store import inbound
from intake.store.db import make_engine

MAINTAINERS = '[{"name": "Mia", "email": "mia@maintainers.test"}]'
ESCALATE_TO = '["ciso@maintainers.test"]'
# Acknowledge and assess are long past for every report below; fix is not, for any of them.
ARCHIVE_POLICY = """
[policies.archive]
calendar = "utc"
auto_ack_counts = false
remind = ["50%"]

[[policies.archive.stages]]
name = "acknowledge"
duration = "3 days"

[[policies.archive.stages]]
name = "assess"
duration = "7 days"

[[policies.archive.stages]]
name = "fix"
duration = "365 days"
"""
# Reports' ages at the import: the 50% point of "fix" (182.5 days in) passed before the import
# for the first two, and is still ahead for the third.
AGES = {"oldest": 300, "older": 200, "recent": 100}


@pytest.fixture
def settings(make_settings, config_file, sink):  # type: ignore[no-untyped-def]
    config_file.write_text(config_file.read_text() + ARCHIVE_POLICY)
    return make_settings(INTAKE_MAINTAINERS=MAINTAINERS, INTAKE_SCHEDULER__ESCALATE_TO=ESCALATE_TO,
                         INTAKE_SCHEDULER__QUIET_HOURS="false", INTAKE_INTAKE__DEFAULT_POLICY="archive",
                         INTAKE_OUTBOUND__TRANSPORT="smtp", INTAKE_OUTBOUND__RELAY=f"127.0.0.1:{sink.port}")


def _old_reports(folder: Path, now: datetime) -> Path:
    """An mbox of the reports of AGES, each dated that many days before *now*."""
    path = folder / "security.mbox"
    box = mailbox.mbox(path)
    for name, days in AGES.items():
        message = report(subject=f"{name}: SSRF in the webhook tester", sender=f"{name}@researcher.test",
                         message_id=f"<{name}@researcher.test>")
        message["Date"] = format_datetime(now - timedelta(days=days))
        box.add(message.as_bytes())
    box.flush()
    return path


def _live_ticket(settings, received: datetime) -> str:  # type: ignore[no-untyped-def]
    """A report that came in over SMTP at *received* (the listener's way of storing it)."""
    engine = make_engine(settings.database_url)
    raw = report(subject="Live: XSS in the profile page", sender="live@researcher.test").as_bytes()
    inbound.store(engine, [inbound.Arrival("live@researcher.test", ["security@example.com"], "127.0.0.1", "test",
                                           raw, received)])
    [reference] = process(settings, engine, received).tickets_opened
    return reference


def _sweep(cli, now: datetime) -> dict:  # type: ignore[no-untyped-def]
    return json.loads(cli("sweep", "--now", now.isoformat(), "--json").output)


def _subjects_to(sink, references: set[str]) -> list[str]:  # type: ignore[no-untyped-def]
    """Subjects of the mails in the sink that concern one of *references*."""
    subjects = [email.message_from_bytes(message.data)["Subject"] for message in sink.messages]
    return [subject for subject in subjects if any(f"[{reference}]" in subject for reference in references)]


def test_old_deadlines_of_imported_tickets_are_never_mailed_but_later_points_are(settings, cli, sink, tmp_path):
    import_time = datetime.now(timezone.utc)
    live = _live_ticket(settings, import_time - timedelta(days=AGES["oldest"]))
    # The live ticket's acknowledgement is the only mail so far; out of the way before the sweeps.
    deliver_outbox(settings, make_engine(settings.database_url), import_time)
    sink.messages.clear()

    summary = json.loads(cli("import", str(_old_reports(tmp_path, import_time)), "--json").output)

    assert summary["tickets"] == 3 and summary["open_tickets"] == 3
    assert summary["stages_past_due"] == 6  # acknowledge and assess of each
    assert "intake close" in summary["close_hint"]
    references = {t.reporter.split("@")[0]: t.reference for t in all_tickets(make_engine(settings.database_url))}
    imported = {references[name] for name in AGES}

    # Just after the import: the live ticket's breaches and escalations go out, the imported none.
    first = _sweep(cli, import_time + timedelta(hours=1))
    assert {n["ticket"] for n in first["notifications"]} == {live}
    # Live, as before: the old stages breached and escalated, the passed 50% point of "fix" caught up.
    assert {n["kind"] for n in first["notifications"]} == {"breach", "escalation", "reminder"}
    suppressed = {(n["ticket"], n["stage"], n["point"]) for n in first["suppressed"]}
    assert suppressed == {*((references[name], stage, "breach") for name in AGES for stage in ("acknowledge", "assess")),
                          (references["oldest"], "fix", "50%"), (references["older"], "fix", "50%")}
    deliver_outbox(settings, make_engine(settings.database_url), import_time + timedelta(hours=1))
    assert _subjects_to(sink, {live}) and not _subjects_to(sink, imported)

    # Days later: the live ticket's breach repeats, nothing about the imported tickets' old stages.
    later = import_time + timedelta(days=3)
    again = _sweep(cli, later)
    assert {n["ticket"] for n in again["notifications"]} == {live} and again["suppressed"] == []
    deliver_outbox(settings, make_engine(settings.database_url), later)
    assert not _subjects_to(sink, imported)

    # `intake reminders` says what was not mailed and why.
    shown = cli("reminders", references["oldest"], "--now", later.isoformat())
    assert "suppressed (imported from history" in shown.output
    assert "acknowledge breach" in shown.output and "was past due when the ticket was imported" in shown.output
    plan = json.loads(cli("reminders", references["recent"], "--now", later.isoformat(), "--json").output)
    assert plan["imported_at"] is not None and plan["sent"] == []
    for_maintainers = {key: [e for e in plan[key] if e["audience"] == "maintainers"] for key in ("suppressed", "next")}
    assert {(s["stage"], s["point"]) for s in for_maintainers["suppressed"]} == {("acknowledge", "breach"),
                                                                               ("assess", "breach")}
    [upcoming] = for_maintainers["next"]
    assert (upcoming["stage"], upcoming["kind"], upcoming["point"]) == ("fix", "reminder", "50%")

    # The recent report's 50% point, after the import, is mailed at its time and not before.
    at = datetime.fromisoformat(upcoming["at"])
    assert references["recent"] not in {n["ticket"] for n in _sweep(cli, at - timedelta(seconds=1))["notifications"]}
    due = _sweep(cli, at)
    reminders = [n for n in due["notifications"] if n["ticket"] == references["recent"]]
    assert [(n["kind"], n["stage"], n["point"]) for n in reminders] == [("reminder", "fix", "50%")]
    # Every mail about an imported ticket concerns "fix", the one stage due after the import.
    assert {n["stage"] for n in due["notifications"] if n["ticket"] in imported} == {"fix"}
    deliver_outbox(settings, make_engine(settings.database_url), at)
    assert any("Reminder" in subject for subject in _subjects_to(sink, {references["recent"]}))


def test_the_import_summary_names_open_tickets_and_past_due_stages(settings, cli, tmp_path):
    output = cli("import", str(_old_reports(tmp_path, datetime.now(timezone.utc)))).output

    assert "3 imported ticket(s) open, 6 stage(s) already past due" in output
    assert "never mailed about" in output and "intake close" in output
    # The hint selects imported tickets by this field.
    listed = json.loads(cli("tickets", "--json").output)
    assert len(listed) == 3 and all(ticket["imported_at"] for ticket in listed)


def test_our_own_reply_in_the_box_acknowledges_its_ticket_at_the_reply_date(settings, cli, sink, tmp_path):
    now = datetime.now(timezone.utc).replace(microsecond=0)
    reported = now - timedelta(days=AGES["oldest"])
    answered_at = reported + timedelta(days=2)  # within acknowledge's 3 days
    path = tmp_path / "security.mbox"
    box = mailbox.mbox(path)
    for name in ("answered", "unanswered"):
        message = report(subject=f"{name}: IDOR on invoices", sender=f"{name}@researcher.test",
                         message_id=f"<{name}@researcher.test>")
        message["Date"] = format_datetime(reported)
        box.add(message.as_bytes())
    ours = report(subject="Re: answered: IDOR on invoices", sender="security@example.com",
                  message_id="<reply-1@example.com>", In_Reply_To="<answered@researcher.test>",
                  References="<answered@researcher.test>")
    ours.replace_header("To", "answered@researcher.test")
    ours["Date"] = format_datetime(answered_at)
    box.add(ours.as_bytes())
    # A stranger's mail naming the report proves nothing.
    forged = report(subject="Re: unanswered", sender="mallory@elsewhere.test", In_Reply_To="<unanswered@researcher.test>")
    forged["Date"] = format_datetime(answered_at)
    box.add(forged.as_bytes())
    box.flush()

    summary = json.loads(cli("import", str(path), "--json").output)

    assert summary["tickets"] == 2 and summary["acknowledged_by_replies"] == 1
    assert summary["stages_past_due"] == 3  # assess of both, acknowledge of the unanswered one
    references = {t.reporter.split("@")[0]: t.reference for t in all_tickets(make_engine(settings.database_url))}
    shown = json.loads(cli("show", references["answered"], "--json").output)
    stages = {stage["stage"]: stage for stage in shown["stages"]}
    assert stages["acknowledge"]["state"] == "met"
    assert datetime.fromisoformat(stages["acknowledge"]["met_at"]) == answered_at
    [milestone] = [e for e in shown["events"] if e["kind"] == "milestone"]
    assert milestone["actor"] == "intake import" and milestone["detail"]["message_id"] == "<reply-1@example.com>"
    unanswered = json.loads(cli("show", references["unanswered"], "--json").output)
    assert {s["stage"]: s["state"] for s in unanswered["stages"]}["acknowledge"] == "breached"

    swept = _sweep(cli, now + timedelta(hours=1))
    assert swept["mails"] == 0
    assert (references["answered"], "acknowledge") not in {(n["ticket"], n["stage"]) for n in swept["suppressed"]}
    deliver_outbox(settings, make_engine(settings.database_url), now + timedelta(hours=1))
    assert sink.messages == []
