"""Receive -> store -> ticket -> acknowledgement, over real SMTP, on SQLite and PostgreSQL."""

from __future__ import annotations

import email
import email.policy
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import select

from conftest import all_tickets, deliver_outbox, process, report, smtp_send
from intake.send import outbox
from intake.store import claims, inbound
from intake.store.db import read_session
from intake.store.models import Event, InboundMessage, Outbox, ThreadEntry, Ticket
from intake.tickets import references
from intake.tickets import reads


def _outbox_rows(engine) -> list[Outbox]:
    return sorted(outbox.listing(engine), key=lambda r: r.id)


def test_report_becomes_ticket_with_acknowledgement_through_relay(make_settings, start_intake_listener, sink):
    settings = make_settings(INTAKE_OUTBOUND__TRANSPORT="smtp", INTAKE_OUTBOUND__RELAY=f"127.0.0.1:{sink.port}")
    running = start_intake_listener(settings)
    original = report(subject="SQL injection in /search", message_id="<r1@researcher.test>",
                      References="<earlier@researcher.test>")
    smtp_send(running.port, original)

    result = process(settings, running.engine)
    assert result.decisions == {"new-ticket": 1}
    year = datetime.now(timezone.utc).year
    assert result.tickets_opened == [f"SEC-{year}-0001"]

    detail = reads.ticket_detail(running.engine, f"SEC-{year}-0001")
    assert detail.ticket.subject == "SQL injection in /search"
    assert detail.ticket.reporter == "alice@researcher.test"
    assert detail.ticket.policy == "vaixus"
    report_entry = detail.entries[0]
    assert (report_entry.kind, report_entry.direction) == ("report", "in")
    assert report_entry.message_id == "<r1@researcher.test>"
    assert "Steps to reproduce" in report_entry.body_text
    assert [e.kind for e in detail.events] == ["opened", "acknowledgement-queued"]

    assert deliver_outbox(settings, running.engine) == {"sent": 1}
    [ack] = sink.wait_for(1)
    assert ack.mail_from == "<>"  # MAIL FROM:<>, the null envelope sender: nobody auto-replies to an auto-reply
    assert ack.rcpt_tos == ["alice@researcher.test"]
    message = email.message_from_bytes(ack.data, policy=email.policy.default)
    assert message["Subject"] == f"Re: [SEC-{year}-0001] SQL injection in /search"
    assert message["From"].addresses[0].addr_spec == "security@example.com"
    assert message["To"] == "alice@researcher.test"
    assert message["In-Reply-To"] == "<r1@researcher.test>"
    assert message["References"].split() == ["<earlier@researcher.test>", "<r1@researcher.test>"]
    assert message["Auto-Submitted"] == "auto-replied"
    assert message["Message-ID"].endswith("@example.com>")
    body = message.get_content()
    assert f"SEC-{year}-0001" in body
    assert "reply to this message" in body
    # vaixus: acknowledge within 72 hours of receipt, stated in the mail.
    due = detail.ticket.received_at.astimezone(timezone.utc) + __import__("datetime").timedelta(hours=72)
    assert due.strftime("%d %b %Y %H:%M") in body
    assert [r.status for r in _outbox_rows(running.engine)] == ["sent"]


def test_references_count_per_year_and_use_the_configured_prefix(make_settings, start_intake_listener):
    settings = make_settings(INTAKE_INTAKE__REFERENCE_PREFIX="VULN")
    running = start_intake_listener(settings)
    for n in range(3):
        smtp_send(running.port, report(subject=f"report {n}"))
    result = process(settings, running.engine)
    year = datetime.now(timezone.utc).year
    assert result.tickets_opened == [f"VULN-{year}-0001", f"VULN-{year}-0002", f"VULN-{year}-0003"]


def test_year_of_reference_is_the_year_received(make_settings, start_intake_listener):
    settings = make_settings()
    running = start_intake_listener(settings)
    smtp_send(running.port, report())
    # Received (stored) in one year, processed in the next: the receive date decides.
    with read_session(running.engine) as session:
        received = session.scalars(select(InboundMessage.received_at)).one()
    result = process(settings, running.engine, now=received.replace(year=received.year + 1))
    assert result.tickets_opened == [f"SEC-{received.year}-0001"]


def test_same_message_twice_is_one_ticket_and_one_acknowledgement(make_settings, start_intake_listener):
    settings = make_settings()
    running = start_intake_listener(settings)
    message = report(message_id="<same@researcher.test>")
    smtp_send(running.port, message)
    process(settings, running.engine)
    smtp_send(running.port, message)  # a retry by the client after a lost 250
    smtp_send(running.port, message, rcpt_tos=["security+web@example.com"])
    result = process(settings, running.engine)
    assert result.decisions == {"duplicate": 2}
    assert len(all_tickets(running.engine)) == 1
    assert [r.dedupe_key for r in _outbox_rows(running.engine)] == [f"ack:SEC-{datetime.now(timezone.utc).year}-0001"]


def test_duplicates_inside_one_batch_and_without_message_id(make_settings, start_intake_listener):
    settings = make_settings()
    running = start_intake_listener(settings)
    raw = b"From: bob@researcher.test\r\nTo: security@example.com\r\nSubject: no id\r\n\r\nbody\r\n"
    for _ in range(2):
        smtp_send(running.port, raw, mail_from="bob@researcher.test")
    result = process(settings, running.engine)  # both in one batch
    assert result.decisions == {"new-ticket": 1, "duplicate": 1}
    assert len(_outbox_rows(running.engine)) == 1


@pytest.mark.parametrize("headers, mail_from, decision, env", [
    ({}, "", "bounce", {}),
    ({"Auto_Submitted": "auto-replied"}, "bob@researcher.test", "auto-reply", {}),
    # A ticket by default (tests/test_held_mail.py); held where the operator says so.
    ({"Auto_Submitted": "auto-generated; owner-email=x@y.test"}, "bob@researcher.test", "auto-reply",
     {"INTAKE_INTAKE__TICKET_AUTO_GENERATED": "false"}),
])
def test_automatic_mail_gets_no_ticket_and_no_reply(make_settings, start_intake_listener, headers, mail_from,
                                                    decision, env):
    settings = make_settings(**env)
    running = start_intake_listener(settings)
    smtp_send(running.port, report(**headers), mail_from=mail_from)
    result = process(settings, running.engine)
    assert result.decisions == {decision: 1}
    assert all_tickets(running.engine) == []
    assert _outbox_rows(running.engine) == []
    with read_session(running.engine) as session:
        stored = session.scalars(select(InboundMessage)).one()
    assert (stored.status, stored.decision) == ("ignored", decision)


def test_auto_submitted_no_is_a_person(make_settings, start_intake_listener):
    settings = make_settings()
    running = start_intake_listener(settings)
    smtp_send(running.port, report(Auto_Submitted="no"))
    assert process(settings, running.engine).decisions == {"new-ticket": 1}
    assert len(_outbox_rows(running.engine)) == 1


def test_failed_message_keeps_raw_bytes_and_reprocesses(make_settings, start_intake_listener, tmp_path):
    templates = tmp_path / "templates"
    templates.mkdir()
    broken = templates / "acknowledgement.txt.j2"
    broken.write_text("{{ no_such_variable }}\n")  # StrictUndefined: rendering fails
    settings = make_settings(INTAKE_INTAKE__TEMPLATES_DIR=str(templates))
    running = start_intake_listener(settings)
    message = report(message_id="<fails@researcher.test>")
    smtp_send(running.port, message)

    result = process(settings, running.engine)
    assert len(result.failed) == 1
    with read_session(running.engine) as session:
        stored = session.scalars(select(InboundMessage)).one()
        assert session.scalars(select(Ticket)).all() == []  # rolled back with its savepoint
        assert session.scalars(select(ThreadEntry)).all() == []
    assert stored.status == "failed"
    assert "no_such_variable" in stored.error
    raw = inbound.get(running.engine, stored.id).raw
    assert raw == message.as_bytes().replace(b"\n", b"\r\n") or b"fails@researcher.test" in raw

    broken.unlink()  # the operator fixes the template
    from intake.send.composer import _environment
    _environment.cache_clear()
    assert inbound.requeue(running.engine, inbound.failed_ids(running.engine)) == [stored.id]
    result = process(settings, running.engine)
    assert result.decisions == {"new-ticket": 1}
    assert len(_outbox_rows(running.engine)) == 1


def test_one_failing_message_does_not_stop_the_batch(make_settings, start_intake_listener, tmp_path):
    settings = make_settings()
    running = start_intake_listener(settings)
    smtp_send(running.port, report(subject="first"))
    smtp_send(running.port, report(subject="second"))
    # Break processing of exactly one stored message: a policy that no longer exists.
    with read_session(running.engine) as session:
        first_id = session.scalars(select(InboundMessage.id).order_by(InboundMessage.id)).first()
    from sqlalchemy import update
    from intake.store.db import write_session
    with write_session(running.engine) as session:
        session.execute(update(InboundMessage).where(InboundMessage.id == first_id)
                        .values(rcpt_tos=["security+gone@example.com"]))
    broken = settings.model_copy(update={"intake": settings.intake.model_copy(
        update={"policy_by_address": {"security+gone@example.com": "gone"}})})
    result = process(broken, running.engine)
    assert result.failed == [first_id]
    assert result.decisions == {"new-ticket": 1}


def test_events_record_the_decision(make_settings, start_intake_listener):
    settings = make_settings()
    running = start_intake_listener(settings)
    smtp_send(running.port, report(message_id="<ev@researcher.test>"))
    process(settings, running.engine)
    with read_session(running.engine) as session:
        opened = session.scalars(select(Event).where(Event.kind == "opened")).one()
    assert opened.actor == "intake"
    assert opened.detail["decision"] == "new-ticket"
    assert opened.detail["message_id"] == "<ev@researcher.test>"


def test_tagged_address_maps_to_its_policy_and_ack_states_its_dates(make_settings, start_intake_listener):
    settings = make_settings(INTAKE_INTAKE__POLICY_BY_ADDRESS='{"security+vectis@example.com": "vectis-mail"}')
    running = start_intake_listener(settings)
    smtp_send(running.port, report(), rcpt_tos=["security+vectis@example.com"])
    # Received Friday 18 Dec 2026, 15:00 in Brisbane (05:00 UTC).
    from sqlalchemy import update
    from intake.store.db import write_session
    with write_session(running.engine) as session:
        session.execute(update(InboundMessage).values(received_at=datetime(2026, 12, 18, 5, 0, tzinfo=timezone.utc)))
    process(settings, running.engine)
    [ticket] = all_tickets(running.engine)
    assert ticket.policy == "vectis-mail"
    assert ticket.intake_address == "security@example.com"  # replies come from the base address
    [row] = _outbox_rows(running.engine)
    body = email.message_from_bytes(row.raw, policy=email.policy.default).get_content()
    # acknowledge: 2 business days -> Tue 22 Dec 15:00.
    assert "Acknowledgement by a person: by Tue 22 Dec 2026 15:00 AEST (22 Dec 05:00 UTC)" in body
    # assess: 5 business days; Christmas (Fri 25) and the weekend are skipped. AU national
    # holidays have no "Boxing Day observed" for Sat 26 Dec, so Mon 28 Dec counts -> Mon 28 Dec.
    assert "Initial assessment: by Mon 28 Dec 2026 15:00 AEST (28 Dec 05:00 UTC)" in body
    # fix: severity unknown -> 30 days (Sun 17 Jan 2027) if assessed critical or high, else 90 days.
    assert ("Fix released (target), depending on how severe we find the issue\r\n  when we assess it:\r\n"
            "  - critical or high severity: by Sun 17 Jan 2027 15:00 AEST (17 Jan 05:00 UTC)\r\n"
            "  - any other severity: by Thu 18 Mar 2027 15:00 AEST (18 Mar 05:00 UTC)\r\n") in body
    assert "disclos" not in body.lower().split("what happens next")[1].split("these dates")[0]


def test_smtputf8_reporter_gets_the_acknowledgement(make_settings, start_intake_listener, sink):
    settings = make_settings(INTAKE_OUTBOUND__TRANSPORT="smtp", INTAKE_OUTBOUND__RELAY=f"127.0.0.1:{sink.port}")
    running = start_intake_listener(settings)
    import smtplib
    message = report(sender="josé@bücher.example", subject="Überlauf im Parser")
    with smtplib.SMTP("127.0.0.1", running.port) as client:
        client.ehlo()
        client.sendmail("josé@bücher.example", ["security@example.com"], message.as_bytes(),
                        mail_options=["SMTPUTF8"])
    process(settings, running.engine)
    assert deliver_outbox(settings, running.engine) == {"sent": 1}
    [ack] = sink.wait_for(1)
    assert ack.rcpt_tos == ["josé@bücher.example"]
    parsed = email.message_from_bytes(ack.data, policy=email.policy.default)
    assert parsed["Subject"] == f"Re: [SEC-{datetime.now(timezone.utc).year}-0001] Überlauf im Parser"


# -- a chunk of messages acted on together ----------------------------------------------------


def test_a_reply_in_the_same_batch_as_its_report_threads(make_settings, start_intake_listener):
    settings = make_settings()
    running = start_intake_listener(settings)
    smtp_send(running.port, report(message_id="<first@researcher.test>"))
    follow_up = report(subject="More detail", message_id="<second@researcher.test>")
    follow_up["In-Reply-To"] = "<first@researcher.test>"
    smtp_send(running.port, follow_up)
    smtp_send(running.port, report(message_id="<first@researcher.test>"))  # and a copy of the report
    result = process(settings, running.engine)  # all three in one chunk
    assert result.decisions == {"new-ticket": 1, "reporter-reply": 1, "duplicate": 1}
    [ticket] = all_tickets(running.engine)
    detail = reads.ticket_detail(running.engine, ticket.reference)
    assert [(e.kind, e.message_id) for e in detail.entries if e.direction == "in"] == [
        ("report", "<first@researcher.test>"), ("reporter-reply", "<second@researcher.test>")]


def test_rate_limit_counts_the_replies_queued_earlier_in_the_same_batch(make_settings, start_intake_listener):
    settings = make_settings()
    running = start_intake_listener(settings)
    for n in range(7):
        smtp_send(running.port, report(subject=f"finding {n}"))
    result = process(settings, running.engine)
    assert result.decisions == {"new-ticket": 7}
    assert len(_outbox_rows(running.engine)) == 5  # default: 5 automatic mails per recipient and 24 hours
    year = datetime.now(timezone.utc).year
    suppressed = [e for e in reads.ticket_detail(running.engine, f"SEC-{year}-0006").events
                  if e.kind == "acknowledgement-suppressed"]
    assert "rate limit: 5 automatic mails" in suppressed[0].detail["reason"]


def test_a_failure_in_a_chunk_fails_one_message_and_skips_no_reference(make_settings, start_intake_listener):
    settings = make_settings()
    running = start_intake_listener(settings)
    for n in range(5):
        smtp_send(running.port, report(subject=f"report {n}"),
                  rcpt_tos=["security+gone@example.com" if n == 2 else "security@example.com"])
    with read_session(running.engine) as session:
        ids = list(session.scalars(select(InboundMessage.id).order_by(InboundMessage.id)))
    # The third message's address maps to a policy that no longer exists.
    broken = settings.model_copy(update={"intake": settings.intake.model_copy(
        update={"policy_by_address": {"security+gone@example.com": "gone"}})})
    result = process(broken, running.engine)
    assert result.failed == [ids[2]]
    year = datetime.now(timezone.utc).year
    assert result.tickets_opened == [f"SEC-{year}-{n:04d}" for n in range(1, 5)]
    with read_session(running.engine) as session:
        stored = session.get(InboundMessage, ids[2])
    assert stored.status == "failed"
    assert stored.error.startswith("PolicyMissing: policy 'gone' is not in the configuration")


def test_references_taken_meanwhile_by_another_processor_are_not_reused(make_settings, start_intake_listener):
    from intake.store.db import write_session
    from intake.run.processor import _plan
    from intake.run.processor import _write
    from intake.run.processor import prepare

    settings = make_settings()
    running = start_intake_listener(settings)
    smtp_send(running.port, report(subject="planned first"))
    now = datetime.now(timezone.utc)
    claim = claims.claim(running.engine, claims.new_owner(), now, timedelta(minutes=1), 10, 1 << 20)
    items = [prepare(settings, stored) for stored in inbound.by_ids(running.engine, claim.ids)]
    plan = _plan(running.engine, settings, items, now)
    year = now.year
    assert [o.reference for o in plan.new_tickets.openings] == [f"SEC-{year}-0001"]
    with write_session(running.engine) as session:  # another processor opens a ticket meanwhile
        assert references.allocate_references(session, "SEC", [year]) == [f"SEC-{year}-0001"]
    with write_session(running.engine) as session:
        [outcome] = _write(session, settings, plan, now, claim.owner)
    assert outcome.reference == f"SEC-{year}-0002"
    [ack] = _outbox_rows(running.engine)
    assert ack.dedupe_key == f"ack:SEC-{year}-0002"
    assert f"SEC-{year}-0002" in ack.raw.decode() and f"SEC-{year}-0001" not in ack.raw.decode()


# -- parsing bounded in time ------------------------------------------------------------------


def test_a_message_that_parses_too_long_is_a_ticket_from_its_headers_with_a_warning(make_settings,
                                                                                 start_intake_listener):
    # 150 attachments of 20 KB take well over 100 ms to parse; the bound here is 10 ms.
    settings = make_settings(INTAKE_PROCESSING__PARSE_TIMEOUT="0.01")
    running = start_intake_listener(settings)
    slow = report(subject="Many crash dumps", message_id="<slow@researcher.test>")
    for n in range(150):
        slow.add_attachment(bytes(20_000), maintype="application", subtype="octet-stream", filename=f"dump{n}.bin")
    smtp_send(running.port, slow)
    result = process(settings, running.engine)

    assert result.decisions == {"new-ticket": 1} and not result.failed
    year = datetime.now(timezone.utc).year
    cut_short = reads.ticket_detail(running.engine, f"SEC-{year}-0001")
    assert cut_short.ticket.subject == "Many crash dumps"
    assert cut_short.ticket.reporter == "alice@researcher.test"
    assert any("parse timed out after 0.01 s" in warning for warning in cut_short.entries[0].warnings)
    # The helper was replaced: the next message is parsed in full (under the default bound: 10 ms
    # is too short for any message on a loaded machine).
    smtp_send(running.port, report(subject="Small report", message_id="<small@researcher.test>"))
    assert process(make_settings(), running.engine).decisions == {"new-ticket": 1}
    assert "Steps to reproduce" in reads.ticket_detail(running.engine, f"SEC-{year}-0002").entries[0].body_text
    # Its raw bytes stay stored for `intake reprocess` with a longer bound.
    [stored] = [m for m in _stored(running.engine) if m.message.ticket_id == cut_short.ticket.id]
    assert len(stored.raw) > 3_000_000 and b'filename="dump149.bin"' in stored.raw


def test_a_message_past_its_cpu_budget_is_a_ticket_from_its_headers_with_a_warning(make_settings,
                                                                                   start_intake_listener):
    # 150 attachments of 20 KB take well over 100 ms of CPU to parse; the budget here is 50 ms,
    # the wall-clock bound the default 10 s: the budget is what cuts it short.
    settings = make_settings(INTAKE_PROCESSING__MESSAGE_BUDGET="0.05")
    running = start_intake_listener(settings)
    slow = report(subject="Many crash dumps", message_id="<slow@researcher.test>")
    for n in range(150):
        slow.add_attachment(bytes(20_000), maintype="application", subtype="octet-stream", filename=f"dump{n}.bin")
    smtp_send(running.port, slow)
    smtp_send(running.port, report(subject="Small report", message_id="<small@researcher.test>",
                                   body="Steps to reproduce:\n1. ...\nPlease credit me as Jane Doe.\n"))
    result = process(settings, running.engine)

    assert result.decisions == {"new-ticket": 2} and not result.failed
    year = datetime.now(timezone.utc).year
    cut_short = reads.ticket_detail(running.engine, f"SEC-{year}-0001")
    assert cut_short.ticket.subject == "Many crash dumps" and cut_short.ticket.reporter == "alice@researcher.test"
    assert any(warning.startswith("processing budget (0.05 s of CPU) spent while parsing")
               for warning in cut_short.entries[0].warnings)
    # The helper goes on (the budget stops the work, not the process): the next message is read in full.
    small = reads.ticket_detail(running.engine, f"SEC-{year}-0002")
    assert "Steps to reproduce" in small.entries[0].body_text and small.ticket.credit["name"] == "Jane Doe"
    [stored] = [m for m in _stored(running.engine) if m.message.ticket_id == cut_short.ticket.id]
    assert b'filename="dump149.bin"' in stored.raw  # kept for `intake reprocess`


def _stored(engine) -> list[inbound.Got]:
    with read_session(engine) as session:
        ids = list(session.scalars(select(InboundMessage.id).order_by(InboundMessage.id)))
    return [inbound.get(engine, message_id) for message_id in ids]
