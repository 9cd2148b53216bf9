"""Routing over real SMTP: threading, replies, bounces, automatic mail, loops and rate limits."""

from __future__ import annotations

import email
import email.policy
import threading
from datetime import datetime, timedelta, timezone
from email.message import EmailMessage

import pytest
from sqlalchemy import select

from conftest import TRUSTED_MX, all_tickets, deliver_outbox, process, report, smtp_send, trusted_results
from intake.send import outbox
from intake.store.db import read_session, write_session
from intake.store.models import InboundMessage, Ticket
from intake.tickets import records
from intake.understand import reply_tokens
from intake.tickets import reads

YEAR = datetime.now(timezone.utc).year
REF1 = f"SEC-{YEAR}-0001"


class Intake:
    """A listener plus helpers to send, process and inspect, with one maintainer configured (who
    gets no new-ticket notices here: the outbox then holds only what goes to researchers)."""

    def __init__(self, make_settings, start_intake_listener, **env: str):  # type: ignore[no-untyped-def]
        self.settings = make_settings(INTAKE_MAINTAINERS='[{"name": "Mia", "email": "mia@example.com"}]',
                                      INTAKE_SCHEDULER__NEW_TICKET_NOTICE="false", **env)
        self.running = start_intake_listener(self.settings)

    def send(self, message: EmailMessage | bytes, mail_from: str = "alice@researcher.test",
             rcpt_tos: list[str] | None = None, now: datetime | None = None):  # type: ignore[no-untyped-def]
        smtp_send(self.running.port, message, mail_from=mail_from, rcpt_tos=rcpt_tos)
        return process(self.settings, self.running.engine, now)

    def detail(self, reference: str = REF1) -> reads.TicketDetail:
        return reads.ticket_detail(self.running.engine, reference)

    def outbox(self) -> list:
        """Mail to researchers (what maintainers are sent is tested elsewhere)."""
        return sorted((r for r in outbox.listing(self.running.engine) if "mia@example.com" not in r.recipients),
                      key=lambda r: r.id)

    def stored(self) -> list[InboundMessage]:
        with read_session(self.running.engine) as session:
            return list(session.scalars(select(InboundMessage).order_by(InboundMessage.id)))


@pytest.fixture
def intake(make_settings, start_intake_listener):
    return Intake(make_settings, start_intake_listener)


def _ack_id(intake, reference: str = REF1) -> str:
    return next(r.message_id for r in intake.outbox() if r.dedupe_key == f"ack:{reference}")


def _reply(subject: str, in_reply_to: str | None = None, sender: str = "alice@researcher.test",
           **headers: str) -> EmailMessage:
    message = report(subject=subject, sender=sender, body="More detail: the PoC works on 2.1 too.\n", **headers)
    if in_reply_to:
        message["In-Reply-To"] = in_reply_to
        message["References"] = in_reply_to
    return message


def test_reply_to_the_acknowledgement_threads_and_is_not_acknowledged_again(intake):
    intake.send(report(subject="RCE in upload"))
    ack = _ack_id(intake)
    result = intake.send(_reply(f"Re: [{REF1}] RCE in upload", in_reply_to=ack))
    assert result.decisions == {"reporter-reply": 1}
    detail = intake.detail()
    reply = detail.entries[-1]
    assert (reply.kind, reply.threaded_by) == ("reporter-reply", f"In-Reply-To {ack}")
    assert "PoC works" in reply.body_text
    assert len(intake.outbox()) == 1  # a follow-up never re-acknowledges
    assert intake.stored()[-1].reason == f"threads by In-Reply-To {ack}"


@pytest.mark.parametrize("prefix", ["Re:", "AW:", "SV:", "Fwd:", "RE: Re:", "Antw:"])
def test_subject_tag_threads_mail_from_the_reporter(intake, prefix):
    intake.send(report(subject="RCE in upload"))
    result = intake.send(_reply(f"{prefix} [{REF1}] RCE in upload"))
    assert result.decisions == {"reporter-reply": 1}
    assert intake.detail().entries[-1].threaded_by == f"subject tag [{REF1}]"


def test_stranger_quoting_a_reference_opens_a_new_ticket_that_mentions_it(intake):
    intake.send(report(subject="RCE in upload"))
    result = intake.send(_reply(f"Re: [{REF1}] RCE in upload", sender="mallory@elsewhere.test"),
                         mail_from="mallory@elsewhere.test")
    assert result.decisions == {"new-ticket": 1}
    first, second = intake.detail(REF1), intake.detail(f"SEC-{YEAR}-0002")
    assert [e.kind for e in first.entries] == ["report", "automatic"]  # nothing written into Alice's report
    assert second.ticket.links == [{"kind": "mentions", "reference": REF1}]
    assert second.ticket.subject == f"[{REF1}] RCE in upload"
    assert "linked" in [e.kind for e in second.events]


def test_plus_tag_threads_from_the_reporter_but_not_from_a_stranger(intake):
    intake.send(report(subject="RCE in upload"))
    tagged = [f"security+{REF1.lower()}@example.com"]
    assert intake.send(_reply("more info"), rcpt_tos=tagged).decisions == {"reporter-reply": 1}
    assert intake.detail().entries[-1].threaded_by == f"+tag {tagged[0]}"
    stranger = intake.send(_reply("more info", sender="eve@elsewhere.test"), mail_from="eve@elsewhere.test",
                           rcpt_tos=tagged)
    assert stranger.decisions == {"new-ticket": 1}


def test_maintainer_mail_with_the_subject_tag_is_a_maintainer_reply(intake):
    intake.send(report(subject="RCE in upload"))
    result = intake.send(_reply(f"[{REF1}] triage notes", sender="mia@example.com"), mail_from="mia@example.com")
    assert result.decisions == {"maintainer-reply": 1}
    assert intake.detail().entries[-1].kind == "maintainer-reply"


def test_third_party_replying_to_our_message_id_threads_as_a_third_party(intake):
    intake.send(report(subject="RCE in upload"))
    # A co-ordinator copied on the thread answers our acknowledgement: recorded, but not the reporter.
    result = intake.send(_reply("Re: RCE in upload", in_reply_to=_ack_id(intake), sender="cert@coord.test"),
                         mail_from="cert@coord.test")
    assert result.decisions == {"third-party-reply": 1}
    assert intake.detail().entries[-1].kind == "third-party-reply"


def test_reporter_reply_reopens_a_ticket_waiting_on_the_reporter(intake):
    intake.send(report(subject="RCE in upload"))
    now = datetime.now(timezone.utc)
    with write_session(intake.running.engine) as session:
        ticket = session.scalars(select(Ticket)).one()
        records.change_state(session, ticket, "waiting", now, actor="mia", why="asked for a PoC")
    intake.send(_reply(f"Re: [{REF1}] RCE in upload"))
    detail = intake.detail()
    assert detail.ticket.state == "new"
    change = [e for e in detail.events if e.kind == "state-changed"][-1]
    assert (change.detail["from"], change.detail["to"], change.actor) == ("waiting", "new", "intake")


def _dsn(original: bytes, recipient: str, status: str = "5.1.1",
         diagnostic: str = "smtp; 550 5.1.1 <alice@researcher.test>: user unknown") -> bytes:
    headers_only = original.split(b"\r\n\r\n", 1)[0].decode("utf-8", "replace")
    return (
        "From: Mail Delivery System <MAILER-DAEMON@mx.researcher.test>\r\n"
        "To: security@example.com\r\n"
        "Subject: Undelivered Mail Returned to Sender\r\n"
        "Message-ID: <dsn-1@mx.researcher.test>\r\n"
        "Auto-Submitted: auto-replied\r\n"
        "MIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="B"\r\n\r\n'
        "--B\r\nContent-Type: text/plain\r\n\r\nYour message could not be delivered.\r\n"
        "--B\r\nContent-Type: message/delivery-status\r\n\r\n"
        "Reporting-MTA: dns; mx.researcher.test\r\n\r\n"
        f"Final-Recipient: rfc822; {recipient}\r\nAction: failed\r\nStatus: {status}\r\n"
        f"Diagnostic-Code: {diagnostic}\r\n"
        "--B\r\nContent-Type: text/rfc822-headers\r\n\r\n"
        f"{headers_only}\r\n"
        "--B--\r\n"
    ).encode()


def test_bounce_of_our_acknowledgement_attaches_and_flags_the_reporter(intake):
    intake.send(report(subject="RCE in upload"))
    [ack] = intake.outbox()
    result = intake.send(_dsn(ack.raw, "alice@researcher.test"), mail_from="")
    assert result.decisions == {"bounce": 1}
    assert len(all_tickets(intake.running.engine)) == 1  # no ticket for the bounce
    assert len(intake.outbox()) == 1  # and no reply to it
    detail = intake.detail()
    bounced = next(e for e in detail.events if e.kind == "bounced")
    assert bounced.detail["summary"] == (
        "acknowledgement to alice@researcher.test bounced: 5.1.1 smtp; 550 5.1.1 <alice@researcher.test>: "
        "user unknown")
    assert detail.ticket.reporter_unreachable_at is not None
    assert "reporter-unreachable" in [e.kind for e in detail.events]
    assert detail.entries[-1].kind == "bounce"


def test_bounce_that_concerns_nothing_of_ours_is_only_logged(intake):
    foreign = report(subject="something we never sent", message_id="<foreign@elsewhere.test>").as_bytes()
    result = intake.send(_dsn(foreign, "bob@elsewhere.test"), mail_from="")
    assert result.decisions == {"bounce": 1}
    assert all_tickets(intake.running.engine) == []
    assert intake.outbox() == []
    assert "concerns no mail of ours" in intake.stored()[-1].reason


def test_out_of_office_threads_into_its_ticket_and_gets_no_reply(intake):
    intake.send(report(subject="RCE in upload"))
    ooo = _reply(f"Automatic reply: [{REF1}] RCE in upload", in_reply_to=_ack_id(intake),
                 Auto_Submitted="auto-replied")
    assert intake.send(ooo).decisions == {"auto-reply": 1}
    assert intake.detail().entries[-1].kind == "auto-reply"
    assert len(intake.outbox()) == 1


def test_out_of_office_without_a_ticket_is_only_logged(intake):
    ooo = report(subject="Out of Office: back on Monday", X_Auto_Response_Suppress="All")
    assert intake.send(ooo).decisions == {"auto-reply": 1}
    assert all_tickets(intake.running.engine) == [] and intake.outbox() == []


@pytest.mark.parametrize("headers, mail_from", [
    ({"X_Intake_Loop": "example.com"}, "alice@researcher.test"),
    ({}, "security@example.com"),
    ({}, "security+sec-2026-0001@example.com"),
])
def test_our_own_mail_coming_back_is_a_loop(intake, headers, mail_from):
    assert intake.send(report(**headers), mail_from=mail_from).decisions == {"loop": 1}
    assert all_tickets(intake.running.engine) == [] and intake.outbox() == []


@pytest.mark.parametrize("headers, mail_from, reason", [
    ({"Precedence": "bulk"}, "alice@researcher.test", "Precedence: bulk"),
    ({"Precedence": "junk"}, "alice@researcher.test", "Precedence: junk"),
    ({"Precedence": "list"}, "alice@researcher.test", "Precedence: list"),
    ({"List_Id": "<sec.lists.example.org>"}, "alice@researcher.test", "list-id"),
    ({"List_Unsubscribe": "<mailto:leave@lists.example.org>"}, "alice@researcher.test", "list-unsubscribe"),
    ({"X_Auto_Response_Suppress": "DR, AutoReply"}, "alice@researcher.test", "X-Auto-Response-Suppress"),
    ({}, "noreply@scanner.test", "robot address"),
    ({}, "no-reply@scanner.test", "robot address"),
    ({}, "MAILER-DAEMON@mx.test", "robot address"),
    ({}, "postmaster@mx.test", "robot address"),
])
def test_reports_that_must_not_be_answered_are_tickets_without_a_reply(intake, headers, mail_from, reason):
    result = intake.send(report(**headers), mail_from=mail_from)
    assert result.decisions == {"new-ticket": 1}  # nothing is silently dropped
    assert intake.outbox() == []
    suppressed = next(e for e in intake.detail().events if e.kind == "acknowledgement-suppressed")
    assert reason.lower() in suppressed.detail["reason"].lower()


def test_upstream_spam_verdict_is_stored_without_a_ticket(intake):
    assert intake.send(report(X_Spam_Flag="YES")).decisions == {"spam": 1}
    assert all_tickets(intake.running.engine) == []
    assert intake.stored()[-1].status == "ignored"


def test_empty_message_is_rejected(intake):
    raw = b"From: alice@researcher.test\r\nTo: security@example.com\r\nMessage-ID: <empty@x.test>\r\n\r\n"
    assert intake.send(raw).decisions == {"rejected": 1}


def test_automatic_mail_to_one_address_is_rate_limited(intake):
    now = datetime.now(timezone.utc)
    for n in range(7):
        intake.send(report(subject=f"finding {n}"), now=now + timedelta(minutes=n))
    assert len(intake.outbox()) == 5  # default: 5 per 24 hours
    limited = next(e for e in intake.detail(f"SEC-{YEAR}-0006").events if e.kind == "acknowledgement-suppressed")
    assert "rate limit" in limited.detail["reason"]
    intake.send(report(subject="a day later"), now=now + timedelta(hours=25))
    assert len(intake.outbox()) == 6


class HostileResponder:
    """A relay stand-in that answers every mail it gets by mailing intake back, RFC 3834 be damned:
    no Auto-Submitted, a fresh Message-ID and a fresh subject each time, no threading headers."""

    def __init__(self, intake_port: int):
        self.intake_port = intake_port
        self.received = 0
        self.lock = threading.Lock()

    async def handle_DATA(self, server, session, envelope):  # type: ignore[no-untyped-def]
        with self.lock:
            self.received += 1
            count = self.received
        answer = report(subject=f"I am away (auto answer {count})", sender="robot@hostile.test",
                        body="I will read your mail when I am back.\n")
        smtp_send(self.intake_port, answer, mail_from="robot@hostile.test")
        return "250 OK"


def test_a_hostile_auto_responder_cannot_make_intake_ping_pong(intake, monkeypatch):
    from aiosmtpd.controller import Controller

    from conftest import free_port
    responder = HostileResponder(intake.running.port)
    port = free_port()
    controller = Controller(responder, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        monkeypatch.setenv("INTAKE_OUTBOUND__TRANSPORT", "smtp")
        monkeypatch.setenv("INTAKE_OUTBOUND__RELAY", f"127.0.0.1:{port}")
        from intake.config.settings import load_settings
        settings = load_settings(intake.settings.config_path)
        intake.send(report(subject="first contact", sender="robot@hostile.test"), mail_from="robot@hostile.test")
        rounds = 0
        while rounds < 30:  # bounded: the exchange must die out long before this
            rounds += 1
            sent = deliver_outbox(settings, intake.running.engine).get("sent", 0)
            process(settings, intake.running.engine)
            if sent == 0:
                break
    finally:
        controller.stop()
    assert rounds < 30
    assert responder.received == 5  # the rate limit, then silence
    assert len(all_tickets(intake.running.engine)) == 6  # every message is still a ticket


def test_show_displays_decisions_and_threading(intake):
    from click.testing import CliRunner

    from intake.cli.app import main
    intake.send(report(subject="RCE in upload"))
    intake.send(_reply(f"Re: [{REF1}] RCE in upload", in_reply_to=_ack_id(intake)))
    result = CliRunner().invoke(main, ["--config", str(intake.settings.config_path), "show", REF1])
    assert result.exit_code == 0, result.output
    assert "reporter-reply" in result.output
    assert f"In-Reply-To {_ack_id(intake)}" in result.output
    assert "decision new-ticket" in result.output


BEG_BOUNTY = ("Hi team,\n\nI found a critical vulnerability in your website: missing DMARC record, so "
              "attackers can spoof emails from your domain.\n\nDo you offer a bug bounty? What is the reward?\n")


def test_low_quality_report_is_labelled_and_gets_the_out_of_scope_reply(intake):
    # The default policy (vaixus) answers low-quality reports with the polite out-of-scope reply.
    intake.send(report(subject="Critical vulnerability found", body=BEG_BOUNTY, sender="beg@bounty.test"),
                mail_from="beg@bounty.test")
    detail = intake.detail()
    assert detail.ticket.labels == ["low-quality"]
    assert detail.ticket.quality["low_quality"] is True
    assert "missing-email-auth" in detail.ticket.quality["matched"]
    assert "bounty-ask" in detail.ticket.quality["matched"]
    [reply] = intake.outbox()
    assert (reply.kind, reply.dedupe_key) == ("out-of-scope", f"out-of-scope:{REF1}")
    text = email.message_from_bytes(reply.raw, policy=email.policy.default).get_content()
    assert REF1 in text and ('outside the scope of our security policy, "Vaixus Technologies Security Policy (June 2026)", or'
                              in " ".join(text.split()))
    assert "labelled" in [e.kind for e in detail.events]


def test_low_quality_under_a_policy_that_acknowledges_gets_the_normal_acknowledgement(make_settings,
                                                                                     start_intake_listener):
    settings = make_settings(INTAKE_INTAKE__DEFAULT_POLICY="vectis-mail")
    running = start_intake_listener(settings)
    smtp_send(running.port, report(subject="Critical vulnerability found", body=BEG_BOUNTY,
                                   sender="beg@bounty.test"), mail_from="beg@bounty.test")
    process(settings, running.engine)
    [ticket] = all_tickets(running.engine)
    assert ticket.labels == ["low-quality"]
    assert [r.kind for r in outbox.listing(running.engine)] == ["acknowledgement"]


def test_genuine_report_is_not_low_quality(intake):
    body = ("Summary: stored XSS in the comment form.\n\nSteps to reproduce:\n1. Log in as any user.\n"
            "2. POST a comment containing <script>alert(document.domain)</script> to /api/comments\n"
            "3. Open /posts/42 as another user: the script runs.\n\nImpact: session theft.\n")
    intake.send(report(subject="Stored XSS in comments", body=body))
    detail = intake.detail()
    assert detail.ticket.labels == []
    assert detail.ticket.quality["low_quality"] is False
    assert [r.kind for r in intake.outbox()] == ["acknowledgement"]


PGP_BLOCK = ("-----BEGIN PGP MESSAGE-----\n\nhQEMA5pGz0yqHk2VAQf/YxkZ3ZmJjYWJjZGVmZ2hpamtsbW5vcHFyc3R1dnd4eXo=\n"
             "=abcd\n-----END PGP MESSAGE-----\n")


def test_inline_pgp_report_is_flagged_with_its_ciphertext_intact(intake):
    intake.send(report(subject="encrypted report", body=PGP_BLOCK))
    [entry] = [e for e in intake.detail().entries if e.kind == "report"]
    assert entry.encrypted == "inline-pgp"
    assert PGP_BLOCK.strip() in entry.body_text


def test_pgp_mime_report_is_flagged_and_kept(intake):
    raw = ("From: alice@researcher.test\r\nTo: security@example.com\r\nSubject: encrypted\r\n"
           "Message-ID: <pgpmime@researcher.test>\r\nMIME-Version: 1.0\r\n"
           'Content-Type: multipart/encrypted; protocol="application/pgp-encrypted"; boundary="E"\r\n\r\n'
           "--E\r\nContent-Type: application/pgp-encrypted\r\n\r\nVersion: 1\r\n"
           '--E\r\nContent-Type: application/octet-stream; name="encrypted.asc"\r\n\r\n'
           + PGP_BLOCK.replace("\n", "\r\n") + "--E--\r\n").encode()
    assert intake.send(raw).decisions == {"new-ticket": 1}
    [entry] = [e for e in intake.detail().entries if e.kind == "report"]
    assert entry.encrypted == "pgp-mime"
    assert "-----BEGIN PGP MESSAGE-----" in entry.body_text
    from click.testing import CliRunner

    from intake.cli.app import main
    shown = CliRunner().invoke(main, ["--config", str(intake.settings.config_path), "show", REF1]).output
    assert "encrypted (pgp-mime)" in shown


def test_one_mail_to_several_intake_addresses_is_one_ticket(make_settings, start_intake_listener):
    settings = make_settings(INTAKE_SMTP__ADDRESSES='["security@example.com", "psirt@example.com"]')
    running = start_intake_listener(settings)
    message = report(message_id="<both@researcher.test>")
    # One transaction to both addresses, then the same mail again via the other address's MX.
    smtp_send(running.port, message, rcpt_tos=["security@example.com", "psirt@example.com"])
    smtp_send(running.port, message, rcpt_tos=["psirt@example.com"])
    result = process(settings, running.engine)
    assert result.decisions == {"new-ticket": 1, "duplicate": 1}
    assert len(all_tickets(running.engine)) == 1
    assert len(outbox.listing(running.engine)) == 1


# -- Threading order: when two routes disagree, which wins ------------------------------------------
# +tag (or a signed reply address) → In-Reply-To → References → subject tag; a guessable reference
# (+tag, subject tag) counts only for the ticket's reporter or a maintainer.

REF2 = f"SEC-{YEAR}-0002"


def _two_tickets(intake) -> tuple[str, str]:  # type: ignore[no-untyped-def]
    """Alice reports twice; the Message-IDs of our two acknowledgements."""
    intake.send(report(subject="RCE in upload"))
    intake.send(report(subject="SSRF in webhooks"))
    return _ack_id(intake, REF1), _ack_id(intake, REF2)


def _kinds(intake, reference: str) -> list[str]:  # type: ignore[no-untyped-def]
    return [e.kind for e in intake.detail(reference).entries]


def _last_decision(intake) -> tuple[str, int | None]:  # type: ignore[no-untyped-def]
    last = intake.stored()[-1]
    return last.decision, last.ticket_id


def test_plus_tag_wins_over_in_reply_to(intake):
    _, ack2 = _two_tickets(intake)
    tagged = f"security+{REF1}@example.com"
    result = intake.send(_reply("Re: more detail", in_reply_to=ack2), rcpt_tos=[tagged])
    assert result.decisions == {"reporter-reply": 1}
    assert intake.detail(REF1).entries[-1].threaded_by == f"+tag {tagged}"
    assert "reporter-reply" not in _kinds(intake, REF2)


def test_plus_tag_wins_over_references(intake):
    _, ack2 = _two_tickets(intake)
    tagged = f"security+{REF1}@example.com"
    intake.send(_reply("Re: more detail", References=ack2), rcpt_tos=[tagged])
    assert intake.detail(REF1).entries[-1].threaded_by == f"+tag {tagged}"
    assert "reporter-reply" not in _kinds(intake, REF2)


def test_plus_tag_wins_over_the_subject_tag(intake):
    _two_tickets(intake)
    tagged = f"security+{REF1}@example.com"
    intake.send(_reply(f"Re: [{REF2}] SSRF in webhooks"), rcpt_tos=[tagged])
    assert intake.detail(REF1).entries[-1].threaded_by == f"+tag {tagged}"
    assert "reporter-reply" not in _kinds(intake, REF2)


def test_in_reply_to_wins_over_references(intake):
    ack1, ack2 = _two_tickets(intake)
    intake.send(_reply("Re: more detail", In_Reply_To=ack1, References=ack2))
    assert intake.detail(REF1).entries[-1].threaded_by == f"In-Reply-To {ack1}"
    assert "reporter-reply" not in _kinds(intake, REF2)


def test_references_thread_when_in_reply_to_names_nothing_we_know(intake):
    _, ack2 = _two_tickets(intake)
    intake.send(_reply("Re: more detail", In_Reply_To="<unknown@elsewhere.test>", References=ack2))
    assert intake.detail(REF2).entries[-1].threaded_by == f"References {ack2}"


def test_in_reply_to_wins_over_the_subject_tag(intake):
    ack1, _ = _two_tickets(intake)
    intake.send(_reply(f"Re: [{REF2}] SSRF in webhooks", in_reply_to=ack1))
    assert intake.detail(REF1).entries[-1].threaded_by == f"In-Reply-To {ack1}"
    assert "reporter-reply" not in _kinds(intake, REF2)


def test_a_maintainers_plus_tag_wins_over_in_reply_to(intake):
    _, ack2 = _two_tickets(intake)
    tagged = f"security+{REF1}@example.com"
    result = intake.send(_reply("triage notes", in_reply_to=ack2, sender="mia@example.com"),
                         mail_from="mia@example.com", rcpt_tos=[tagged])
    assert result.decisions == {"maintainer-reply": 1}
    assert intake.detail(REF1).entries[-1].threaded_by == f"+tag {tagged}"


def test_a_strangers_plus_tag_is_no_evidence_so_in_reply_to_decides(intake):
    # Anyone can guess a reference, but only those in the thread have our Message-ID: the stranger's
    # +tag is ignored, and their mail threads by In-Reply-To, as a third party's, into the other ticket.
    _, ack2 = _two_tickets(intake)
    result = intake.send(_reply("Re: SSRF", in_reply_to=ack2, sender="cert@coord.test"),
                         mail_from="cert@coord.test", rcpt_tos=[f"security+{REF1}@example.com"])
    assert result.decisions == {"third-party-reply": 1}
    assert intake.detail(REF2).entries[-1].threaded_by == f"In-Reply-To {ack2}"
    assert _kinds(intake, REF1) == ["report", "automatic"]


@pytest.fixture
def trusting_intake(make_settings, start_intake_listener):
    """As ``intake``, believing our MX's Authentication-Results (mia's mail can be authenticated)."""
    return Intake(make_settings, start_intake_listener,
                  INTAKE_SENDER_AUTH__TRUSTED_AUTHSERV_IDS=f'["{TRUSTED_MX}"]', INTAKE_SENDER_AUTH__VERIFY="false")


@pytest.mark.parametrize("authenticated", [True, False])
def test_a_reply_address_wins_over_in_reply_to(trusting_intake, authenticated):
    intake = trusting_intake
    _, ack2 = _two_tickets(intake)
    secret = reply_tokens.secret(intake.running.engine)
    address = reply_tokens.reply_address(secret, "security@example.com", REF1, "mia@example.com",
                                         datetime.now(timezone.utc))
    headers = {"Authentication_Results": trusted_results("example.com")} if authenticated else {}
    intake.send(_reply("Re: SSRF", in_reply_to=ack2, sender="mia@example.com", **headers),
                mail_from="mia@example.com", rcpt_tos=[address])
    if authenticated:
        assert _last_decision(intake) == ("maintainer-reply", intake.detail(REF1).ticket.id)
        [entry] = [e for e in intake.detail(REF1).entries if e.kind == "maintainer-reply"]
        assert entry.threaded_by == f"reply address {address}"
    else:  # refused, and a refusal threads nowhere: not into the ticket its In-Reply-To names either
        assert _last_decision(intake) == ("rejected", None)
    assert "maintainer-reply" not in _kinds(intake, REF2)


def test_a_bounce_is_matched_by_our_message_id_not_by_its_plus_tag(intake):
    _two_tickets(intake)
    ack2 = next(r for r in intake.outbox() if r.dedupe_key == f"ack:{REF2}")
    intake.send(_dsn(ack2.raw, "alice@researcher.test"), mail_from="",
                rcpt_tos=[f"security+{REF1}@example.com"])
    assert _last_decision(intake) == ("bounce", intake.detail(REF2).ticket.id)
    assert intake.detail(REF1).ticket.reporter_unreachable_at is None


def test_a_bare_null_sender_is_a_bounce_not_a_reply(intake):
    _, ack2 = _two_tickets(intake)
    intake.send(_reply("Re: RCE in upload", in_reply_to=ack2), mail_from="",
                rcpt_tos=[f"security+{REF1}@example.com"])
    assert _last_decision(intake) == ("bounce", intake.detail(REF2).ticket.id)
    assert _kinds(intake, REF1) == ["report", "automatic"]


def test_a_duplicate_stays_a_duplicate_wherever_it_would_thread(intake):
    ack1, _ = _two_tickets(intake)
    again = _reply("Re: RCE in upload", in_reply_to=ack1, message_id="<followup@researcher.test>")
    assert intake.send(again).decisions == {"reporter-reply": 1}
    # The same message again, now sent to the other ticket's +tag: still the one message already stored.
    resent = intake.send(again, rcpt_tos=[f"security+{REF2}@example.com"])
    assert resent.decisions == {"duplicate": 1}
    assert _kinds(intake, REF1).count("reporter-reply") == 1 and "reporter-reply" not in _kinds(intake, REF2)


def test_an_auto_reply_is_recorded_where_the_threading_order_puts_it(intake):
    _, ack2 = _two_tickets(intake)
    tagged = f"security+{REF1}@example.com"
    ooo = _reply("Automatic reply: SSRF in webhooks", in_reply_to=ack2, Auto_Submitted="auto-replied")
    assert intake.send(ooo, rcpt_tos=[tagged]).decisions == {"auto-reply": 1}
    assert (intake.detail(REF1).entries[-1].kind, intake.detail(REF1).entries[-1].threaded_by) == (
        "auto-reply", f"+tag {tagged}")
    assert len(intake.outbox()) == 2  # the two acknowledgements: an automatic reply is never answered


@pytest.mark.parametrize("headers, decision", [
    ({"X_Intake_Loop": "example.com"}, "loop"),
    ({"X_Spam_Flag": "YES"}, "spam"),
])
def test_loop_and_spam_are_decided_before_threading(intake, headers, decision):
    ack1, _ = _two_tickets(intake)
    result = intake.send(_reply(f"Re: [{REF1}] RCE in upload", in_reply_to=ack1, **headers),
                         rcpt_tos=[f"security+{REF1}@example.com"])
    assert result.decisions == {decision: 1}
    assert _kinds(intake, REF1) == ["report", "automatic"]


def test_an_empty_reply_is_rejected_before_threading(intake):
    ack1, _ = _two_tickets(intake)
    raw = (f"From: alice@researcher.test\r\nTo: security@example.com\r\nMessage-ID: <empty@x.test>\r\n"
           f"In-Reply-To: {ack1}\r\n\r\n").encode()
    assert intake.send(raw, rcpt_tos=[f"security+{REF1}@example.com"]).decisions == {"rejected": 1}
    assert _kinds(intake, REF1) == ["report", "automatic"]
