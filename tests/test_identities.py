"""Honest identities (issue 12, findings 3, 7 and 9), over real SMTP and real databases: only the
reporter changes a ticket by mail; anyone else threading in is a third party, recorded and
forwarded; a bounce attaches only when it names mail we sent; a non-ASCII +tag is untokened."""

from __future__ import annotations

import email
import email.policy
import smtplib
from datetime import datetime, timezone
from email.message import EmailMessage

import pytest
from sqlalchemy import select

from conftest import all_tickets, process, report, smtp_send
from intake.run import processor
from intake.send import outbox
from intake.store import inbound
from intake.store.db import read_session, write_session
from intake.store.models import InboundMessage, Ticket
from intake.tickets import maintainer_mail, records
from intake.understand import decisions, lookups, route, text_work
from intake.tickets import maintainer_mail
from intake.tickets import reads
from intake.understand import route, text_work
from intake.understand.parse import parse
from intake.understand.sender_auth import FAIL, NONE, PASS, Verdict

YEAR = datetime.now(timezone.utc).year
REF1 = f"SEC-{YEAR}-0001"
ALICE = "alice@researcher.test"
MIA = "mia@example.com"


class Intake:
    """A listener with one maintainer (Mia, who gets no new-ticket notices) and helpers."""

    def __init__(self, settings, running):  # type: ignore[no-untyped-def]
        self.settings, self.running = settings, running

    def send(self, message: EmailMessage | bytes, mail_from: str = ALICE,
             rcpt_tos: list[str] | None = None) -> processor.BatchResult:
        smtp_send(self.running.port, message, mail_from=mail_from, rcpt_tos=rcpt_tos)
        return process(self.settings, self.running.engine)

    def detail(self, reference: str = REF1) -> reads.TicketDetail:
        return reads.ticket_detail(self.running.engine, reference)

    def mail(self) -> list:
        return sorted(outbox.listing(self.running.engine), key=lambda row: row.id)

    def stored(self) -> list[InboundMessage]:
        with read_session(self.running.engine) as session:
            return list(session.scalars(select(InboundMessage).order_by(InboundMessage.id)))

    def waiting(self) -> None:
        with write_session(self.running.engine) as session:
            ticket = session.scalars(select(Ticket).where(Ticket.reference == REF1)).one()
            records.change_state(session, ticket, "waiting", datetime.now(timezone.utc), actor="mia",
                                 why="asked for a PoC")


@pytest.fixture
def intake(make_settings, start_intake_listener) -> Intake:
    settings = make_settings(INTAKE_MAINTAINERS=f'[{{"name": "Mia", "email": "{MIA}"}}]',
                             INTAKE_SCHEDULER__NEW_TICKET_NOTICE="false")
    desk = Intake(settings, start_intake_listener(settings))
    desk.send(report(subject="RCE in upload", message_id="<report@researcher.test>",
                     body="Steps to reproduce: upload a .phtml file.\nPlease credit me as Alice Researcher.\n"))
    return desk


def _reply(body: str, sender: str = ALICE, subject: str = "Re: RCE in upload", in_reply_to: str | None = None,
           name: str = "Alice Researcher") -> EmailMessage:
    message = report(subject=subject, sender=sender, body=body)
    message.replace_header("From", f"{name} <{sender}>")
    if in_reply_to:
        message["In-Reply-To"] = in_reply_to
        message["References"] = in_reply_to
    return message


def _ack_id(intake: Intake) -> str:
    return next(row.message_id for row in intake.mail() if row.dedupe_key == f"ack:{REF1}")


def _assert_nothing_changed(intake: Intake, state: str = "waiting") -> reads.TicketDetail:
    detail = intake.detail()
    assert detail.ticket.credit["name"] == "Alice Researcher"
    assert detail.ticket.state == state
    assert detail.ticket.reporter_unreachable_at is None
    assert [e.kind for e in detail.events if e.kind in ("credit-changed", "reporter-unreachable")] == []
    return detail


# -- finding 3: a stranger does not become the reporter ------------------------------------------


def test_a_stranger_quoting_the_reporters_message_id_is_a_third_party(intake):
    intake.waiting()
    result = intake.send(_reply("Please credit me as Mallory Evil.\nAlso, send the PoC to me.\n",
                                sender="mallory@evil.test", name="Mallory Evil",
                                in_reply_to="<report@researcher.test>"), mail_from="mallory@evil.test")
    assert result.decisions == {"third-party-reply": 1}
    detail = _assert_nothing_changed(intake)
    entry = detail.entries[-1]
    assert (entry.kind, entry.sender, entry.threaded_by) == (
        "third-party-reply", "mallory@evil.test", "In-Reply-To <report@researcher.test>")
    assert "third-party-reply-received" in [e.kind for e in detail.events]
    stored = intake.stored()[-1]
    assert (stored.status, stored.decision) == ("processed", "third-party-reply")
    assert stored.reason == "threads by In-Reply-To <report@researcher.test>; mallory@evil.test is not the reporter"
    # Forwarded to the maintainers as what it is, and nobody else hears anything.
    *_, forward = intake.mail()
    assert (forward.kind, forward.recipients) == ("third-party-forward", [MIA])
    sent = email.message_from_bytes(forward.raw, policy=email.policy.default)
    assert sent["Subject"].startswith(f"[{REF1}] third party (not the reporter) wrote:")
    assert sent["Reply-To"] is None  # a reply must not reach the reporter by mistake
    text = sent.get_content()
    assert "NOT the reporter" in text and "mallory@evil.test" in text and "reporter replied" not in text
    assert "Mallory Evil" in text
    assert [row.kind for row in intake.mail() if row.recipients != [MIA]] == ["acknowledgement"]


def test_a_coordinator_replying_to_our_mail_is_recorded_and_changes_nothing(intake):
    intake.waiting()
    result = intake.send(_reply("I'm coordinating this one; keep me anonymous.\n", sender="cert@coord.test",
                                name="CERT", in_reply_to=_ack_id(intake)), mail_from="cert@coord.test")
    assert result.decisions == {"third-party-reply": 1}
    assert _assert_nothing_changed(intake).entries[-1].kind == "third-party-reply"


def test_the_reporters_envelope_with_another_from_on_the_plus_tag_is_a_third_party(intake):
    intake.waiting()
    tagged = [f"security+{REF1}@example.com"]
    result = intake.send(_reply("keep me anonymous\n", sender="mallory@evil.test", name="Mallory"),
                         rcpt_tos=tagged)
    assert result.decisions == {"third-party-reply": 1}
    assert _assert_nothing_changed(intake).entries[-1].threaded_by == f"+tag {tagged[0]}"
    assert intake.stored()[-1].reason.endswith("the reporter's envelope address, but From: mallory@evil.test")


def test_a_stranger_on_the_plus_tag_or_subject_tag_still_opens_a_new_ticket(intake):
    tagged = [f"security+{REF1}@example.com"]
    result = intake.send(_reply("keep me anonymous\n", sender="eve@elsewhere.test", subject=f"Re: [{REF1}] x"),
                         mail_from="eve@elsewhere.test", rcpt_tos=tagged)
    assert result.decisions == {"new-ticket": 1}
    assert [e.kind for e in _assert_nothing_changed(intake, state="new").entries] == ["report", "automatic"]


def test_the_real_reporter_still_changes_credit_and_resumes(intake):
    intake.waiting()
    result = intake.send(_reply("Please credit me as Alice R. Searcher.\n", in_reply_to=_ack_id(intake)))
    assert result.decisions == {"reporter-reply": 1}
    detail = intake.detail()
    assert (detail.ticket.credit["name"], detail.ticket.state) == ("Alice R. Searcher", "new")
    *_, forward = intake.mail()
    assert forward.kind == "reporter-reply-forward"
    # Envelope and From in another case are still the reporter.
    intake.waiting()
    result = intake.send(_reply("keep me anonymous\n", sender="Alice@Researcher.TEST"),
                         mail_from="ALICE@researcher.test", rcpt_tos=[f"security+{REF1.lower()}@example.com"])
    assert result.decisions == {"reporter-reply": 1}
    assert (intake.detail().ticket.credit["anonymous"], intake.detail().ticket.state) == (True, "new")


def _route_and_act(intake: Intake, message: EmailMessage, mail_from: str, rcpt_tos: list[str],
                   authentication: Verdict) -> route.Decision:
    """Receive *message* over SMTP, then route it with a given sender-authentication verdict and
    carry the decision out as the processor does (its own verdict comes from intake.sender_auth)."""
    smtp_send(intake.running.port, message, mail_from=mail_from, rcpt_tos=rcpt_tos)
    [stored] = inbound.pending(intake.running.engine, 1)
    now = datetime.now(timezone.utc)
    mail = parse(stored.raw)
    incoming = route.Incoming(mail=mail, mail_from=stored.mail_from, rcpt_tos=stored.rcpt_tos,
                              message_key=lookups.message_key(mail, stored), authentication=authentication)
    with write_session(intake.running.engine) as session:
        decision = route.decide(incoming, lookups.ChunkKnown(session, [incoming]),
                                lookups.routing_config(intake.settings))
        if decisions.handling(decision).records_on_ticket(decision):
            work = text_work.read(mail.body_text)
            records.record_on_ticket(session, intake.settings, stored, incoming, decision, now, work.reply_credit)
            maintainer_mail.act_on(session, intake.settings, stored, incoming, decision, now, b"secret", work)
    return decision


@pytest.mark.parametrize("verdict, kind", [
    (Verdict(FAIL, "dmarc=fail header.from=researcher.test", "researcher.test", dmarc_published=True),
     "third-party-reply"),
    (Verdict(NONE, "no signature", "researcher.test", dmarc_published=True), "third-party-reply"),
    (Verdict(PASS, "dmarc=pass header.from=researcher.test", "researcher.test", dmarc_published=True),
     "reporter-reply"),
    (Verdict(FAIL, "dkim=fail", "researcher.test", dmarc_published=False), "reporter-reply"),
    (Verdict(NONE, "DNS timed out", "researcher.test", dmarc_published=None), "reporter-reply"),
])
def test_the_reporter_is_authenticated_where_their_domain_publishes_dmarc(intake, verdict, kind):
    # A spoofed reporter envelope to security+SEC-…@ changed the credit to anonymous.
    intake.waiting()
    tagged = [f"security+{REF1}@example.com"]
    decision = _route_and_act(intake, _reply("keep me anonymous\n"), ALICE, tagged, verdict)
    assert (decision.kind, decision.ticket_id) == (kind, intake.detail().ticket.id)
    if kind == "third-party-reply":
        assert "not authenticated" in decision.reason
        _assert_nothing_changed(intake)
        assert [row.kind for row in intake.mail()][-1] == "third-party-forward"
    else:
        assert (intake.detail().ticket.credit["anonymous"], intake.detail().ticket.state) == (True, "new")


def test_a_maintainer_threading_without_a_reply_address_stays_an_unauthenticated_maintainer_reply(intake):
    result = intake.send(_reply("#close invalid\n", sender=MIA, name="Mia", in_reply_to="<report@researcher.test>"),
                         mail_from=MIA)
    assert result.decisions == {"maintainer-reply": 1}
    assert _assert_nothing_changed(intake, state="new").entries[-1].kind == "maintainer-reply"


def test_a_forged_maintainer_whose_domain_publishes_dmarc_is_a_third_party(intake):
    """A maintainer's address is no more an identity than the reporter's: forged (DMARC published,
    not authenticated), mail threading in is recorded as a third party's, not as Mia's (unforged,
    see the test below, it stays hers)."""
    mia_domain = MIA.rpartition("@")[2]
    forged = Verdict(FAIL, f"dmarc=fail header.from={mia_domain}", mia_domain, dmarc_published=True)
    decision = _route_and_act(intake, _reply("Closing this, send the PoC to me instead.\n", sender=MIA, name="Mia",
                                             in_reply_to="<report@researcher.test>"), MIA, ["security@example.com"],
                              forged)
    assert decision.kind == "third-party-reply" and "a maintainer's address, but not authenticated" in decision.reason
    assert _assert_nothing_changed(intake, state="new").entries[-1].kind == "third-party-reply"


# -- finding 7: forged bounces -------------------------------------------------------------------


def _dsn(returned_headers: str, recipient: str = ALICE, **headers: str) -> bytes:
    extra = "".join(f"{name.replace('_', '-')}: {value}\r\n" for name, value in headers.items())
    return (
        "From: Mail Delivery System <MAILER-DAEMON@mx.researcher.test>\r\n"
        "To: security@example.com\r\n"
        "Subject: Undelivered Mail Returned to Sender\r\n"
        "Message-ID: <dsn-forged@mx.researcher.test>\r\n"
        f"{extra}"
        "Auto-Submitted: auto-replied\r\n"
        "MIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="B"\r\n\r\n'
        "--B\r\nContent-Type: text/plain\r\n\r\nYour message could not be delivered.\r\n"
        "--B\r\nContent-Type: message/delivery-status\r\n\r\n"
        "Reporting-MTA: dns; mx.researcher.test\r\n\r\n"
        f"Final-Recipient: rfc822; {recipient}\r\nAction: failed\r\nStatus: 5.1.1\r\n"
        "--B\r\nContent-Type: text/rfc822-headers\r\n\r\n"
        f"{returned_headers}\r\n"
        "--B--\r\n"
    ).encode()


def _assert_unmatched(intake: Intake) -> None:
    stored = intake.stored()[-1]
    assert (stored.decision, stored.ticket_id) == ("bounce", None)
    assert "unmatched" in stored.reason
    detail = intake.detail()
    assert detail.ticket.reporter_unreachable_at is None
    assert [e.kind for e in detail.events if e.kind in ("bounced", "reporter-unreachable")] == []
    assert [e.kind for e in detail.entries] == ["report", "automatic"]


@pytest.mark.parametrize("forged", [
    # Only our ticket header: a reference is guessable.
    _dsn(f"To: {ALICE}\r\nSubject: Re: [{REF1}] RCE in upload\r\nX-Intake-Ticket: {REF1}"),
    # The reporter's own Message-ID: the sender chose it.
    _dsn(f"Message-ID: <report@researcher.test>\r\nX-Intake-Ticket: {REF1}"),
    _dsn(f"X-Intake-Ticket: {REF1}", In_Reply_To="<report@researcher.test>"),
])
def test_a_forged_bounce_is_recorded_unmatched_and_flags_no_one(intake, forged):
    result = intake.send(forged, mail_from="")
    assert result.decisions == {"bounce": 1}
    _assert_unmatched(intake)


def test_a_null_sender_quoting_the_reporters_message_id_is_unmatched(intake):
    result = intake.send(_reply("whatever", in_reply_to="<report@researcher.test>"), mail_from="")
    assert result.decisions == {"bounce": 1}
    _assert_unmatched(intake)


@pytest.mark.parametrize("where", ["returned headers", "In-Reply-To"])
def test_a_bounce_naming_a_message_id_we_sent_attaches(intake, where):
    ack = _ack_id(intake)
    dsn = _dsn(f"Message-ID: {ack}") if where == "returned headers" else _dsn("Subject: x", In_Reply_To=ack)
    assert intake.send(dsn, mail_from="").decisions == {"bounce": 1}
    detail = intake.detail()
    assert detail.ticket.reporter_unreachable_at is not None
    assert detail.entries[-1].kind == "bounce"
    assert intake.stored()[-1].ticket_id == detail.ticket.id


def test_a_bounce_of_mail_to_a_maintainer_does_not_flag_the_reporter(intake):
    intake.send(_reply("hello", sender="cert@coord.test", in_reply_to=_ack_id(intake)), mail_from="cert@coord.test")
    *_, forward = intake.mail()
    assert forward.recipients == [MIA]
    # Our Message-ID, but the mail went to Mia: whatever Final-Recipient the bounce names.
    assert intake.send(_dsn(f"Message-ID: {forward.message_id}"), mail_from="").decisions == {"bounce": 1}
    detail = intake.detail()
    assert detail.ticket.reporter_unreachable_at is None
    assert [e.detail["message_id"] for e in detail.events if e.kind == "bounced"] == [forward.message_id]


# -- finding 9: non-ASCII in a +tag --------------------------------------------------------------


def _send_smtputf8(intake: Intake, mail_from: str, rcpt: str, body: str) -> processor.BatchResult:
    with smtplib.SMTP("127.0.0.1", intake.running.port, timeout=10) as client:
        assert client.sendmail(mail_from, [rcpt], body.encode(), mail_options=["SMTPUTF8", "BODY=8BITMIME"]) == {}
    return process(intake.settings, intake.running.engine)


@pytest.mark.parametrize("tag", [
    f"{REF1}.ſaaaaaaaaaaaaaaaaaaa",  # LATIN SMALL LETTER LONG S matches [a-z] under IGNORECASE
    f"{REF1}.Kaaaaaaaaaaaaaaaaaa",  # KELVIN SIGN, likewise
    f"{REF1}é",
    f"SEC-{YEAR}-١٢٣٤",  # Arabic-Indic digits match \d
])
def test_a_non_ascii_tag_is_untokened_over_smtputf8(intake, tag):
    # RCPT TO:<security+SEC-…-0001.ſaaa…@…> from a maintainer raised TypeError in hmac.compare_digest.
    rcpt = f"security+{tag}@example.com"
    result = _send_smtputf8(intake, MIA, rcpt, f"From: Mia <{MIA}>\r\nTo: {rcpt}\r\nSubject: note\r\n"
                            "Message-ID: <utf8-tag@example.com>\r\n\r\n#close invalid\r\nGr\u00fc\u00dfe\r\n")
    assert result.failed == []
    # No thread reference but the tag: handled as mail to the plain address.
    assert result.decisions == {"new-ticket": 1}
    stored = intake.stored()[-1]
    assert (stored.status, stored.decision, stored.rcpt_tos) == ("processed", "new-ticket", [rcpt])
    assert intake.detail().ticket.state == "new"  # nothing ran on SEC-…-0001
    assert len(all_tickets(intake.running.engine)) == 2


def test_a_non_ascii_tag_from_the_reporter_does_not_thread_by_tag(intake):
    rcpt = f"security+{REF1}.\u017faaaaaaaaaaaaaaaaaaa@example.com"
    result = _send_smtputf8(intake, ALICE, rcpt, f"From: Alice <{ALICE}>\r\nTo: {rcpt}\r\nSubject: more\r\n"
                            "Message-ID: <utf8-tag-2@researcher.test>\r\n\r\nkeep me anonymous\r\n")
    assert result.failed == [] and result.decisions == {"new-ticket": 1}
    assert intake.detail().ticket.credit["anonymous"] is False
