"""A ticket's mail the relay refuses, against a real aiosmtpd relay that refuses chosen recipients at
RCPT or answers 554 after DATA: events, the reporter flagged unreachable (and only the reporter),
what `intake show`, the digest and the next notice say, retries of 4xx, giving up, a crash."""

from __future__ import annotations

import asyncio
import email
import json
import email.policy
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Iterator

import pytest
from aiosmtpd.controller import Controller

from conftest import SinkHandler, free_port, process, report
from intake.send import outbox
from intake.send.outbox import OutboxSender, make_transport
from intake.sla import digest, reminders
from intake.store import inbound, schema
from intake.store.db import make_engine, write_session
from intake.tickets import correspondence, reads, undeliverable

UTC = timezone.utc
T0 = datetime(2026, 6, 1, 10, 0, tzinfo=UTC)  # a Monday
ALICE = "alice@researcher.test"
MIA = "mia@example.com"
CC = "cert@coord.test"
USER_UNKNOWN = f"550 5.1.1 <{ALICE}>: Recipient address rejected: User unknown"
CONFIG = """
[policies.twoday]
calendar = "utc"
auto_ack_counts = true
remind = ["50%"]

[[policies.twoday.stages]]
name = "resolve"
duration = "2 days"

[scheduler.digests.daily]
cron = "0 8 * * *"
timezone = "UTC"
"""


@pytest.fixture
def database_url(sqlite_url: str) -> str:
    return sqlite_url  # nothing here differs by database; the JSON read is plain Python


@dataclass
class RefusingRelay(SinkHandler):
    """The sink, refusing the recipients in *refuse* at RCPT with the answer given for each."""

    refuse: dict[str, str] = field(default_factory=dict)

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):  # type: ignore[no-untyped-def]
        if address.lower() in self.refuse:
            return self.refuse[address.lower()]
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"


@pytest.fixture
def relay() -> Iterator[tuple[RefusingRelay, int]]:
    handler, port = RefusingRelay(), free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield handler, port
    finally:
        controller.stop()


@pytest.fixture
def desk(make_settings, config_file, relay):  # type: ignore[no-untyped-def]
    config_file.write_text(config_file.read_text() + CONFIG)
    handler, port = relay

    class Desk:
        refuse = handler.refuse
        replies = handler.replies  # answers after DATA, one per message
        delivered = handler.messages
        settings = make_settings(
            INTAKE_MAINTAINERS=f'[{{"name": "Mia", "email": "{MIA}"}}]', INTAKE_INTAKE__DEFAULT_POLICY="twoday",
            INTAKE_SCHEDULER__QUIET_HOURS="false", INTAKE_OUTBOUND__TRANSPORT="smtp",
            INTAKE_OUTBOUND__RELAY=f"127.0.0.1:{port}", INTAKE_OUTBOUND__TIMEOUT="5",
            INTAKE_OUTBOUND__GIVE_UP_AFTER="3600")
        engine = make_engine(settings.database_url)
        schema.upgrade(engine)

        def open(self) -> str:
            raw = report(subject="RCE in the importer").as_bytes()
            inbound.store(self.engine, [inbound.Arrival(ALICE, ["security@example.com"], "127.0.0.1", "test", raw,
                                                        T0)])
            [reference] = process(self.settings, self.engine, T0).tickets_opened
            return reference

        def send(self, now: datetime) -> dict[str, int]:
            sender = OutboxSender(self.engine, self.settings, make_transport(self.settings),
                                  on_undelivered=undeliverable.record)
            return asyncio.run(sender.send_due(now))

        def row(self, key: str) -> outbox.Outbox:
            return next(r for r in outbox.listing(self.engine) if r.dedupe_key == key)

        def events(self, reference: str, kind: str) -> list[dict]:
            return [e.detail for e in reads.ticket_detail(self.engine, reference).events if e.kind == kind]

        def unreachable_at(self, reference: str) -> datetime | None:
            return reads.ticket_detail(self.engine, reference).ticket.reporter_unreachable_at

    return Desk()


def reply_with_cc(desk, reference: str, text: str = "Confirmed, thank you.\n") -> None:  # type: ignore[no-untyped-def]
    """A maintainer's reply to the reporter with the coordinator in Cc: one mail, two recipients."""
    with write_session(desk.engine) as session:
        correspondence.reply(session, desk.settings, reads.find(session, reference), text, now=T0, actor="mia",
                             cc=(CC,))


def correspondence_rows(desk) -> list[outbox.Outbox]:  # type: ignore[no-untyped-def]
    return sorted((r for r in outbox.listing(desk.engine) if r.kind == "correspondence"), key=lambda r: r.id)


def body(raw: bytes) -> str:
    return email.message_from_bytes(raw, policy=email.policy.default).get_body(("plain",)).get_content()


def test_an_acknowledgement_refused_at_rcpt_flags_the_reporter_everywhere_maintainers_look(desk, cli):
    ref = desk.open()
    desk.refuse[ALICE] = USER_UNKNOWN
    sent_at = T0 + timedelta(minutes=1)
    assert desk.send(sent_at) == {"dead": 1, "sent": 1}  # the acknowledgement; Mia's new-ticket notice
    assert desk.row(f"ack:{ref}").status == "dead"
    [refused] = desk.events(ref, "undeliverable")
    answer = USER_UNKNOWN  # as the relay said it, display-safe already
    assert (refused["recipient"], refused["answer"], refused["permanent"]) == (ALICE, answer, True)
    assert refused["summary"] == f"acknowledgement to {ALICE} refused by the relay: {answer}"
    assert desk.unreachable_at(ref) == sent_at
    [flag] = desk.events(ref, "reporter-unreachable")
    assert flag == {"address": ALICE, "reason": refused["summary"]}

    shown = cli("show", ref).output
    assert f"reporter unreachable since {sent_at.isoformat()}: acknowledgement to {ALICE} refused by the relay: " \
           f"{answer}" in shown
    [line] = _digest_lines(desk, T0 + timedelta(days=1))
    assert line == {"reference": ref, "subject": "RCE in the importer",
                    "detail": f"{ALICE} since Mon 01 Jun 2026 10:01 UTC: {refused['summary']}"}

    reminders.sweep(desk.engine, desk.settings, T0 + timedelta(days=1, minutes=1))  # the 50% reminder
    [notice] = [r for r in outbox.listing(desk.engine) if r.kind == "reminder"]
    assert f"Mail to the reporter failed: {refused['summary']}" in body(notice.raw)
    assert len(desk.events(ref, "undeliverable")) == 1  # nothing recorded twice by later work


def _digest_lines(desk, now: datetime) -> list[dict]:  # type: ignore[no-untyped-def]
    built = digest.build(desk.engine, desk.settings, "daily", now)
    assert "Reporter unreachable since the last digest (1)" in digest.text(desk.settings, built)
    return built.as_dict()["sections"]["unreachable"]["lines"]



def test_a_554_after_data_flags_the_reporter(desk):
    ref = desk.open()
    desk.replies.append("554 5.7.1 Message rejected: content policy")  # the first message: the ack
    assert desk.send(T0)["dead"] == 1
    [refused] = desk.events(ref, "undeliverable")
    assert (refused["recipient"], refused["answer"]) == (ALICE, "554 5.7.1 Message rejected: content policy")
    assert desk.unreachable_at(ref) == T0


@pytest.mark.parametrize("refused", [ALICE, CC])
def test_one_recipient_of_several_refused_is_recorded_for_that_recipient_only(desk, refused):
    code = "550 5.1.1"
    ref = desk.open()
    desk.send(T0)  # the acknowledgement and the notice go through
    reply_with_cc(desk, ref)
    desk.refuse[refused] = f"{code} <{refused}>: no"
    later = T0 + timedelta(minutes=10)
    assert desk.send(later) == {"sent": 1}  # the other recipient got it
    [delivered] = [m for m in desk.delivered if b"Confirmed" in m.data]
    assert delivered.rcpt_tos == [CC if refused == ALICE else ALICE]
    [event] = desk.events(ref, "undeliverable")
    assert (event["recipient"], event["mail"], event["answer"]) == (refused, "correspondence", f"{code} <{refused}>: no")
    [row] = [r for r in outbox.listing(desk.engine) if r.kind == "correspondence"]
    assert (row.status, f"{refused}: {code}" in row.last_error) == ("sent", True)
    assert desk.unreachable_at(ref) == (later if refused == ALICE else None)  # the reporter's address only
    assert event["summary"].endswith("refused by the relay: " + event["answer"])


MAILBOX_FULL = f"452 4.2.2 <{ALICE}>: Mailbox full"


def test_a_recipient_deferred_while_another_took_it_gets_it_on_the_retry_and_the_other_only_once(desk, cli):
    ref = desk.open()
    desk.send(T0)
    reply_with_cc(desk, ref)
    desk.refuse[ALICE] = MAILBOX_FULL
    first = T0 + timedelta(minutes=1)
    assert desk.send(first) == {"sent": 1}  # the Cc got it
    original, retry = correspondence_rows(desk)
    assert (original.status, original.recipients, original.attempts) == ("sent", [CC], 1)
    # The same mail, for the deferred recipient only, on the usual backoff from the first attempt.
    assert (retry.status, retry.recipients, retry.attempts, retry.dedupe_key) == \
           ("pending", [ALICE], 1, f"{original.dedupe_key}/deferred:{original.id}")
    same = ("raw", "message_id", "envelope_from", "ticket_id", "kind", "created_at")
    assert [getattr(retry, a) for a in same] == [getattr(original, a) for a in same]
    assert retry.next_attempt_at == first + outbox.backoff(desk.settings.outbound, 1)
    [event] = desk.events(ref, "undeliverable")
    assert event["summary"] == f"correspondence to {ALICE} deferred by the relay, will be retried " \
                               f"(outbox {retry.id}): {MAILBOX_FULL}"
    assert desk.unreachable_at(ref) is None
    listed = {row["id"]: row for row in json.loads(cli("outbox", "--json").output)}
    assert (listed[retry.id]["status"], listed[retry.id]["to"], listed[retry.id]["last_error"]) == \
           ("pending", [ALICE], f"{ALICE}: {MAILBOX_FULL}")

    assert desk.send(retry.next_attempt_at - timedelta(seconds=1)) == {}  # not due yet
    del desk.refuse[ALICE]  # the mailbox has room again
    assert desk.send(retry.next_attempt_at) == {"sent": 1}
    copies = [m for m in desk.delivered if b"Confirmed" in m.data]
    assert [m.rcpt_tos for m in copies] == [[CC], [ALICE]]  # each exactly once
    assert desk.row(retry.dedupe_key).status == "sent"
    assert desk.send(T0 + timedelta(days=1)) == {}  # nothing left for anyone
    assert len(desk.events(ref, "undeliverable")) == 1


def test_a_deferred_recipient_is_given_up_on_counting_from_when_the_mail_was_queued(desk, caplog):
    ref = desk.open()
    desk.send(T0)
    reply_with_cc(desk, ref)  # queued at T0; give_up_after is an hour
    desk.refuse[ALICE] = MAILBOX_FULL
    desk.send(T0 + timedelta(minutes=1))
    gave_up = T0 + timedelta(hours=1)
    with caplog.at_level("INFO"):
        assert desk.send(gave_up) == {"dead": 1}
    deferred, given_up = desk.events(ref, "undeliverable")
    _, retry = correspondence_rows(desk)
    assert (deferred["outbox_id"], given_up["outbox_id"]) == (correspondence_rows(desk)[0].id, retry.id)
    assert given_up["summary"] == f"correspondence to {ALICE} given up after 2 attempts: {MAILBOX_FULL}"
    assert desk.unreachable_at(ref) == gave_up  # as an MTA's final DSN would say
    [dead] = [r for r in caplog.records if r.getMessage().startswith("event=outbox-dead")]
    assert (dead.levelname, f"outbox_id={retry.id}" in dead.getMessage()) == ("WARNING", True)


@pytest.mark.parametrize("at_rcpt", ["550 5.1.1", "452 4.2.2"])
def test_after_a_refusal_of_the_message_each_recipient_refused_at_rcpt_keeps_its_own_answer(desk, at_rcpt):
    ref = desk.open()
    desk.send(T0)
    reply_with_cc(desk, ref)
    desk.refuse[ALICE] = f"{at_rcpt} <{ALICE}>: no"
    desk.replies.append("554 5.7.1 Message rejected: content policy")  # to the Cc's copy
    sent_at = T0 + timedelta(minutes=1)
    assert desk.send(sent_at) == {"dead": 1}
    answers = {e["recipient"]: e["answer"] for e in desk.events(ref, "undeliverable")}
    assert answers == {ALICE: f"{at_rcpt} <{ALICE}>: no", CC: "554 5.7.1 Message rejected: content policy"}
    deferred = at_rcpt.startswith("4")
    assert [(r.status, r.recipients) for r in correspondence_rows(desk)] == \
           ([("dead", [CC]), ("pending", [ALICE])] if deferred else [("dead", [ALICE, CC])])
    assert desk.unreachable_at(ref) == (None if deferred else sent_at)


def test_a_maintainers_notice_refused_is_an_event_and_a_warning_not_the_reporter(desk, caplog):
    ref = desk.open()
    desk.refuse[MIA] = f"550 5.1.1 <{MIA}>: User unknown"
    with caplog.at_level("WARNING"):
        assert desk.send(T0) == {"sent": 1, "dead": 1}
    [event] = desk.events(ref, "undeliverable")
    assert (event["recipient"], event["mail"], event["permanent"]) == (MIA, "new-ticket", True)
    assert desk.unreachable_at(ref) is None
    assert desk.events(ref, "reporter-unreachable") == []
    assert any("event=outbox-refused" in r.getMessage() and MIA in r.getMessage() for r in caplog.records)


def test_a_4xx_is_retried_and_only_giving_up_on_it_flags_the_reporter(desk):
    ref = desk.open()
    desk.refuse[ALICE] = f"450 4.2.1 <{ALICE}>: Mailbox busy"
    assert desk.send(T0) == {"retry": 1, "sent": 1}
    assert desk.row(f"ack:{ref}").status == "pending"
    assert desk.events(ref, "undeliverable") == [] and desk.unreachable_at(ref) is None
    gave_up = T0 + timedelta(hours=2)  # past give_up_after, still refused
    assert desk.send(gave_up) == {"dead": 1}
    [event] = desk.events(ref, "undeliverable")
    assert event["summary"] == f"acknowledgement to {ALICE} given up after 2 attempts: 450 4.2.1 <{ALICE}>: " \
                               "Mailbox busy"
    assert desk.unreachable_at(ref) == gave_up


def test_giving_up_because_the_relay_was_down_says_nothing_about_the_reporter(desk, make_settings):
    ref = desk.open()
    desk.settings = make_settings(**{**_env(desk), "INTAKE_OUTBOUND__RELAY": f"127.0.0.1:{free_port()}"})
    assert desk.send(T0) == {"retry": 2}
    assert desk.send(T0 + timedelta(hours=2)) == {"dead": 2}
    events = desk.events(ref, "undeliverable")
    assert sorted(e["recipient"] for e in events) == [ALICE, MIA]
    assert all("relay unreachable" in e["answer"] and not e["permanent"] for e in events)
    assert desk.unreachable_at(ref) is None


def test_a_refusal_met_again_on_every_retry_is_recorded_once(desk):
    """The reporter refused for good, the Cc only for now: only the Cc is retried, and its 4xx is
    said once when deferred and once when given up, however many retries met it between."""
    ref = desk.open()
    desk.send(T0)
    reply_with_cc(desk, ref, "Confirmed.\n")
    desk.refuse.update({ALICE: USER_UNKNOWN, CC: f"451 4.3.0 <{CC}>: try later"})
    outcomes = [desk.send(T0 + timedelta(minutes=minutes)) for minutes in (1, 3, 10, 180)]
    assert outcomes == [{"dead": 1}, {"retry": 1}, {"retry": 1}, {"dead": 1}]
    summaries = [(e["recipient"], e["summary"].split(":")[0]) for e in desk.events(ref, "undeliverable")]
    assert summaries == [(ALICE, f"correspondence to {ALICE} refused by the relay"),
                         (CC, f"correspondence to {CC} deferred by the relay, will be retried (outbox "
                              f"{correspondence_rows(desk)[1].id})"),
                         (CC, f"correspondence to {CC} given up after 4 attempts")]
    assert not any(ALICE in m.rcpt_tos for m in desk.delivered if b"Confirmed" in m.data)
    assert len(desk.events(ref, "reporter-unreachable")) == 1
    assert desk.unreachable_at(ref) == T0 + timedelta(minutes=1)


class Crash(BaseException):
    """The process dying after the relay answered, before the outcome was committed."""


def test_a_crash_before_the_outcome_is_committed_records_the_refusal_once_on_the_retry(desk):
    ref = desk.open()
    desk.refuse[ALICE] = USER_UNKNOWN

    def crash(connection, undelivered, now):  # type: ignore[no-untyped-def]
        undeliverable.record(connection, undelivered, now)
        raise Crash

    crashing = OutboxSender(desk.engine, desk.settings, make_transport(desk.settings), on_undelivered=crash)
    with pytest.raises(Crash):
        asyncio.run(crashing.send_due(T0))
    assert desk.events(ref, "undeliverable") == [] and desk.unreachable_at(ref) is None  # rolled back whole
    after_lease = T0 + timedelta(minutes=5)
    assert desk.send(after_lease)["dead"] == 1
    assert len(desk.events(ref, "undeliverable")) == 1
    assert len(desk.events(ref, "reporter-unreachable")) == 1
    assert desk.unreachable_at(ref) == after_lease


def test_a_crash_before_a_deferral_is_committed_leaves_the_row_whole_and_queues_no_retry(desk):
    ref = desk.open()
    desk.send(T0)
    reply_with_cc(desk, ref)
    desk.refuse[ALICE] = MAILBOX_FULL

    def crash(connection, undelivered, now):  # type: ignore[no-untyped-def]
        raise Crash

    crashing = OutboxSender(desk.engine, desk.settings, make_transport(desk.settings), on_undelivered=crash)
    with pytest.raises(Crash):
        asyncio.run(crashing.send_due(T0 + timedelta(minutes=1)))
    [row] = correspondence_rows(desk)
    assert (row.status, sorted(row.recipients), row.attempts) == ("pending", sorted([ALICE, CC]), 0)
    assert desk.send(T0 + timedelta(minutes=5)) == {"sent": 1}  # after the lease: the Cc again, at least once
    assert [(r.status, r.recipients) for r in correspondence_rows(desk)] == [("sent", [CC]), ("pending", [ALICE])]


def test_the_relays_answer_is_kept_display_safe_and_bounded():
    answer = undeliverable.answer_text(550, "5.1.1 <a\x1b[31m@b>\r\nInjected: yes " + "x" * 2000)
    assert "\x1b" not in answer and "\n" not in answer and len(answer) == undeliverable.MAX_ANSWER
    assert answer.startswith("550 5.1.1 <a[31m@b> Injected: yes x")


def _env(desk) -> dict[str, str]:  # type: ignore[no-untyped-def]
    return {"INTAKE_MAINTAINERS": f'[{{"name": "Mia", "email": "{MIA}"}}]', "INTAKE_INTAKE__DEFAULT_POLICY": "twoday",
            "INTAKE_SCHEDULER__QUIET_HOURS": "false", "INTAKE_OUTBOUND__TRANSPORT": "smtp",
            "INTAKE_OUTBOUND__TIMEOUT": "5", "INTAKE_OUTBOUND__GIVE_UP_AFTER": "3600",
            "INTAKE_DATABASE__URL": desk.settings.database_url}


def test_a_failure_to_record_it_on_the_ticket_never_makes_the_mail_go_again(desk, caplog):
    ref = desk.open()
    desk.refuse[ALICE] = USER_UNKNOWN

    def broken(connection, undelivered, now):  # type: ignore[no-untyped-def]
        undeliverable.record(connection, undelivered, now)
        raise RuntimeError("a bug on the ticket side")

    sender = OutboxSender(desk.engine, desk.settings, make_transport(desk.settings), on_undelivered=broken)
    assert asyncio.run(sender.send_due(T0))["dead"] == 1  # the row's outcome stands
    assert desk.row(f"ack:{ref}").status == "dead"
    assert desk.events(ref, "undeliverable") == []  # the savepoint undid the half-written part
    assert any(r.getMessage().startswith("event=outbox-undelivered-not-recorded") and r.exc_info
               for r in caplog.records)
