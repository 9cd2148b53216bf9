"""Each routing rule on its own, and decide()'s order, with an in-memory :class:`route.Known`: no
database, no SMTP (the same rules end to end are in test_routing.py). Every rule in ``route.RULES``
has a case where it decides and one where it passes; then, for each pair of rules that could
disagree about one message, which wins."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from email.message import EmailMessage

import pytest

from intake.understand import reply_tokens, route
from intake.understand.parse import parse
from intake.understand.route import Incoming, KnownMessage, RoutingConfig, TicketRef
from intake.understand.sender_auth import NONE, PASS, Verdict
from intake.vocabulary import (
    AUTO_REPLY, BOUNCE, DUPLICATE, LOOP, LOOP_HEADER, MAINTAINER_REPLY, NEW_TICKET, REJECTED, REPORTER_REPLY, SPAM,
    THIRD_PARTY_REPLY,
)

NOW = datetime(2026, 12, 3, 12, 0, tzinfo=timezone.utc)
SECRET = b"s" * 32
INTAKE = "security@example.com"
ALICE, BOB, MIA, EVE = "alice@researcher.test", "bob@researcher.test", "mia@example.com", "eve@elsewhere.test"

A = TicketRef(1, "SEC-2026-0001", ALICE)
B = TicketRef(2, "SEC-2026-0002", ALICE)
C = TicketRef(3, "SEC-2026-0003", BOB)
ACK_A, ACK_B = "<ack.a@example.com>", "<ack.b@example.com>"  # our acknowledgements: we sent them
REPORT_C = "<report-c@researcher.test>"  # Bob's report: we stored it, we did not send it

TAG_A = f"security+{A.reference}@example.com"
TAG_B = f"security+{B.reference}@example.com"
AUTHENTICATED = Verdict(PASS, "dmarc=pass header.from=example.com (by mx.example.com)", "example.com", True)


@dataclass
class FakeKnown:
    """route.Known in memory: three tickets, the two acknowledgements we sent and Bob's report."""

    tickets: dict[str, TicketRef] = field(default_factory=lambda: {t.reference: t for t in (A, B, C)})
    messages: dict[str, KnownMessage] = field(default_factory=lambda: {
        ACK_A: KnownMessage(A, ACK_A, "acknowledgement", sent=True),
        ACK_B: KnownMessage(B, ACK_B, "acknowledgement", sent=True),
        REPORT_C: KnownMessage(C, REPORT_C, "report"),
    })
    message_keys: dict[str, int] = field(default_factory=dict)

    def ticket_for_message_key(self, message_key: str) -> int | None:
        return self.message_keys.get(message_key)

    def ticket_by_reference(self, reference: str) -> TicketRef | None:
        return self.tickets.get(reference.upper())

    def message_by_ids(self, message_ids: list[str], sent_only: bool = False) -> KnownMessage | None:
        found = (self.messages.get(m) for m in message_ids)
        return next((m for m in found if m is not None and (m.sent or not sent_only)), None)


CONFIG = RoutingConfig(
    our_addresses=frozenset({INTAKE}), loop_marker="intake.example.com", reference_prefix="SEC",
    is_maintainer=lambda address: address.lower() == MIA,
    never_answered=lambda address: address.lower().startswith("noreply@"),
    check_reply_token=lambda reference, token: reply_tokens.check(SECRET, reference, token, [MIA], NOW,
                                                                  timedelta(days=90)),
)
REPLY_ADDRESS_A = reply_tokens.reply_address(SECRET, INTAKE, A.reference, MIA, NOW)


def mail(subject: str = "more detail", sender: str = ALICE, mail_from: str | None = None,
         to: tuple[str, ...] = (INTAKE,), body: str = "The PoC works on 2.1 too.\n", key: str = "key-1",
         authentication: Verdict = Verdict(NONE, "not checked"), **headers: str) -> Incoming:
    """An incoming message; headers given as In_Reply_To="..." (underscores become dashes)."""
    message = EmailMessage()
    message["From"] = sender
    message["To"] = INTAKE
    if subject:
        message["Subject"] = subject
    message["Message-ID"] = "<m-1@researcher.test>"
    for name, value in headers.items():
        message[name.replace("_", "-")] = value
    if body:
        message.set_content(body)
    return incoming_of(message.as_bytes(), sender if mail_from is None else mail_from, to, key, authentication)


def incoming_of(raw: bytes, mail_from: str, to: tuple[str, ...] = (INTAKE,), key: str = "key-1",
                authentication: Verdict = Verdict(NONE, "not checked")) -> Incoming:
    return Incoming(mail=parse(raw), mail_from=mail_from, rcpt_tos=list(to), message_key=key,
                    authentication=authentication)


def dsn(returned_message_id: str, to: tuple[str, ...] = (INTAKE,)) -> Incoming:
    """A delivery status notification returning the headers of the message *returned_message_id*."""
    raw = (
        "From: MAILER-DAEMON@mx.researcher.test\r\nTo: security@example.com\r\n"
        "Subject: Undelivered Mail Returned to Sender\r\nMessage-ID: <dsn-1@mx.researcher.test>\r\n"
        'MIME-Version: 1.0\r\nContent-Type: multipart/report; report-type=delivery-status; boundary="B"\r\n\r\n'
        "--B\r\nContent-Type: text/plain\r\n\r\nYour message could not be delivered.\r\n"
        "--B\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx.researcher.test\r\n\r\n"
        "Final-Recipient: rfc822; alice@researcher.test\r\nAction: failed\r\nStatus: 5.1.1\r\n"
        "--B\r\nContent-Type: text/rfc822-headers\r\n\r\n"
        f"From: security@example.com\r\nTo: alice@researcher.test\r\nMessage-ID: {returned_message_id}\r\n"
        "--B--\r\n"
    ).encode()
    return incoming_of(raw, "", to)


def run(rule: route.Rule, incoming: Incoming, known: FakeKnown | None = None) -> route.Decision | None:
    return rule(incoming, known or FakeKnown(), CONFIG)


# -- each rule alone: decides, and passes ----------------------------------------------------------


def test_duplicate_decides_on_a_message_key_already_stored_and_passes_otherwise():
    known = FakeKnown(message_keys={"key-1": A.id})
    decision = run(route.duplicate, mail(), known)
    assert decision is not None and (decision.kind, decision.ticket_id) == (DUPLICATE, A.id)
    assert run(route.duplicate, mail(key="key-2"), known) is None


@pytest.mark.parametrize("incoming", [
    mail(**{LOOP_HEADER.replace("-", "_"): "intake.example.com"}),
    mail(sender=INTAKE),  # From: claims to be us
    mail(mail_from="security+SEC-2026-0001@example.com"),  # so does the envelope, +tag or not
])
def test_loop_decides_on_our_marker_or_our_own_address(incoming):
    assert run(route.loop, incoming).kind == LOOP


def test_loop_passes_on_someone_elses_marker():
    assert run(route.loop, mail(**{LOOP_HEADER.replace("-", "_"): "other.example.org"})) is None


def test_bounce_attaches_only_when_it_names_a_message_id_we_sent():
    matched = run(route.bounce, dsn(ACK_B))
    assert (matched.kind, matched.ticket_id, matched.bounced.message_id) == (BOUNCE, B.id, ACK_B)
    for returned in (REPORT_C, "<unknown@elsewhere.test>"):  # stored but not sent by us, or unknown
        unmatched = run(route.bounce, dsn(returned))
        assert (unmatched.kind, unmatched.ticket_id) == (BOUNCE, None) and "unmatched" in unmatched.reason


def test_bounce_passes_on_ordinary_mail():
    assert run(route.bounce, mail(In_Reply_To=ACK_A)) is None


def test_auto_reply_decides_and_threads_where_a_reply_would():
    threaded = run(route.auto_reply, mail(In_Reply_To=ACK_A, Auto_Submitted="auto-replied"))
    assert (threaded.kind, threaded.ticket_id, threaded.threaded_by) == (AUTO_REPLY, A.id, f"In-Reply-To {ACK_A}")
    alone = run(route.auto_reply, mail(subject="Out of Office: back on Monday"))
    assert (alone.kind, alone.ticket_id) == (AUTO_REPLY, None)


def test_auto_reply_passes_on_mail_written_by_a_person():
    assert run(route.auto_reply, mail(In_Reply_To=ACK_A, Auto_Submitted="no")) is None


def test_bare_null_sender_is_a_bounce_attached_by_a_message_id_we_sent():
    matched = run(route.bare_null_sender, mail(mail_from="", In_Reply_To=ACK_B))
    assert (matched.kind, matched.ticket_id) == (BOUNCE, B.id)
    unmatched = run(route.bare_null_sender, mail(mail_from="", In_Reply_To=REPORT_C))
    assert (unmatched.kind, unmatched.ticket_id) == (BOUNCE, None)


def test_bare_null_sender_passes_when_there_is_an_envelope_sender():
    assert run(route.bare_null_sender, mail(In_Reply_To=ACK_B)) is None


def test_spam_decides_on_an_upstream_flag_and_passes_without_one():
    assert run(route.spam, mail(X_Spam_Flag="YES")).kind == SPAM
    assert run(route.spam, mail(X_Spam_Flag="NO")) is None


def test_empty_decides_on_nothing_at_all_and_passes_on_a_subject_alone():
    assert run(route.empty, mail(subject="", body="")).kind == REJECTED
    assert run(route.empty, mail(subject="see attached", body="")) is None


def test_reply_address_decides_for_its_maintainer_authenticated_or_refused():
    privileged = run(route.reply_address, mail(sender=MIA, to=(REPLY_ADDRESS_A,), authentication=AUTHENTICATED))
    assert (privileged.kind, privileged.ticket_id, privileged.authenticated) == (MAINTAINER_REPLY, A.id, True)
    refused = run(route.reply_address, mail(sender=MIA, to=(REPLY_ADDRESS_A,)))
    assert (refused.kind, refused.ticket_id, refused.refused) == (REJECTED, None, route.RefusedReplyAddress(A, MIA))
    stranger = run(route.reply_address, mail(sender=EVE, to=(REPLY_ADDRESS_A,), authentication=AUTHENTICATED))
    assert (stranger.kind, stranger.ticket_id, stranger.refused) == (REJECTED, None, None)


def test_reply_address_passes_on_a_plain_plus_tag():
    assert run(route.reply_address, mail(sender=MIA, to=(TAG_A,), authentication=AUTHENTICATED)) is None


@pytest.mark.parametrize("sender, kind", [(ALICE, REPORTER_REPLY), (MIA, MAINTAINER_REPLY)])
def test_thread_by_plus_tag_decides_for_the_reporter_and_a_maintainer(sender, kind):
    decision = run(route.thread_by_plus_tag, mail(sender=sender, to=(TAG_A,)))
    assert (decision.kind, decision.ticket_id, decision.threaded_by) == (kind, A.id, f"+tag {TAG_A}")


def test_thread_by_plus_tag_from_the_reporters_envelope_but_another_from_is_a_third_party():
    decision = run(route.thread_by_plus_tag, mail(sender=EVE, mail_from=ALICE, to=(TAG_A,)))
    assert (decision.kind, decision.ticket_id) == (THIRD_PARTY_REPLY, A.id)


@pytest.mark.parametrize("incoming", [
    mail(sender=EVE, to=(TAG_A,)),  # a stranger: a guessed reference is no evidence
    mail(to=("security+SEC-2026-0099@example.com",)),  # no such ticket
    mail(to=("security+SEC-2026-\u0661\u0662\u0663\u0664@example.com",)),  # not ASCII: no tag
    mail(subject=f"Re: [{A.reference}]"),  # no +tag at all (the subject is another rule's)
])
def test_thread_by_plus_tag_passes(incoming):
    assert run(route.thread_by_plus_tag, incoming) is None


@pytest.mark.parametrize("sender, kind", [(ALICE, REPORTER_REPLY), (MIA, MAINTAINER_REPLY), (EVE, THIRD_PARTY_REPLY)])
def test_thread_by_message_id_decides_whoever_sends_it(sender, kind):
    decision = run(route.thread_by_message_id, mail(sender=sender, In_Reply_To=ACK_A))
    assert (decision.kind, decision.ticket_id, decision.threaded_by) == (kind, A.id, f"In-Reply-To {ACK_A}")


def test_thread_by_message_id_uses_references_when_in_reply_to_is_unknown():
    decision = run(route.thread_by_message_id, mail(In_Reply_To="<x@elsewhere.test>", References=f"{ACK_A} {ACK_B}"))
    assert (decision.ticket_id, decision.threaded_by) == (B.id, f"References {ACK_B}")  # the latest first


def test_thread_by_message_id_passes_on_message_ids_we_never_saw():
    assert run(route.thread_by_message_id, mail(In_Reply_To="<x@elsewhere.test>", References="<y@e.test>")) is None
    assert run(route.thread_by_message_id, mail()) is None


@pytest.mark.parametrize("sender, kind", [(ALICE, REPORTER_REPLY), (MIA, MAINTAINER_REPLY)])
def test_thread_by_subject_tag_decides_for_the_reporter_and_a_maintainer(sender, kind):
    decision = run(route.thread_by_subject_tag, mail(subject=f"AW: [{A.reference}] RCE", sender=sender))
    assert (decision.kind, decision.ticket_id, decision.threaded_by) == (kind, A.id, f"subject tag [{A.reference}]")


@pytest.mark.parametrize("incoming", [
    mail(subject=f"Re: [{A.reference}] RCE", sender=EVE),  # a stranger
    mail(subject="Re: [SEC-2026-0099] RCE"),  # no such ticket
    mail(subject="Re: RCE"),
])
def test_thread_by_subject_tag_passes(incoming):
    assert run(route.thread_by_subject_tag, incoming) is None


def test_the_rules_run_in_the_declared_order():
    assert route.THREADING == (route.thread_by_plus_tag, route.thread_by_message_id, route.thread_by_subject_tag)
    assert route.RULES == (route.duplicate, route.loop, route.bounce, route.auto_reply, route.bare_null_sender,
                           route.spam, route.empty, route.reply_address, *route.THREADING)


def test_decide_takes_the_first_rule_that_decides():
    calls: list[str] = []

    def passes(incoming, known, config):  # type: ignore[no-untyped-def]
        calls.append("passes")

    def decides(kind):  # type: ignore[no-untyped-def]
        def rule(incoming, known, config):  # type: ignore[no-untyped-def]
            calls.append(kind)
            return route.Decision(kind, "test")
        return rule

    decision = route.decide(mail(), FakeKnown(), CONFIG, rules=(passes, decides(SPAM), decides(LOOP)))
    assert decision.kind == SPAM and calls == ["passes", SPAM]  # the later rule is never asked


def test_decide_falls_back_to_a_new_ticket_that_mentions_what_it_quoted():
    decision = route.decide(mail(subject=f"Re: [{A.reference}] and [SEC-2026-0099]", sender=EVE, to=(TAG_B,)),
                            FakeKnown(), CONFIG)
    assert (decision.kind, decision.ticket_id, decision.mentions) == (NEW_TICKET, None, (A.reference, B.reference))


# -- pairs of rules that could disagree: which wins, and why ---------------------------------------

PAIRS = [
    # (what disagrees, message, decision, ticket, threaded_by): read as "the first named wins" unless noted.
    ("+tag vs In-Reply-To", mail(to=(TAG_A,), In_Reply_To=ACK_B),
     REPORTER_REPLY, A, f"+tag {TAG_A}"),
    ("+tag vs References", mail(to=(TAG_A,), References=ACK_B),
     REPORTER_REPLY, A, f"+tag {TAG_A}"),
    ("+tag vs subject tag", mail(to=(TAG_A,), subject=f"Re: [{B.reference}]"),
     REPORTER_REPLY, A, f"+tag {TAG_A}"),
    ("maintainer's +tag vs In-Reply-To", mail(sender=MIA, to=(TAG_A,), In_Reply_To=ACK_B),
     MAINTAINER_REPLY, A, f"+tag {TAG_A}"),
    # A stranger's +tag is no evidence (a reference is guessable): the Message-ID decides.
    ("stranger's +tag loses to In-Reply-To", mail(sender=EVE, to=(TAG_A,), In_Reply_To=ACK_B),
     THIRD_PARTY_REPLY, B, f"In-Reply-To {ACK_B}"),
    # Bob may not write into A by reference, but may into his own C by its subject tag.
    ("stranger's +tag loses to his own subject tag", mail(sender=BOB, to=(TAG_A,), subject=f"Re: [{C.reference}]"),
     REPORTER_REPLY, C, f"subject tag [{C.reference}]"),
    ("In-Reply-To vs References", mail(In_Reply_To=ACK_A, References=ACK_B),
     REPORTER_REPLY, A, f"In-Reply-To {ACK_A}"),
    ("In-Reply-To vs subject tag", mail(In_Reply_To=ACK_A, subject=f"Re: [{B.reference}]"),
     REPORTER_REPLY, A, f"In-Reply-To {ACK_A}"),
    ("References vs subject tag", mail(References=ACK_A, subject=f"Re: [{B.reference}]"),
     REPORTER_REPLY, A, f"References {ACK_A}"),
    # A stranger's subject tag is no evidence either; the Message-ID threads them as a third party.
    ("In-Reply-To vs stranger's subject tag", mail(sender=EVE, In_Reply_To=ACK_A, subject=f"Re: [{B.reference}]"),
     THIRD_PARTY_REPLY, A, f"In-Reply-To {ACK_A}"),
    ("reply address vs In-Reply-To", mail(sender=MIA, to=(REPLY_ADDRESS_A,), In_Reply_To=ACK_B,
                                          authentication=AUTHENTICATED),
     MAINTAINER_REPLY, A, f"reply address {REPLY_ADDRESS_A}"),
    # A refused reply address threads nowhere: not by the In-Reply-To it also carries.
    ("refused reply address vs In-Reply-To", mail(sender=MIA, to=(REPLY_ADDRESS_A,), In_Reply_To=ACK_B),
     REJECTED, None, None),
    ("reply address vs +tag", mail(sender=MIA, to=(TAG_B, REPLY_ADDRESS_A), authentication=AUTHENTICATED),
     MAINTAINER_REPLY, A, f"reply address {REPLY_ADDRESS_A}"),
    # Anyone can write a DSN: it attaches by a Message-ID we sent, never by a +tag.
    ("bounce vs +tag", dsn(ACK_B, to=(TAG_A,)), BOUNCE, B, f"bounced {ACK_B}"),
    ("bare null sender vs +tag", mail(mail_from="", to=(TAG_A,), In_Reply_To=ACK_B),
     BOUNCE, B, f"In-Reply-To {ACK_B}"),
    # Automatic mail is never a reply, but it is recorded where the threading order puts it.
    ("auto-reply vs threading", mail(to=(TAG_A,), In_Reply_To=ACK_B, Auto_Submitted="auto-replied"),
     AUTO_REPLY, A, f"+tag {TAG_A}"),
    ("loop vs threading", mail(to=(TAG_A,), In_Reply_To=ACK_A, **{LOOP_HEADER.replace("-", "_"): "intake.example.com"}),
     LOOP, None, None),
    ("spam vs threading", mail(to=(TAG_A,), In_Reply_To=ACK_A, X_Spam_Flag="YES"), SPAM, None, None),
    ("empty vs threading", mail(to=(TAG_A,), In_Reply_To=ACK_A, subject="", body=""), REJECTED, None, None),
]


@pytest.mark.parametrize("incoming, kind, ticket, threaded_by", [p[1:] for p in PAIRS], ids=[p[0] for p in PAIRS])
def test_which_rule_wins(incoming, kind, ticket, threaded_by):
    decision = route.decide(incoming, FakeKnown(), CONFIG)
    assert (decision.kind, decision.ticket_id, decision.threaded_by) == (kind, ticket and ticket.id, threaded_by)


def test_a_duplicate_wins_over_threading():
    # The second copy of a reply is the one message already stored, wherever it would thread now.
    known = FakeKnown(message_keys={"key-1": A.id})
    decision = route.decide(mail(to=(TAG_B,), In_Reply_To=ACK_B), known, CONFIG)
    assert (decision.kind, decision.ticket_id) == (DUPLICATE, A.id)
