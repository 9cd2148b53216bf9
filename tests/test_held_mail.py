"""Held mail over the real path (SMTP listener, processing, the CLI, the outbox to an SMTP sink):
`intake messages` lists and shows what made no ticket of its own, `intake promote` makes one a
ticket once, and [intake] ticket_auto_generated / ticket_spam decide what is held at all."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

from conftest import all_tickets, deliver_outbox, process, report, smtp_send
from intake.cli.common import actor
from intake.store import inbound
from intake.tickets import reads
from intake.vocabulary import AUTO_REPLY, HELD_FAILED, NEW_TICKET, SPAM, EventKind

# A subject a stranger wrote to drive a terminal: an ESC sequence and a bidi override.
HOSTILE_SUBJECT = "RCE in upload \x1b[2Kfake line \u202etxt.exe"
CLIPBOARD = "\x1b]52;c;cm0gLXJmIH4=\x07"  # OSC 52: writes the terminal's clipboard


def _held_desk(make_settings, start_intake_listener, sink, **env: str):  # type: ignore[no-untyped-def]
    settings = make_settings(INTAKE_OUTBOUND__TRANSPORT="smtp", INTAKE_OUTBOUND__RELAY=f"127.0.0.1:{sink.port}",
                             **env)
    return settings, start_intake_listener(settings)


def _send_spam_and_auto_generated(port: int) -> None:
    smtp_send(port, report(subject=HOSTILE_SUBJECT, sender="bob@flagged.test", X_Spam_Flag="YES",
                           body=f"Upload a .phtml file and it runs.\n{CLIPBOARD}\n"), mail_from="bob@flagged.test")
    smtp_send(port, report(subject="Scanner finding: open redirect", sender="scan@forms.test",
                           Auto_Submitted="auto-generated", body="Form submission: /login?next= redirects.\n"),
              mail_from="scan@forms.test")


def _listed(cli, *args: str) -> list[dict]:  # type: ignore[type-arg]
    return json.loads(cli("messages", *args, "--json").output)


def test_held_mail_is_listed_filtered_and_shown_safely(make_settings, start_intake_listener, sink, cli):
    settings, running = _held_desk(make_settings, start_intake_listener, sink,
                                   INTAKE_INTAKE__TICKET_AUTO_GENERATED="false")
    _send_spam_and_auto_generated(running.port)
    smtp_send(running.port, report(subject="A real report"))
    assert process(settings, running.engine).decisions == {SPAM: 1, AUTO_REPLY: 1, NEW_TICKET: 1}

    listed = _listed(cli)
    assert [m["decision"] for m in listed] == [AUTO_REPLY, SPAM]  # newest first; the ticket is not held
    assert all(set(m) == {"id", "received_at", "mail_from", "from", "subject", "size", "decision", "reason"}
               for m in listed)
    auto, spam = listed
    assert spam["subject"] == HOSTILE_SUBJECT.replace("\x1b", "")  # display-safe from the header scan
    assert spam["mail_from"] == "bob@flagged.test" and spam["from"] == "Alice Researcher <bob@flagged.test>"
    assert "X-Spam-Flag" in spam["reason"] and "threads into no ticket" in auto["reason"]
    assert spam["size"] == len(inbound.get(running.engine, spam["id"]).raw)
    assert [m["id"] for m in _listed(cli, "--decision", SPAM)] == [spam["id"]]
    assert len(_listed(cli, "--decision", SPAM, "--decision", AUTO_REPLY)) == 2
    assert len(_listed(cli, "--limit", "1")) == 1
    later = (datetime.now(timezone.utc) + timedelta(minutes=5)).isoformat()
    assert _listed(cli, "--since", later) == []

    table = cli("messages").output
    assert "\x1b" not in table and "\u202e" not in table and "\\u202e" in table

    shown = cli("messages", "show", str(spam["id"])).output
    assert "\x1b" not in shown and "\u202e" not in shown and "\\u202e" in shown and "\\x1b]52;" in shown
    assert "x-spam-flag: YES" in shown and "| Upload a .phtml file and it runs." in shown
    assert "decision spam: X-Spam-Flag: YES" in shown
    detail = json.loads(cli("messages", "show", str(spam["id"]), "--json").output)
    assert detail["text"].strip() == f"Upload a .phtml file and it runs.\n{CLIPBOARD}" and detail["decision"] == SPAM
    assert ["subject", HOSTILE_SUBJECT.replace("\x1b", "")] in detail["headers"]
    cli("messages", "show", "999999", code=1)


def test_promote_makes_one_acknowledged_ticket_and_says_who(make_settings, start_intake_listener, sink, cli):
    settings, running = _held_desk(make_settings, start_intake_listener, sink)
    _send_spam_and_auto_generated(running.port)
    process(settings, running.engine)
    spam_id = _listed(cli, "--decision", SPAM)[0]["id"]
    assert len(all_tickets(running.engine)) == 1  # the auto-generated report, by default

    opened = cli("promote", str(spam_id)).output
    tickets = all_tickets(running.engine)
    promoted = next(t for t in tickets if t.reporter == "bob@flagged.test")
    assert f"opened {promoted.reference}" in opened
    deliver_outbox(settings, running.engine)
    [ack] = sink.wait_for(1)
    assert ack.rcpt_tos == ["bob@flagged.test"] and promoted.reference.encode() in ack.data

    events = reads.ticket_detail(running.engine, promoted.reference).events
    [event] = [e for e in events if e.kind == EventKind.PROMOTED]
    assert event.actor == actor(settings) and event.detail["inbound_id"] == spam_id
    stored = inbound.get(running.engine, spam_id).message
    assert (stored.decision, stored.ticket_id) == (NEW_TICKET, promoted.id)
    assert stored.reason.startswith(f"promoted by {actor(settings)}")
    assert _listed(cli, "--decision", SPAM) == []

    again = cli("promote", str(spam_id)).output  # exit 0, naming the ticket; nothing new
    assert f"promoted before: ticket {promoted.reference}" in again
    assert len(all_tickets(running.engine)) == 2
    assert deliver_outbox(settings, running.engine).get("sent", 0) == 0


def test_promote_with_no_ack_sends_nothing_and_refusals(make_settings, start_intake_listener, sink, cli):
    settings, running = _held_desk(make_settings, start_intake_listener, sink)
    _send_spam_and_auto_generated(running.port)
    process(settings, running.engine)
    spam_id = _listed(cli, "--decision", SPAM)[0]["id"]
    cli("promote", "--no-ack", str(spam_id))
    promoted = next(t for t in all_tickets(running.engine) if t.reporter == "bob@flagged.test")
    events = reads.ticket_detail(running.engine, promoted.reference).events
    assert any(e.kind == EventKind.ACKNOWLEDGEMENT_SUPPRESSED and "--no-ack" in e.detail["reason"] for e in events)
    deliver_outbox(settings, running.engine)
    assert sink.messages == []

    ticket_message = next(t for t in all_tickets(running.engine) if t.reporter == "scan@forms.test")
    own = reads.ticket_detail(running.engine, ticket_message.reference).messages[0].id
    assert "already" in cli("promote", str(own), code=1).output  # a ticket of its own: refused
    smtp_send(running.port, report(subject="Not processed yet"))
    pending = max(m.id for m in inbound.pending(running.engine, 10))
    assert "pending" in cli("promote", str(pending), code=1).output
    assert "no stored message 999999" in cli("promote", "999999", code=1).output


def test_ticket_auto_generated_and_ticket_spam_both_ways(make_settings, start_intake_listener, sink):
    defaults, running = _held_desk(make_settings, start_intake_listener, sink)
    assert (defaults.intake.ticket_auto_generated, defaults.intake.ticket_spam) == (True, False)
    _send_spam_and_auto_generated(running.port)
    assert process(defaults, running.engine).decisions == {SPAM: 1, NEW_TICKET: 1}
    [generated] = all_tickets(running.engine)
    events = reads.ticket_detail(running.engine, generated.reference).events
    assert any(e.kind == EventKind.ACKNOWLEDGEMENT_SUPPRESSED and "auto-generated" in e.detail["reason"]
               for e in events)  # a ticket, never answered

    # The other way, as a reload would: the processor reads the settings each batch.
    flipped = make_settings(INTAKE_OUTBOUND__TRANSPORT="smtp", INTAKE_OUTBOUND__RELAY=f"127.0.0.1:{sink.port}",
                            INTAKE_INTAKE__TICKET_AUTO_GENERATED="false", INTAKE_INTAKE__TICKET_SPAM="true")
    smtp_send(running.port, report(subject="Flagged but real", sender="eve@flagged.test", X_Spam_Flag="YES"),
              mail_from="eve@flagged.test")
    smtp_send(running.port, report(subject="Another form", sender="form@forms.test", Auto_Submitted="auto-generated"),
              mail_from="form@forms.test")
    assert process(flipped, running.engine).decisions == {NEW_TICKET: 1, AUTO_REPLY: 1}
    assert [t.reporter for t in all_tickets(running.engine)][-1] == "eve@flagged.test"
    deliver_outbox(flipped, running.engine)
    assert [m.rcpt_tos for m in sink.wait_for(1)] == [["eve@flagged.test"]]  # spam routed as any report


def test_a_message_processing_failed_on_is_listed_as_failed_and_shown_with_its_error(
        make_settings, start_intake_listener, sink, cli, config_file):
    # A broken acknowledgement template (StrictUndefined) makes processing of every new report fail
    # for real; spam needs no template and is held as usual.
    templates = config_file.parent / "templates"
    templates.mkdir()
    (templates / "acknowledgement.txt.j2").write_text("{{ no_such_variable }}\n")
    settings, running = _held_desk(make_settings, start_intake_listener, sink,
                                   INTAKE_INTAKE__TEMPLATES_DIR=str(templates))
    smtp_send(running.port, report(subject="Path traversal in export", sender="dora@researcher.test",
                                   body="GET /export?file=../../etc/passwd\n"), mail_from="dora@researcher.test")
    smtp_send(running.port, report(subject="Cheap pills", sender="bob@flagged.test", X_Spam_Flag="YES"),
              mail_from="bob@flagged.test")
    result = process(settings, running.engine)
    assert len(result.failed) == 1 and result.decisions == {SPAM: 1}
    [failed_id] = result.failed

    [listed] = _listed(cli, "--decision", HELD_FAILED)
    assert (listed["id"], listed["decision"], listed["subject"]) == (failed_id, HELD_FAILED, "Path traversal in export")
    assert listed["mail_from"] == "dora@researcher.test" and "no_such_variable" in listed["reason"]
    assert {m["decision"] for m in _listed(cli)} == {HELD_FAILED, SPAM}  # failed is held by default too
    table = cli("messages", "--decision", HELD_FAILED).output
    assert "Path traversal in export" in table and "Cheap pills" not in table and HELD_FAILED in table

    shown = cli("messages", "show", str(failed_id)).output
    assert f"{HELD_FAILED}, decision {HELD_FAILED}: " in shown and "no_such_variable" in shown
    assert "| GET /export?file=../../etc/passwd" in shown
    detail = json.loads(cli("messages", "show", str(failed_id), "--json").output)
    assert (detail["status"], detail["decision"], detail["ticket_id"]) == (HELD_FAILED, HELD_FAILED, None)
    assert "no_such_variable" in detail["reason"] and all_tickets(running.engine) == []
