"""A ticket worked by mail alone, end to end over SMTP: the reporter's reply is forwarded to the
maintainers with signed reply addresses; a maintainer's reply to one is relayed to the reporter
(trimmed, attachments kept, no maintainer address), its command lines applied and confirmed;
forged or tokenless mail changes nothing."""

from __future__ import annotations

import email
import email.policy
from email.message import EmailMessage

import pytest
from sqlalchemy import select

from conftest import deliver_outbox, process, report, smtp_send
from intake import reply_tokens, tickets
from intake.db import read_session
from intake.models import InboundMessage
from intake.maintainer_mail import split_commands, trim_reply

MAINTAINERS = """
[[maintainers]]
name = "Ana Maintainer"
email = "ana@maintainers.test"

[[maintainers]]
name = "Bo Triager"
email = "bo@maintainers.test"
"""


class Desk:
    def __init__(self, settings, running, sink, reference):  # type: ignore[no-untyped-def]
        self.settings, self.running, self.sink, self.reference = settings, running, sink, reference

    def deliver(self) -> list:
        """Send what is queued and return the mail that reached the sink since the last call."""
        before = len(self.sink.messages)
        sent = deliver_outbox(self.settings, self.running.engine).get("sent", 0)
        return self.sink.wait_for(before + sent)[before:]

    def send(self, message: EmailMessage, mail_from: str, rcpt: str) -> None:
        smtp_send(self.running.port, message, mail_from=mail_from, rcpt_tos=[rcpt])
        process(self.settings, self.running.engine)

    def ticket(self):  # type: ignore[no-untyped-def]
        return tickets.ticket_detail(self.running.engine, self.reference)


@pytest.fixture
def desk(make_settings, start_intake_listener, config_file, sink):
    config_file.write_text(config_file.read_text() + MAINTAINERS)
    settings = make_settings(INTAKE_OUTBOUND__TRANSPORT="smtp", INTAKE_OUTBOUND__RELAY=f"127.0.0.1:{sink.port}")
    running = start_intake_listener(settings)
    smtp_send(running.port, report(subject="Auth bypass in admin", message_id="<report@alice.test>"))
    [reference] = process(settings, running.engine).tickets_opened
    desk = Desk(settings, running, sink, reference)
    desk.deliver()  # the acknowledgement
    return desk


def _parsed(mail) -> email.message.EmailMessage:  # type: ignore[no-untyped-def]
    return email.message_from_bytes(mail.data, policy=email.policy.default)


def _reporter_replies(desk: Desk) -> dict[str, email.message.EmailMessage]:
    """The reporter answers; returns the forward each maintainer got, by maintainer."""
    answer = report(subject=f"Re: [{desk.reference}] Auth bypass in admin", body="It also works on /api/admin.\n",
                    message_id="<followup@alice.test>")
    desk.send(answer, "alice@researcher.test", "security@example.com")
    return {mail.rcpt_tos[0]: _parsed(mail) for mail in desk.deliver()}


def _maintainer_mail(reply_to: str, body: str, sender: str = "ana@maintainers.test") -> EmailMessage:
    message = EmailMessage()
    message["From"] = f"Ana Maintainer <{sender}>"
    message["To"] = reply_to
    message["Subject"] = "Re: reporter replied"
    message["Message-ID"] = f"<m-{abs(hash(body))}@maintainers.test>"
    message.set_content(body)
    return message


def test_reporter_reply_is_forwarded_to_each_maintainer_with_their_own_reply_address(desk):
    forwards = _reporter_replies(desk)
    assert sorted(forwards) == ["ana@maintainers.test", "bo@maintainers.test"]
    ana, bo = forwards["ana@maintainers.test"], forwards["bo@maintainers.test"]
    assert "It also works on /api/admin." in ana.get_content()
    assert ana["Reply-To"] != bo["Reply-To"]
    assert ana["Reply-To"].startswith(f"security+{desk.reference}.") and ana["Reply-To"].endswith("@example.com")
    assert ana["Auto-Submitted"] == "auto-generated"


def test_maintainer_reply_is_relayed_trimmed_with_attachments_and_commands_applied(desk):
    reply_to = _reporter_replies(desk)["ana@maintainers.test"]["Reply-To"]
    mail = _maintainer_mail(reply_to, "#severity high\n#assign bo\n\nThanks, we reproduced it; a fix is coming.\n"
                                      "Write to ana@maintainers.test if urgent.\n\n"
                                      "On Mon, 30 Nov 2026, Alice <alice@researcher.test> wrote:\n> It also works\n"
                                      "-- \nAna Maintainer\nana@maintainers.test\n")
    mail.add_attachment(b"patch contents\n", maintype="text", subtype="x-diff", filename="fix.diff")
    desk.send(mail, "ana@maintainers.test", reply_to)

    ticket = desk.ticket().ticket
    assert (ticket.severity, ticket.assignee) == ("high", "bo@maintainers.test")
    delivered = {m.rcpt_tos[0]: m for m in desk.deliver()}
    relayed = delivered["alice@researcher.test"]
    assert b"maintainers.test" not in relayed.data  # never the maintainer's address
    parsed = _parsed(relayed)
    assert parsed["From"].addresses[0].addr_spec == "security@example.com"
    assert parsed["Subject"] == f"Re: [{desk.reference}] Auth bypass in admin"
    [text_part, attachment] = list(parsed.iter_parts())
    body = text_part.get_content()
    assert "Thanks, we reproduced it" in body and "[maintainer]" in body
    assert "It also works" not in body and "Ana Maintainer" not in body  # quote and signature trimmed
    assert (attachment.get_filename(), attachment.get_content()) == ("fix.diff", "patch contents\n")
    confirmation = _parsed(delivered["ana@maintainers.test"])
    assert confirmation["Auto-Submitted"] == "auto-replied"
    text = confirmation.get_content()
    assert "severity high" in text and "assigned to bo@maintainers.test" in text and "sent your reply" in text
    assert [e.kind for e in desk.ticket().events if e.kind == "milestone"] == ["milestone"]  # the human ack


def test_credit_by_mail(desk):
    reply_to = _reporter_replies(desk)["ana@maintainers.test"]["Reply-To"]
    desk.send(_maintainer_mail(reply_to, "#credit Alice Researcher @alice https://alice.test\n#note\n"),
              "ana@maintainers.test", reply_to)
    stored = desk.ticket().ticket.credit
    assert (stored["name"], stored["handle"], stored["url"], stored["source"]) == (
        "Alice Researcher", "@alice", "https://alice.test", "mail")
    desk.send(_maintainer_mail(reply_to, "#credit anonymous\n#note\n"), "ana@maintainers.test", reply_to)
    assert desk.ticket().ticket.credit["anonymous"] is True


def test_note_stays_internal_and_refused_commands_are_reported(desk):
    reply_to = _reporter_replies(desk)["ana@maintainers.test"]["Reply-To"]
    desk.send(_maintainer_mail(reply_to, "#note\n#state waiting\n#severity urgent\n\nLooks like the 2019 bug.\n"),
              "ana@maintainers.test", reply_to)
    detail = desk.ticket()
    assert detail.ticket.state == "waiting" and detail.ticket.severity is None
    assert [e.body_text for e in detail.entries if e.kind == "note"] == ["Looks like the 2019 bug.\n"]
    [confirmation] = desk.deliver()  # nothing went to the reporter
    assert confirmation.rcpt_tos == ["ana@maintainers.test"]
    text = _parsed(confirmation).get_content()
    assert "#severity urgent: unknown severity 'urgent'" in text and "internal note" in text


@pytest.mark.parametrize("sender, address", [
    ("bo@maintainers.test", "ana"),  # Bo using Ana's reply address
    ("mallory@evil.test", "ana"),  # a stranger using it
    ("ana@maintainers.test", "forged"),  # a made-up token
])
def test_forged_or_foreign_reply_addresses_change_nothing(desk, sender, address):
    forwards = _reporter_replies(desk)
    reply_to = forwards["ana@maintainers.test"]["Reply-To"]
    if address == "forged":
        reply_to = f"security+{desk.reference}.{'a' * 20}@example.com"
    before = desk.ticket()
    desk.send(_maintainer_mail(reply_to, "#severity low\n#close invalid\n\nIgnore this.\n", sender=sender),
              sender, reply_to)
    after = desk.ticket()
    assert (after.ticket.severity, after.ticket.state) == (before.ticket.severity, before.ticket.state)
    assert len(after.entries) == len(before.entries)
    with read_session(desk.running.engine) as session:
        last = session.scalars(select(InboundMessage).order_by(InboundMessage.id.desc())).first()
    assert (last.decision, last.ticket_id) == ("rejected", None) and "nothing changed" in last.reason
    assert desk.deliver() == []  # nothing relayed, nothing confirmed


def test_maintainer_mail_without_a_token_threads_but_is_not_relayed(desk):
    message = _maintainer_mail("security@example.com", "#severity low\n\nRelay this?\n")
    message.replace_header("Subject", f"Re: [{desk.reference}] Auth bypass in admin")
    desk.send(message, "ana@maintainers.test", "security@example.com")
    detail = desk.ticket()
    assert detail.entries[-1].kind == "maintainer-reply" and detail.ticket.severity is None
    assert all(m.rcpt_tos != ["alice@researcher.test"] for m in desk.deliver())


def test_reply_address_tokens_are_per_ticket_and_maintainer():
    secret = b"s" * 32
    ana = reply_tokens.reply_address(secret, "security@example.com", "SEC-2026-0001", "ana@maintainers.test")
    token = ana.split("@")[0].split(".")[-1]
    assert reply_tokens.verify(secret, "SEC-2026-0001", token, "ANA@maintainers.test")
    assert not reply_tokens.verify(secret, "SEC-2026-0002", token, "ana@maintainers.test")
    assert not reply_tokens.verify(secret, "SEC-2026-0001", token, "bo@maintainers.test")
    assert not reply_tokens.verify(b"t" * 32, "SEC-2026-0001", token, "ana@maintainers.test")


def test_trimming_and_command_lines():
    assert trim_reply("Fixed.\n\nOn Tue, Alice wrote:\n> old\n") == "Fixed."
    assert trim_reply("Fixed.\n> quoted inline\nMore.\n-- \nsig") == "Fixed.\nMore."
    assert trim_reply("Yes.\n-----Original Message-----\nFrom: x") == "Yes."
    commands, rest = split_commands("#severity high\n\n#assign ana\nHello\n#not a command here\n")
    assert commands == [("severity", "high"), ("assign", "ana")]
    assert rest == "Hello\n#not a command here"


def test_maintainer_address_is_blanked_in_any_case(desk):
    """Finding 11: the blanking was case-sensitive, so `Ana@Maintainers.TEST` reached the reporter."""
    reply_to = _reporter_replies(desk)["ana@maintainers.test"]["Reply-To"]
    desk.send(_maintainer_mail(reply_to, "Fixed in 2.4.1. Reach me at Ana@Maintainers.TEST or ANA@maintainers.test.\n"),
              "ana@maintainers.test", reply_to)
    relayed = {m.rcpt_tos[0]: m for m in desk.deliver()}["alice@researcher.test"]
    assert b"maintainers.test" not in relayed.data.lower()
    body = _parsed(relayed).get_content()
    assert "Reach me at [maintainer] or [maintainer]." in body
