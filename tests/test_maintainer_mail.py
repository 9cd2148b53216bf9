"""A ticket worked by mail alone, end to end over SMTP: the reporter's reply is forwarded to the
maintainers with signed reply addresses; a maintainer's reply to one is relayed to the reporter
(trimmed, attachments kept, no maintainer address), its command lines applied and confirmed;
forged or tokenless mail changes nothing."""

from __future__ import annotations

import base64
import email
import email.policy
import hashlib
import hmac
import logging
import os
import smtplib
import uuid
from datetime import datetime, timedelta, timezone
from email.message import EmailMessage
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from conftest import TRUSTED_MX, deliver_outbox, process, report, smtp_send, trusted_results
from intake.store import schema
from intake.store.db import make_engine, read_session
from intake.store.models import InboundMessage
from intake.tickets import mail_commands
from intake.tickets import reads
from intake.understand import reply_tokens, route, text_work
from intake.understand.parse import parse
from intake.understand.sender_auth import Verdict
from intake.understand.text_work import split_commands, trim_reply

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
        return reads.ticket_detail(self.running.engine, self.reference)


NOW = datetime(2026, 12, 3, 12, 0, tzinfo=timezone.utc)
MAX_AGE = timedelta(days=90)

AUTHENTICATED = trusted_results("maintainers.test")  # what our MX says of Ana's and Bo's mail


@pytest.fixture
def desk(make_settings, start_intake_listener, config_file, sink):
    return open_desk(make_settings, start_intake_listener, config_file, sink)


def open_desk(make_settings, start_intake_listener, config_file, sink, more_config: str = "",  # type: ignore[no-untyped-def]
              **env: str) -> Desk:
    """Alice's report, acknowledged; Ana and Bo are the maintainers (and *more_config*, *env* as given)."""
    config_file.write_text(config_file.read_text() + MAINTAINERS + more_config)
    settings = make_settings(INTAKE_OUTBOUND__TRANSPORT="smtp", INTAKE_OUTBOUND__RELAY=f"127.0.0.1:{sink.port}",
                             # our MX's verdicts are believed; no DNS lookups of our own
                             INTAKE_SENDER_AUTH__TRUSTED_AUTHSERV_IDS=f'["{TRUSTED_MX}"]',
                             INTAKE_SENDER_AUTH__VERIFY="false", **env)
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


def _maintainer_mail(reply_to: str, body: str, sender: str = "ana@maintainers.test",
                     authentication: str | None = AUTHENTICATED) -> EmailMessage:
    message = EmailMessage()
    if authentication:
        message["Authentication-Results"] = authentication
    message["From"] = f"Ana Maintainer <{sender}>"
    message["To"] = reply_to
    message["Subject"] = "Re: reporter replied"
    message["Message-ID"] = f"<m-{uuid.uuid4().hex}@maintainers.test>"
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


def test_a_large_maintainer_reply_is_relayed_with_its_attachment_read_again_from_the_store(desk):
    """A message over the worker's chunk size lets its bytes go once parsed (one large message
    held at a time): relaying its attachment reads them again, and the file arrives intact."""
    reply_to = _reporter_replies(desk)["ana@maintainers.test"]["Reply-To"]
    mail = _maintainer_mail(reply_to, "Here is the full crash dump.\n")
    dump = os.urandom(1024 * 1024)
    mail.add_attachment(dump, maintype="application", subtype="octet-stream", filename="crash.bin")
    desk.send(mail, "ana@maintainers.test", reply_to)

    relayed = _parsed({m.rcpt_tos[0]: m for m in desk.deliver()}["alice@researcher.test"])
    [_, attachment] = list(relayed.iter_parts())
    assert attachment.get_filename() == "crash.bin"
    assert hashlib.sha256(attachment.get_content()).hexdigest() == hashlib.sha256(dump).hexdigest()


def test_commands_by_mail_send_the_reporter_progress_updates(desk):
    reply_to = _reporter_replies(desk)["ana@maintainers.test"]["Reply-To"]
    desk.send(_maintainer_mail(reply_to, "#ack\n#assess high\n#close invalid\n#note\n"), "ana@maintainers.test",
              reply_to)
    to_reporter = [" ".join(_parsed(m).get_content().split()) for m in desk.deliver()
                   if m.rcpt_tos == ["alice@researcher.test"]]
    assert len(to_reporter) == 2
    assert "rated its severity high." in to_reporter[0] and "it is not a vulnerability" in to_reporter[1]


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


def test_reply_address_tokens_are_per_ticket_maintainer_and_issue_day():
    secret, reference, ana = b"s" * 32, "SEC-2026-0001", "ana@maintainers.test"
    address = reply_tokens.reply_address(secret, "security@example.com", reference, ana, NOW)
    token = address.split("@")[0].split(".")[-1]
    assert len(token) == 24 and address == f"security+{reference}.{token}@example.com"
    assert reply_tokens.verify(secret, reference, token, "ANA@maintainers.test", NOW, MAX_AGE)
    assert reply_tokens.verify(secret, reference, token, ana, NOW + MAX_AGE, MAX_AGE)  # a replay within its age
    assert not reply_tokens.verify(secret, reference, token, ana, NOW + MAX_AGE + timedelta(days=1), MAX_AGE)
    assert not reply_tokens.verify(secret, "SEC-2026-0002", token, ana, NOW, MAX_AGE)
    assert not reply_tokens.verify(secret, reference, token, "bo@maintainers.test", NOW, MAX_AGE)
    assert not reply_tokens.verify(b"t" * 32, reference, token, ana, NOW, MAX_AGE)
    backdated = ("b" if token[3] != "b" else "c") + token[1:]  # another issue day, same MAC: forged
    assert not reply_tokens.verify(secret, reference, backdated, ana, NOW, MAX_AGE)
    # Whose it is, found by trying every maintainer: what a refusal is told to.
    assert reply_tokens.check(secret, reference, token, ["bo@maintainers.test", ana], NOW + timedelta(days=91),
                              MAX_AGE) == reply_tokens.TokenCheck(reply_tokens.EXPIRED, ana, NOW.date())


def test_old_format_tokens_are_expired_and_non_ascii_ones_are_nobodys():
    secret, reference, ana = b"s" * 32, "SEC-2026-0001", "ana@maintainers.test"
    # A token as made before tokens carried their issue day.
    old = base64.b32encode(hmac.new(secret, f"{reference}\0{ana}".encode(), hashlib.sha256).digest()).decode()
    checked = reply_tokens.check(secret, reference, old.lower()[:20], [ana], NOW, MAX_AGE)
    assert (checked.status, checked.maintainer) == (reply_tokens.OLD_FORMAT, ana)
    for candidate in ("\u017f" + "a" * 19, "\u017f" * 24, "\u212a" * 24, "\u00e9" * 20, "a" * 23 + "\u0131"):
        assert reply_tokens.check(secret, reference, candidate, [ana], NOW, MAX_AGE).status == reply_tokens.INVALID
        assert not reply_tokens.verify(secret, reference, candidate, ana, NOW, MAX_AGE)


class _OneTicket:
    """The one lookup the reply-address rule makes: SEC-2026-0001 exists."""

    def ticket_by_reference(self, reference: str) -> route.TicketRef | None:
        return route.TicketRef(7, reference, "alice@researcher.test") if reference == "SEC-2026-0001" else None


def _route_to(address: str, sender: str, verdict: Verdict, secret: bytes = b"s" * 32) -> route.Decision:
    maintainers = ["ana@maintainers.test", "bo@maintainers.test"]
    config = route.RoutingConfig(
        our_addresses=frozenset({"security@example.com"}), loop_marker="intake.example.com", reference_prefix="SEC",
        is_maintainer=lambda address: address.lower() in maintainers, never_answered=lambda address: False,
        check_reply_token=lambda reference, token: reply_tokens.check(secret, reference, token, maintainers, NOW,
                                                                      MAX_AGE))
    mail = parse(_maintainer_mail(address, "#close invalid\n", sender=sender).as_bytes())
    incoming = route.Incoming(mail=mail, mail_from=sender, rcpt_tos=[address], message_key="k",
                              authentication=verdict)
    return route.reply_address(incoming, _OneTicket(), config)  # type: ignore[arg-type]


def test_the_reply_address_rule_needs_a_valid_token_and_an_authenticated_sender():
    ana = "ana@maintainers.test"
    address = reply_tokens.reply_address(b"s" * 32, "security@example.com", "SEC-2026-0001", ana, NOW)
    passed = Verdict("pass", "dmarc=pass header.from=maintainers.test (by mx.example.com)")
    decision = _route_to(address, ana, passed)
    assert (decision.kind, decision.ticket_id, decision.authenticated) == ("maintainer-reply", 7, True)
    for verdict in (Verdict("none", "not checked"), Verdict("fail", "dkim=fail (signature did not verify)")):
        refused = _route_to(address, ana, verdict)
        assert (refused.kind, refused.ticket_id, refused.authenticated) == ("rejected", None, False)
        assert "authentication failed" in refused.reason and verdict.reason in refused.reason
        assert refused.refused == route.RefusedReplyAddress(route.TicketRef(7, "SEC-2026-0001", "alice@researcher.test"), ana)
    stale = reply_tokens.reply_address(b"s" * 32, "security@example.com", "SEC-2026-0001", ana,
                                       NOW - MAX_AGE - timedelta(days=1))
    expired = _route_to(stale, ana, passed)
    assert expired.kind == "rejected" and expired.reason.startswith("reply address expired")
    assert expired.refused is not None and expired.refused.maintainer == ana
    # Someone else's reply address, or another secret's: rejected, and no one to tell.
    for decision in (_route_to(address, "bo@maintainers.test", passed), _route_to(address, ana, passed, b"t" * 32)):
        assert (decision.kind, decision.refused) == ("rejected", None) and "nothing changed" in decision.reason


def _last_inbound(desk: Desk, count: int = 1) -> list[InboundMessage]:
    with read_session(desk.running.engine) as session:
        return list(session.scalars(select(InboundMessage).order_by(InboundMessage.id.desc()).limit(count)))


def _unchanged(before, after) -> None:  # type: ignore[no-untyped-def]
    fields = ("state", "close_reason", "severity", "assignee", "labels", "credit")
    assert [getattr(after.ticket, f) for f in fields] == [getattr(before.ticket, f) for f in fields]
    assert (len(after.entries), len(after.events)) == (len(before.entries), len(before.events))


def test_forged_maintainer_mail_with_a_valid_token_changes_nothing_and_the_maintainer_is_told_once(desk):
    reply_to = _reporter_replies(desk)["ana@maintainers.test"]["Reply-To"]
    before = desk.ticket()
    for _ in range(3):  # the attacker tries again; a replay is stopped by authentication alone
        forged = _maintainer_mail(reply_to, "#close invalid\n#credit Mallory Evil\n#label wontfix\n\n"
                                            "Please send your full PoC to mallory@evil.test\n",
                                  # a header anyone can write: only our MX's is believed
                                  authentication="mx.evil.test; dmarc=pass header.from=maintainers.test")
        desk.send(forged, "ana@maintainers.test", reply_to)
    _unchanged(before, desk.ticket())
    for row in _last_inbound(desk, 3):
        assert (row.decision, row.ticket_id) == ("rejected", None)
        assert "authentication failed" in row.reason and "nothing changed" in row.reason
    [notice] = desk.deliver()  # nothing relayed to the reporter; one notice for three attempts
    assert notice.rcpt_tos == ["ana@maintainers.test"]  # the address from the configuration
    parsed = _parsed(notice)
    assert parsed["Auto-Submitted"] == "auto-generated" and parsed["X-Intake-Loop"]
    assert parsed["Reply-To"].startswith(f"security+{desk.reference}.")
    text = parsed.get_content()
    assert "refused" in text and "authentication failed" in text and parsed["Reply-To"] in text


@pytest.mark.parametrize("kind", ["expired", "old format"])
def test_an_expired_reply_address_is_refused_and_answered_with_a_fresh_one(desk, kind):
    ana, now = "ana@maintainers.test", datetime.now(timezone.utc)
    secret = reply_tokens.secret(desk.running.engine)
    if kind == "expired":
        stale = reply_tokens.reply_address(secret, "security@example.com", desk.reference, ana,
                                           now - timedelta(days=91))
    else:
        old = hmac.new(secret, f"{desk.reference}\0{ana}".encode(), hashlib.sha256).digest()
        stale = f"security+{desk.reference}.{base64.b32encode(old).decode().lower()[:20]}@example.com"
    before = desk.ticket()
    desk.send(_maintainer_mail(stale, "#severity high\n\nFixed in 1.4.2.\n"), ana, stale)
    _unchanged(before, desk.ticket())
    [row] = _last_inbound(desk)
    assert row.decision == "rejected" and row.reason.startswith("reply address expired") and kind in row.reason
    [notice] = desk.deliver()
    fresh = _parsed(notice)["Reply-To"]
    assert notice.rcpt_tos == [ana] and fresh != stale and fresh in _parsed(notice).get_content()
    desk.send(_maintainer_mail(fresh, "#severity high\n#note\n"), ana, fresh)
    assert desk.ticket().ticket.severity == "high"


def test_rotating_the_secret_retires_every_reply_address(desk, cli):
    old = _reporter_replies(desk)["ana@maintainers.test"]["Reply-To"]
    output = cli("secret", "rotate").output
    assert "stops working" in output and "1 open ticket(s)" in output
    desk.send(_maintainer_mail(old, "#severity high\n#note\n"), "ana@maintainers.test", old)
    [row] = _last_inbound(desk)
    assert row.decision == "rejected" and desk.ticket().ticket.severity is None
    assert desk.deliver() == []  # a token of the old secret is nobody's: no one to tell
    again = report(subject=f"Re: [{desk.reference}] Auth bypass in admin", body="Any news?\n")
    desk.send(again, "alice@researcher.test", "security@example.com")
    new = {m.rcpt_tos[0]: _parsed(m) for m in desk.deliver()}["ana@maintainers.test"]["Reply-To"]
    assert new != old
    desk.send(_maintainer_mail(new, "#severity high\n#note\n"), "ana@maintainers.test", new)
    assert desk.ticket().ticket.severity == "high"


def test_rotating_is_refused_when_the_operator_gives_the_secret(make_settings, cli, monkeypatch, tmp_path):
    make_settings()
    (tmp_path / "credentials").mkdir()
    (tmp_path / "credentials" / "reply-secret").write_text("c2VjcmV0IGZyb20gYSBjcmVkZW50aWFsIGZpbGUK\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path / "credentials"))
    output = cli("secret", "rotate", code=1).output
    assert "$CREDENTIALS_DIRECTORY/reply-secret" in output and "restart" in output
    monkeypatch.delenv("CREDENTIALS_DIRECTORY")
    monkeypatch.setenv("INTAKE_REPLY_SECRET", "c2VjcmV0IGZyb20gdGhlIGVudmlyb25tZW50Cg==")
    assert "$INTAKE_REPLY_SECRET" in cli("secret", "rotate", code=1).output


def test_a_shell_without_the_service_credential_refuses_to_sign(make_settings, cli, monkeypatch, caplog):
    """The service signs with its credential; a maintainer's shell cannot read it. Signing there with
    the database's secret would send reply addresses the service refuses: the command says so instead."""
    engine = make_engine(make_settings().database_url)
    schema.upgrade(engine)
    monkeypatch.setattr(reply_tokens, "_secrets", {})
    monkeypatch.setattr(reply_tokens, "_fingerprinted", set())
    monkeypatch.setenv("INTAKE_REPLY_SECRET", "c2VydmljZSBjcmVkZW50aWFsCg==")
    assert reply_tokens.secret(engine) == b"c2VydmljZSBjcmVkZW50aWFsCg=="  # as the service: recorded
    monkeypatch.delenv("INTAKE_REPLY_SECRET")
    with pytest.raises(reply_tokens.SecretUnavailable):
        reply_tokens.secret(engine)
    output = cli("sweep", code=78).output
    assert "cannot read" in output and "CREDENTIALS_DIRECTORY" in output
    cli("sweep", "--dry-run")  # signs nothing: allowed
    assert "credential" in cli("secret", "rotate", code=1).output  # the database's secret is not the one in use
    monkeypatch.setenv("INTAKE_REPLY_SECRET", "YW5vdGhlciBub2RlJ3MK")
    monkeypatch.setattr(reply_tokens, "_fingerprinted", set())
    with caplog.at_level(logging.WARNING, logger="intake.understand.reply_tokens"):
        reply_tokens.secret(engine)
    assert "event=reply-secret-differs" in caplog.text


def test_other_nodes_use_a_rotated_secret_within_their_cache_time(make_settings, monkeypatch):
    engine = make_engine(make_settings().database_url)
    schema.upgrade(engine)
    clock = [1000.0]
    monkeypatch.setattr(reply_tokens, "_clock", lambda: clock[0])
    monkeypatch.setattr(reply_tokens, "_secrets", {})
    first = reply_tokens.secret(engine)
    node = dict(reply_tokens._secrets)  # another node's cached copy
    reply_tokens.rotate(engine, NOW)
    reply_tokens._secrets.update(node)
    assert reply_tokens.secret(engine) == first  # still cached there...
    clock[0] += reply_tokens.CACHE_SECONDS
    assert reply_tokens.secret(engine) != first  # ...but no longer than CACHE_SECONDS


def test_a_non_ascii_token_does_not_crash_processing(desk):
    rcpt = f"security+{desk.reference}.\u017f{'a' * 19}@example.com"  # IGNORECASE [a-z] matches the long s
    message = _maintainer_mail(rcpt, "#severity high\n")
    with smtplib.SMTP("127.0.0.1", desk.running.port, timeout=30) as client:
        client.sendmail("ana@maintainers.test", [rcpt], message.as_bytes(policy=message.policy.clone(linesep="\r\n")),
                        mail_options=["SMTPUTF8"])
    result = process(desk.settings, desk.running.engine)
    assert result.failed == [] and desk.ticket().ticket.severity is None


def test_trimming_and_command_lines():
    assert trim_reply("Fixed.\n\nOn Tue, Alice wrote:\n> old\n") == "Fixed."
    assert trim_reply("Fixed.\n> quoted inline\nMore.\n-- \nsig") == "Fixed.\nMore."
    assert trim_reply("Yes.\n-----Original Message-----\nFrom: x") == "Yes."
    commands, rest = split_commands("#severity high\n\n#assign ana\nHello\n#not a command here\n")
    assert commands == [("severity", "high"), ("assign", "ana")]
    assert rest == "Hello\n#not a command here"


@given(st.lists(st.sampled_from(["On Tue, Alice wrote:", "on x WROTE:  ", "Fixed.", "> old", " >> older", "-- ",
                                  "--", " -- ", "--x", "-----Original Message-----", "From: x", "FROM: y", " from:z",
                                  "_" * 10, "Am Mo, Bob schrieb:", "Anna", "ofen", "\u212a", "\u0130", "\t", "",
                                  "\u00a0>"]),
                max_size=12).map("\n".join))
@settings(max_examples=500, deadline=None)
def test_trimming_keeps_the_lines_that_no_rule_touches(text):
    # Lines whose first character can start no rule skip the rules: the text must trim the same.
    def every_rule_on_every_line(text: str) -> str:
        kept = []
        for line in text.splitlines():
            if line.rstrip() == "--" and line.startswith("--"):
                break
            stripped = line.strip()
            if stripped.lower().startswith(text_work._QUOTE_START_PREFIXES) and text_work._QUOTE_START.match(stripped):
                break
            if line.lstrip().startswith(">"):
                continue
            kept.append(line.rstrip())
        return "\n".join(kept).strip("\n")

    assert trim_reply(text) == every_rule_on_every_line(text)


def test_maintainer_address_is_blanked_in_any_case(desk):
    """The blanking once was case-sensitive, so `Ana@Maintainers.TEST` reached the reporter."""
    reply_to = _reporter_replies(desk)["ana@maintainers.test"]["Reply-To"]
    desk.send(_maintainer_mail(reply_to, "Fixed in 2.4.1. Reach me at Ana@Maintainers.TEST or ANA@maintainers.test.\n"),
              "ana@maintainers.test", reply_to)
    relayed = {m.rcpt_tos[0]: m for m in desk.deliver()}["alice@researcher.test"]
    assert b"maintainers.test" not in relayed.data.lower()
    body = _parsed(relayed).get_content()
    assert "Reach me at [maintainer] or [maintainer]." in body


# -- the commands' table: help, forward text and README generated from it ------------------------


def test_every_command_is_in_the_help_and_the_forward_text():
    help_text, footer = mail_commands.help_text(), "\n".join(mail_commands.footer())
    for command in mail_commands.COMMANDS:
        assert f"\n{command.synopsis}\n    {command.help}" in help_text
        assert f"#{command.name}" in footer.split()
        assert all(f"#{alias}" in help_text for alias in command.aliases)


def test_an_unknown_command_is_refused_with_every_known_name_and_asks_for_the_help():
    request = mail_commands.Request(None, None, None, NOW, "Ana Maintainer")  # type: ignore[arg-type]
    outcome = mail_commands.carry_out(request, [("sevrity", "high"), ("note", "")])
    assert outcome.show_help and outcome.done == []
    [refused] = outcome.refused
    assert refused == f"#sevrity high: unknown command #sevrity (known: {mail_commands.names()})"
    assert mail_commands.names().split() == [f"#{command.name}" for command in mail_commands.COMMANDS]
    assert mail_commands.carry_out(request, [("help", "")]).show_help
    assert not mail_commands.carry_out(request, [("note", "")]).show_help


def test_readme_lists_the_commands_of_the_table():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    start = "<!-- mail-commands: generated from intake.tickets.mail_commands.COMMANDS -->\n"
    end = "<!-- /mail-commands -->"
    listed = readme[readme.index(start) + len(start):readme.index(end)]
    rows = ["| command | what it does |", "|---|---|"]
    for command in mail_commands.COMMANDS:
        also = f" (also {', '.join(f'`#{alias}`' for alias in command.aliases)})" if command.aliases else ""
        rows.append(f"| `{command.synopsis.replace('|', chr(92) + '|')}` | {command.help}{also} |")
    assert listed == "\n".join(rows) + "\n", "README's mail commands differ from the table: paste\n" + "\n".join(rows)


def test_an_unknown_command_or_help_is_answered_with_every_command(desk):
    forwards = _reporter_replies(desk)
    assert mail_commands.names() in " ".join(forwards["bo@maintainers.test"].get_content().split())
    reply_to = forwards["ana@maintainers.test"]["Reply-To"]
    answers = []
    for body in ("#severity high\n#sevreity low\n#note\n", "#help\n"):
        desk.send(_maintainer_mail(reply_to, body), "ana@maintainers.test", reply_to)
        [confirmation] = desk.deliver()
        answers.append(_parsed(confirmation).get_content().replace("\r\n", "\n"))
    for text in answers:
        assert text.endswith(mail_commands.help_text())
        assert all(f"\n{command.synopsis}\n" in text for command in mail_commands.COMMANDS)
    assert f"- #sevreity low: unknown command #sevreity (known: {mail_commands.names()})" in answers[0]
    assert "Nothing was changed or sent." in answers[1]
    assert desk.ticket().ticket.severity == "high"  # the known command was carried out


def test_a_command_with_an_unclosed_quote_is_refused_and_the_rest_carried_out(desk):
    reply_to = _reporter_replies(desk)["ana@maintainers.test"]["Reply-To"]
    desk.send(_maintainer_mail(reply_to, "#label 'unclosed\n#severity high\n#note\n"), "ana@maintainers.test",
              reply_to)
    [confirmation] = desk.deliver()
    text = _parsed(confirmation).get_content()
    assert "#label 'unclosed: cannot read the arguments: No closing quotation" in text and "severity high" in text
    assert desk.ticket().ticket.severity == "high"
