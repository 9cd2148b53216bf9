"""Status on request, end to end over SMTP: the reporter writes "status" (subject or first line) to
their ticket and gets one automatic status reply (state, next promised date) per 24 hours; a
stranger, an auto-reply, mail loop safety forbids answering, an unreachable reporter and prose
about the status get none. Every request is recorded, and maintainers still get it forwarded."""

from __future__ import annotations

import email
import email.policy
import re
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from conftest import deliver_outbox, process, report, smtp_send
from intake.send import composer
from intake.sla import deadlines
from intake.store.models import Ticket
from intake.tickets import status_reply
from test_maintainer_mail import MAINTAINERS, Desk
from test_openpgp import Keys, _decrypted

REPORTER = "alice@researcher.test"
STATUS_QUEUED, UNANSWERED = "status-reply-queued", "status-request-unanswered"


def _open_ticket(make_settings, start_intake_listener, config_file, sink, refuse_ack: bool = False,
                 **env: str) -> Desk:
    config_file.write_text(config_file.read_text() + MAINTAINERS)
    settings = make_settings(INTAKE_OUTBOUND__TRANSPORT="smtp", INTAKE_OUTBOUND__RELAY=f"127.0.0.1:{sink.port}",
                             **env)
    running = start_intake_listener(settings)
    smtp_send(running.port, report(subject="Auth bypass in admin", message_id="<report@alice.test>"))
    [reference] = process(settings, running.engine).tickets_opened
    if refuse_ack:  # the reporter's server refuses our acknowledgement: they are unreachable
        sink.handler.replies = ["550 5.1.1 <alice@researcher.test>: user unknown"]
    desk = Desk(settings, running, sink, reference)
    desk.deliver()
    return desk


@pytest.fixture
def desk(make_settings, start_intake_listener, config_file, sink) -> Desk:
    return _open_ticket(make_settings, start_intake_listener, config_file, sink)


def _ask(desk: Desk, subject: str, body: str, now: datetime, sender: str = REPORTER, **headers: str) -> list:
    """*sender* writes to the ticket at *now*; the mail that reached the sink for it."""
    message = report(subject=subject, body=body, sender=sender, **headers)
    smtp_send(desk.running.port, message, mail_from=sender)
    process(desk.settings, desk.running.engine, now)
    before = len(desk.sink.messages)
    sent = deliver_outbox(desk.settings, desk.running.engine, now).get("sent", 0)
    return desk.sink.wait_for(before + sent)[before:]


def _to_reporter(delivered: list) -> list[email.message.EmailMessage]:
    return [email.message_from_bytes(m.data, policy=email.policy.default) for m in delivered if m.rcpt_tos == [REPORTER]]


def _kinds(desk: Desk) -> list[str]:
    return [event.kind for event in desk.ticket().events]


def _next_date(desk: Desk) -> str:
    """The acknowledgement stage's due date as the reply must state it, from the stored deadlines."""
    ticket = desk.ticket().ticket
    [acknowledge] = [s for s in deadlines.ticket_stage_statuses(desk.running.engine, desk.settings, ticket,
                                                                 datetime.now(timezone.utc)) if s.stage == "acknowledge"]
    zone = deadlines.stage_calendar(desk.settings, ticket.policy, "acknowledge").timezone
    return composer.PromisedDate("", acknowledge.due_at, zone).due_local


def test_status_in_the_subject_gets_one_automatic_threaded_reply_with_state_and_next_date(desk):
    now = datetime.now(timezone.utc)
    delivered = _ask(desk, f"Re: [{desk.reference}] status", "Thanks!\n", now, In_Reply_To="<report@alice.test>")
    [reply] = _to_reporter(delivered)
    body = reply.get_content().replace("\r\n", "\n")
    assert "Status: received; our team has not assessed it yet." in body
    assert f"Next date we promised:\n  Acknowledgement by a person, by {_next_date(desk)}\n" in body
    assert reply["Subject"] == f"Re: [{desk.reference}] Auth bypass in admin"
    assert reply["Auto-Submitted"] == "auto-replied"
    [captured] = [m for m in delivered if m.rcpt_tos == [REPORTER]]
    assert captured.mail_from == "<>"  # null sender: nothing bounces back to us
    # Maintainers still see the request, forwarded as any reply of the reporter's.
    assert sorted(m.rcpt_tos[0] for m in delivered if m.rcpt_tos != [REPORTER]) == [
        "ana@maintainers.test", "bo@maintainers.test"]
    detail = desk.ticket()
    assert _kinds(desk).count(STATUS_QUEUED) == 1 and UNANSWERED not in _kinds(desk)
    assert [e.kind for e in detail.entries][-2:] == ["reporter-reply", "status-reply"]
    assert "Status: received" in detail.entries[-1].body_text


def test_status_on_the_first_line_is_answered_once_per_24_hours_and_every_request_recorded(desk):
    now = datetime.now(timezone.utc)
    subject = f"Re: [{desk.reference}] Auth bypass in admin"
    [first] = _to_reporter(_ask(desk, subject, "\n  Status?\n\nAny news on this one?\n", now))
    assert first["In-Reply-To"] and "Status: received" in first.get_content()

    assert _to_reporter(_ask(desk, subject, "status\n", now + timedelta(hours=23))) == []
    unanswered = [e for e in desk.ticket().events if e.kind == UNANSWERED]
    assert len(unanswered) == 1 and "answered already" in unanswered[0].detail["reason"]

    [later] = _to_reporter(_ask(desk, subject, "status\n", now + timedelta(hours=25)))
    assert "Status: received" in later.get_content()
    assert _kinds(desk).count(STATUS_QUEUED) == 2


def test_status_from_another_address_gets_no_reply(desk):
    now = datetime.now(timezone.utc)
    delivered = _ask(desk, f"Re: [{desk.reference}] status", "status\n", now, sender="mallory@elsewhere.test",
                     In_Reply_To="<report@alice.test>")
    assert [m for m in delivered if m.rcpt_tos in ([REPORTER], ["mallory@elsewhere.test"])] == []
    assert STATUS_QUEUED not in _kinds(desk)
    assert desk.ticket().entries[-1].kind == "third-party-reply"


@pytest.mark.parametrize("headers, recorded", [
    ({"Auto_Submitted": "auto-replied"}, None),  # an auto-reply: never even a reporter's reply
    ({"Precedence": "bulk"}, "loop safety: Precedence: bulk"),
])
def test_an_automatic_or_bulk_status_mail_gets_no_reply(desk, headers, recorded):
    now = datetime.now(timezone.utc)
    assert _to_reporter(_ask(desk, f"Re: [{desk.reference}] status", "status\n", now, **headers)) == []
    assert STATUS_QUEUED not in _kinds(desk)
    reasons = [e.detail["reason"] for e in desk.ticket().events if e.kind == UNANSWERED]
    assert reasons == ([recorded] if recorded else [])


def test_an_unreachable_reporter_gets_no_status_reply(make_settings, start_intake_listener, config_file, sink):
    desk = _open_ticket(make_settings, start_intake_listener, config_file, sink, refuse_ack=True)
    assert desk.ticket().ticket.reporter_unreachable_at is not None
    now = datetime.now(timezone.utc)
    assert _to_reporter(_ask(desk, f"Re: [{desk.reference}] status", "status\n", now)) == []
    [unanswered] = [e for e in desk.ticket().events if e.kind == UNANSWERED]
    assert unanswered.detail["reason"].startswith("the reporter is unreachable")



def test_the_per_recipient_limit_on_automatic_mail_counts_the_acknowledgement(make_settings, start_intake_listener,
                                                                              config_file, sink):
    desk = _open_ticket(make_settings, start_intake_listener, config_file, sink,
                        INTAKE_AUTOREPLY__LIMIT_PER_RECIPIENT="1")
    assert _to_reporter(_ask(desk, f"Re: [{desk.reference}] status", "status\n", datetime.now(timezone.utc))) == []
    [unanswered] = [e for e in desk.ticket().events if e.kind == UNANSWERED]
    assert unanswered.detail["reason"].startswith(f"rate limit: 1 automatic mails to {REPORTER}")


def test_the_status_reply_is_encrypted_to_the_reporters_key_on_file(make_settings, start_intake_listener,
                                                                    config_file, sink, cli, tmp_path):
    keys = Keys(tmp_path)
    desk = _open_ticket(make_settings, start_intake_listener, config_file, sink,
                        INTAKE_OPENPGP__KEY_FILE=str(keys.org_file))
    cli("key", desk.reference, str(keys.reporter_public))
    [reply] = _to_reporter(_ask(desk, f"Re: [{desk.reference}] status", "status\n", datetime.now(timezone.utc)))
    assert "Status: received" in _decrypted(reply, keys.reporter)
    assert "Status: received" not in reply.as_string()

def test_prose_about_the_status_is_a_reply_for_a_person(desk):
    now = datetime.now(timezone.utc)
    delivered = _ask(desk, f"Re: [{desk.reference}] Auth bypass in admin", "What is the status of my report?\n", now)
    assert _to_reporter(delivered) == []
    assert len(delivered) == 2  # forwarded to both maintainers, as any reply
    assert STATUS_QUEUED not in _kinds(desk) and UNANSWERED not in _kinds(desk)


@pytest.mark.parametrize("subject, text, asks", [
    ("status", "", True),
    ("Re: [SEC-2026-0001] Status?", "", True),
    ("RE: AW: [External] [SEC-2026-0001] STATUS.", "", True),
    ("Re: [SEC-2026-0001] XSS", "\n\n  status  \nthanks", True),
    ("Re: [SEC-2026-0001] status of my report", "", False),
    ("Re: [SEC-2026-0001] XSS", "What is the status of my report?", False),
    ("Re: [SEC-2026-0001] XSS", "Thanks.\nstatus", False),  # not the first line
    ("Re: [SEC-2026-0001] XSS", "status: still broken on 2.1", False),
])
def test_what_counts_as_a_status_request(subject, text, asks):
    assert status_reply.is_request(subject, text) is asks



def test_readme_shows_the_status_reply_as_the_template_renders_it():
    rendered = composer.render(
        "status.txt.j2", None, reference="SEC-2026-0001", subject="Auth bypass in admin",
        reporter_name="Alice Researcher", state="assessed (severity high); we are working on a fix",
        next_date=composer.PromisedDate("Fix released (target)", datetime(2027, 1, 4, 7, 0, tzinfo=timezone.utc),
                                        "Australia/Brisbane"),
        window_hours=24, from_name="Example Security", intake_address="security@example.com")
    assert readme_example("Status on request") == rendered


def readme_example(heading: str) -> str:
    """The one example block in the README's section "### *heading*"."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    [shown] = re.findall(rf"### {re.escape(heading)}\n.*?```\n(.*?)```", readme, re.DOTALL)
    return shown


@pytest.mark.parametrize("state, severity, close_reason, words", [
    ("new", None, None, "received; our team has not assessed it yet"),
    ("assessed", "high", None, "assessed (severity high); we are working on a fix"),
    ("waiting", None, None, "waiting for an answer from you to our last question"),
    ("closed", None, "duplicate", "closed: a duplicate of an earlier report"),
    ("closed", None, "invalid", "closed: we found it is not a vulnerability"),
    ("closed", None, "spam", "no longer open"),
])
def test_states_in_plain_words(state, severity, close_reason, words):
    ticket = Ticket(reference="SEC-2026-0001", subject="x", reporter=REPORTER, intake_address="security@example.com",
                    state=state, severity=severity, close_reason=close_reason, policy="default")
    assert status_reply.state_words(ticket) == words
