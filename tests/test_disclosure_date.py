"""Coordinated disclosure end to end: a report over SMTP to the real listener, the reporter's reply
proposing a date (``#disclose DATE`` or plain words), the maintainers agreeing or countering it
through the real CLI (``intake disclose-date``) or by mail (``#disclose-date``), the policy's limit,
and the sweep's reminders 7 and 1 days before, to both sides, each once, delivered to a real SMTP
sink. Every test runs on SQLite and on the real PostgreSQL."""

from __future__ import annotations

import email
import email.policy
import json
from datetime import date, datetime, time, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import update

from conftest import deliver_outbox, report
from intake.sla import disclosure_reminders, reminders
from intake.store.db import write_session
from intake.store.models import DisclosurePlan, Ticket
from intake.understand.disclosure_words import proposed_date
from test_maintainer_mail import Desk, _maintainer_mail, open_desk
from test_scheduler import sweep_twice_at_once

REPORTER = "alice@researcher.test"
MAINTAINER_ADDRESSES = ["ana@maintainers.test", "bo@maintainers.test"]
DIGEST = """
[scheduler.digests.morning]
cron = "0 8 * * *"
timezone = "UTC"
disclosures_within = "14 days"
"""


def _today() -> date:
    return datetime.now(timezone.utc).date()


def _midnight(day: date) -> datetime:
    """The start of *day* where the desk's policy (vaixus) counts: UTC."""
    return datetime.combine(day, time(), tzinfo=timezone.utc)


def _parsed(delivered: list) -> list[tuple[str, email.message.EmailMessage]]:
    return [(m.rcpt_tos[0], email.message_from_bytes(m.data, policy=email.policy.default)) for m in delivered]


def _words(message: email.message.EmailMessage) -> str:
    return " ".join(message.get_content().split())


@pytest.fixture
def desk(make_settings, start_intake_listener, config_file, sink) -> Desk:
    """Alice's report under the default policy (vaixus: limit 90 days after receipt), acknowledged;
    Ana and Bo are the maintainers."""
    return open_desk(make_settings, start_intake_listener, config_file, sink, DIGEST)


def _write(desk: Desk, body: str, sender: str = REPORTER, message_id: str | None = None) -> dict[str, list]:
    """*sender* writes *body* into the ticket's thread; what reached the sink for it, by recipient."""
    message = report(subject=f"Re: [{desk.reference}] Auth bypass in admin", body=body, sender=sender,
                     message_id=message_id, In_Reply_To="<report@alice.test>")
    desk.send(message, sender, "security@example.com")
    by_recipient: dict[str, list] = {}
    for to, parsed in _parsed(desk.deliver()):
        by_recipient.setdefault(to, []).append(parsed)
    return by_recipient


def _show(cli, reference: str) -> dict:  # type: ignore[no-untyped-def]
    return json.loads(cli("show", reference, "--json").output)


def _kinds(desk: Desk) -> list[str]:
    return [event.kind for event in desk.ticket().events]


# -- recognising a proposal ----------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("#disclose 2027-03-01\n", date(2027, 3, 1)),
    ("Thanks!\n\n#disclose 2027-03-01\n", date(2027, 3, 1)),
    ("We plan to disclose on 1 March 2027.\n", date(2027, 3, 1)),
    ("I would like to publish my write-up on March 1st, 2027, if that works for you.\n", date(2027, 3, 1)),
    ("Proposed disclosure date: 2027-03-01\n", date(2027, 3, 1)),
])
def test_a_proposal_is_recognised_from_the_command_or_explicit_words(text, expected):
    assert proposed_date(text) == expected


@pytest.mark.parametrize("text", [
    "We plan to disclose in 90 days.\n",  # relative: never guessed
    "Thanks.\n\n> We plan to disclose on 2027-03-01\n",  # quoted from an earlier mail
    "Thanks.\n\nOn Mon, 1 Dec 2026, Security wrote:\nWe plan to disclose on 2027-03-01\n",  # quoted unmarked
    "Like CVE-2026-1234, published on 2026-11-01, we plan to publish on 2027-03-01.\n",  # a CVE's line
    "We plan to publish once 2027.03.01 ships.\n",  # a version number
    "I plan to disclose v2027-03-01 as well.\n",  # a version, hyphenated
    "The crash happened on 2027-03-01 in my test.\n",  # a date, but no proposal
    "We plan to disclose on 2027-03-01. Disclosure date: 2027-04-01\n",  # two dates: ambiguous
    "Disclosure date: 2027-02-30\n",  # no such day
])
def test_no_proposal_is_read_from_ambiguous_quoted_or_unrelated_dates(text):
    assert proposed_date(text) is None


# -- the reporter proposes -----------------------------------------------------------------------


def test_the_reporters_proposal_is_recorded_acknowledged_once_and_shown_to_maintainers(desk, cli):
    proposed = _today() + timedelta(days=30)
    got = _write(desk, f"#disclose {proposed.isoformat()}\n\nThanks for the quick fix.\n",
                 message_id="<proposal@alice.test>")
    [ack] = got[REPORTER]
    assert ack["In-Reply-To"] == "<proposal@alice.test>" and ack["Auto-Submitted"] == "auto-replied"
    assert ack["Subject"] == f"Re: [{desk.reference}] Auth bypass in admin"
    assert f"We received your proposed disclosure date for your report {desk.reference}" in _words(ack)
    assert f"{proposed:%a %d %b %Y}" in _words(ack) and "A maintainer will confirm it" in _words(ack)
    for maintainer in MAINTAINER_ADDRESSES:
        [forward] = got[maintainer]
        assert f"The reporter proposes a disclosure date: {proposed.isoformat()} (recorded)" in forward.get_content()
    shown = _show(cli, desk.reference)
    assert shown["proposed_disclosure_date"] == proposed.isoformat()
    assert shown["disclosure_date_proposed_by"] == REPORTER and shown["disclosure_date"] is None
    assert f"the reporter proposes {proposed.isoformat()}" in cli("show", desk.reference).output

    # The same date again: recorded again, not acknowledged again.
    again = _write(desk, f"As said: we plan to disclose on {proposed:%d %B %Y}.\n")
    assert REPORTER not in again and sorted(again) == MAINTAINER_ADDRESSES
    assert _kinds(desk).count("disclosure-proposed") == 2
    assert _kinds(desk).count("disclosure-received-queued") == 1


def test_a_report_naming_its_disclosure_date_proposes_it(desk, cli):
    proposed = _today() + timedelta(days=45)
    message = report(subject="XSS in the wiki", message_id="<second@alice.test>",
                     body=f"Steps to reproduce are below.\n\nWe plan to disclose on {proposed.isoformat()}.\n")
    desk.send(message, REPORTER, "security@example.com")
    delivered = _parsed(desk.deliver())
    [reference] = [t["reference"] for t in json.loads(cli("tickets", "--json").output)
                   if t["reference"] != desk.reference]
    shown = _show(cli, reference)
    assert shown["proposed_disclosure_date"] == proposed.isoformat()
    assert shown["disclosure_date_proposed_by"] == REPORTER and shown["disclosure_date"] is None
    assert any(to == REPORTER and "We received your proposed disclosure date" in _words(m) for to, m in delivered)


def test_a_date_named_by_someone_else_or_only_quoted_is_not_the_reporters_proposal(desk, cli):
    proposed = _today() + timedelta(days=30)
    got = _write(desk, f"#disclose {proposed.isoformat()}\n", sender="mallory@elsewhere.test")
    assert REPORTER not in got and "mallory@elsewhere.test" not in got
    [forward] = got["ana@maintainers.test"]
    assert f"It names a disclosure date, {proposed.isoformat()}: NOT recorded" in forward.get_content()
    assert "disclosure-proposal-noted" in _kinds(desk)

    _write(desk, f"Thanks.\n\n> We plan to disclose on {proposed.isoformat()}\n")  # quoting us, or the stranger
    shown = _show(cli, desk.reference)
    assert shown["proposed_disclosure_date"] is None
    assert "disclosure-proposed" not in _kinds(desk)


# -- maintainers agree or counter ----------------------------------------------------------------


def test_accepting_then_countering_tells_the_reporter_once_per_date(desk, cli):
    proposed = _today() + timedelta(days=30)
    _write(desk, f"#disclose {proposed.isoformat()}\n")
    out = cli("disclose-date", desk.reference, proposed.isoformat()).output
    assert f"disclosure date {proposed.isoformat()} (the reporter's proposed date)" in out
    [(to, scheduled)] = _parsed(desk.deliver())
    assert to == REPORTER and scheduled["Subject"] == f"Re: [{desk.reference}] Auth bypass in admin"
    assert f"publicly on {proposed:%a %d %b %Y}" in _words(scheduled)
    assert "This is the date you proposed" in _words(scheduled)

    cli("disclose-date", desk.reference, proposed.isoformat())  # the same date: no second mail
    assert desk.deliver() == []
    countered = proposed + timedelta(days=14)
    cli("disclose-date", desk.reference, countered.isoformat(), "--message", "We need two more weeks.")
    [(_, moved)] = _parsed(desk.deliver())
    assert f"publicly on {countered:%a %d %b %Y}" in _words(moved) and "We need two more weeks." in _words(moved)
    assert "This is the date you proposed" not in _words(moved)
    shown = _show(cli, desk.reference)
    assert shown["disclosure_date"] == countered.isoformat()
    assert shown["proposed_disclosure_date"] == proposed.isoformat()
    set_events = [e.detail for e in desk.ticket().events if e.kind == "disclosure-date-set"]
    assert [(d["date"], d["accepted_proposal"]) for d in set_events] == [
        (proposed.isoformat(), True), (proposed.isoformat(), True), (countered.isoformat(), False)]


def test_a_date_past_the_policys_limit_needs_force_and_one_in_the_past_is_refused(desk, cli):
    received = desk.ticket().ticket.received_at
    limit = (received + timedelta(days=90)).date()  # vaixus: [disclosure] max_embargo
    refused = cli("disclose-date", desk.reference, (limit + timedelta(days=1)).isoformat(), code=1).output
    assert f"after the policy's limit {limit.isoformat()}" in refused and "--force" in refused
    past = cli("disclose-date", desk.reference, (_today() - timedelta(days=1)).isoformat(), code=1).output
    assert "is in the past" in past
    assert _show(cli, desk.reference)["disclosure_date"] is None and desk.deliver() == []

    cli("disclose-date", desk.reference, limit.isoformat(), "--quiet")  # the limit itself is allowed
    cli("disclose-date", desk.reference, (limit + timedelta(days=1)).isoformat(), "--force", "--quiet")
    shown = _show(cli, desk.reference)
    assert shown["disclosure_date"] == (limit + timedelta(days=1)).isoformat()
    assert shown["disclosure_limit"] == limit.isoformat()
    [forced] = [e.detail for e in desk.ticket().events if e.kind == "disclosure-date-set" and e.detail.get("forced")]
    assert forced["limit"] == limit.isoformat()
    assert desk.deliver() == []  # --quiet: no update


def test_under_vectis_mail_the_limit_is_seven_days_after_the_release(make_settings, start_intake_listener,
                                                                     config_file, sink, cli):
    desk = open_desk(make_settings, start_intake_listener, config_file, sink, DIGEST,
                     INTAKE_INTAKE__DEFAULT_POLICY="vectis-mail")
    before_release = cli("disclose-date", desk.reference, (_today() + timedelta(days=100)).isoformat(), code=1).output
    assert "97 days after the report was received" in before_release
    cli("ack", desk.reference)
    cli("assess", desk.reference, "--severity", "high", "--quiet")
    cli("released", desk.reference, "--quiet")
    disclose_due = _show(cli, desk.reference)["disclosure_limit"]
    assert date.fromisoformat(disclose_due) - _today() in (timedelta(days=7), timedelta(days=8))  # AEST
    late = date.fromisoformat(disclose_due) + timedelta(days=1)
    refused = cli("disclose-date", desk.reference, late.isoformat(), code=1).output
    assert "the policy's disclose stage is due" in refused
    cli("disclose-date", desk.reference, (_today() + timedelta(days=5)).isoformat())


def test_a_maintainer_agrees_by_mail_with_disclose_date(desk, cli):
    proposed = _today() + timedelta(days=30)
    forward = _write(desk, f"#disclose {proposed.isoformat()}\n")["ana@maintainers.test"][0]
    desk.send(_maintainer_mail(forward["Reply-To"], f"#disclose-date {proposed.isoformat()}\n"),
              "ana@maintainers.test", forward["Reply-To"])
    sent = dict(_parsed(desk.deliver()))
    assert f"- disclosure date {proposed.isoformat()}" in sent["ana@maintainers.test"].get_content()
    assert f"publicly on {proposed:%a %d %b %Y}" in _words(sent[REPORTER])
    assert _show(cli, desk.reference)["disclosure_date"] == proposed.isoformat()

    too_late = _today() + timedelta(days=200)
    desk.send(_maintainer_mail(forward["Reply-To"], f"#disclose-date {too_late.isoformat()}\n"),
              "ana@maintainers.test", forward["Reply-To"])
    [(_, confirmation)] = _parsed(desk.deliver())
    assert "after the policy's limit" in " ".join(confirmation.get_content().split())
    assert _show(cli, desk.reference)["disclosure_date"] == proposed.isoformat()


# -- reminders 7 and 1 days before ---------------------------------------------------------------


def _agree(desk: Desk, cli, day: date) -> None:  # type: ignore[no-untyped-def]
    """Acknowledge the ticket (its policy's only stage: no SLA notice in the sweeps after) and
    agree *day*; the update delivered."""
    cli("ack", desk.reference)
    cli("disclose-date", desk.reference, day.isoformat())
    desk.deliver()


def _sweep(desk: Desk, now: datetime) -> dict[str, list]:
    """One sweep at *now*, its mail delivered; what reached the sink, by recipient."""
    reminders.sweep(desk.running.engine, desk.settings, now)
    before = len(desk.sink.messages)
    sent = deliver_outbox(desk.settings, desk.running.engine, now).get("sent", 0)
    by_recipient: dict[str, list] = {}
    for to, parsed in _parsed(desk.sink.wait_for(before + sent)[before:]):
        by_recipient.setdefault(to, []).append(parsed)
    return by_recipient


def test_the_sweeps_sla_notices_name_the_agreed_date(desk, cli):
    day = _today() + timedelta(days=60)
    cli("disclose-date", desk.reference, day.isoformat())  # not acknowledged: its SLA stage runs on
    desk.deliver()
    got = _sweep(desk, datetime.now(timezone.utc) + timedelta(days=10))
    for maintainer in MAINTAINER_ADDRESSES:
        [notice] = got[maintainer]
        assert "acknowledge" in notice["Subject"]
        assert f"Disclosure: agreed {day.isoformat()} (by " in notice.get_content()


def test_both_sides_are_reminded_7_and_1_days_before_each_once(desk, cli):
    day = _today() + timedelta(days=20)
    _agree(desk, cli, day)
    assert _sweep(desk, _midnight(day) - timedelta(days=7, minutes=1)) == {}

    seven = _midnight(day) - timedelta(days=7) + timedelta(minutes=1)
    dry = cli("sweep", "--dry-run", "--now", seven.isoformat()).output
    assert f"disclose:{desk.reference}:{day.isoformat()}:7d" in dry and REPORTER in dry
    got = _sweep(desk, seven)
    assert sorted(got) == sorted([REPORTER, *MAINTAINER_ADDRESSES])
    [to_reporter] = got[REPORTER]
    assert to_reporter["In-Reply-To"] == "<report@alice.test>"
    assert f"publicly on {day:%a %d %b %Y}, in 7 days" in _words(to_reporter)
    [to_ana] = got["ana@maintainers.test"]
    assert to_ana["Subject"] == f"[{desk.reference}] Reminder: disclosure on {day:%a %d %b %Y}, in 7 days"
    assert "the reporter gets a reminder too" in _words(to_ana)
    assert _sweep(desk, seven + timedelta(hours=3)) == {}  # once

    one = _midnight(day) - timedelta(days=1) + timedelta(minutes=1)
    got = _sweep(desk, one)
    assert sorted(got) == sorted([REPORTER, *MAINTAINER_ADDRESSES])
    assert "in 1 day." in _words(got[REPORTER][0])
    assert _sweep(desk, one + timedelta(hours=1)) == {}
    assert _sweep(desk, _midnight(day) + timedelta(hours=1)) == {}


def test_intake_reminders_lists_both_sides_disclosure_reminders(desk, cli):
    day = _today() + timedelta(days=20)
    _agree(desk, cli, day)
    seven = _midnight(day) - timedelta(days=7) + timedelta(minutes=1)
    _sweep(desk, seven)
    listed = json.loads(cli("reminders", desk.reference, "--now", seven.isoformat(), "--json").output)
    sent = [(entry["audience"], entry["kind"]) for entry in listed["sent"]]
    assert ("reporter", "disclosure-reminder") in sent
    assert any(audience == "maintainers" and f"{day.isoformat()}:7d" in (entry["key"] or "")
               for entry, (audience, _) in zip(listed["sent"], sent))


def test_a_date_agreed_less_than_7_days_ahead_skips_the_7_day_reminder_and_a_moved_date_rearms(desk, cli):
    soon = _today() + timedelta(days=3)
    _agree(desk, cli, soon)
    assert _sweep(desk, datetime.now(timezone.utc) + timedelta(minutes=1)) == {}  # the 7-day point had passed
    got = _sweep(desk, _midnight(soon) - timedelta(days=1) + timedelta(minutes=1))
    assert sorted(got) == sorted([REPORTER, *MAINTAINER_ADDRESSES])

    moved = _today() + timedelta(days=30)
    cli("disclose-date", desk.reference, moved.isoformat())
    desk.deliver()
    got = _sweep(desk, _midnight(moved) - timedelta(days=7) + timedelta(minutes=1))
    assert sorted(got) == sorted([REPORTER, *MAINTAINER_ADDRESSES])
    assert f"{moved:%a %d %b %Y}" in _words(got[REPORTER][0])


def test_no_reminder_to_an_unreachable_reporter_nor_for_a_closed_ticket(desk, cli):
    day = _today() + timedelta(days=20)
    _agree(desk, cli, day)
    with write_session(desk.running.engine) as session:
        session.execute(update(Ticket).values(reporter_unreachable_at=datetime.now(timezone.utc)))
    got = _sweep(desk, _midnight(day) - timedelta(days=7) + timedelta(minutes=1))
    assert sorted(got) == MAINTAINER_ADDRESSES
    assert "the reporter is unreachable: they get no reminder" in _words(got["ana@maintainers.test"][0])

    cli("close", desk.reference, "--reason", "invalid", "--quiet")
    assert _sweep(desk, _midnight(day) - timedelta(days=1) + timedelta(minutes=1)) == {}


def test_reminder_points_are_midnight_where_the_policy_counts(make_settings):
    """vectis-mail counts in Brisbane (UTC+10): its 7-day point for 1 March is 00:00 on 22 February
    there, 14:00 UTC on the 21st, when a UTC-counting policy's point is still ten hours away."""
    settings = make_settings()
    brisbane = disclosure_reminders.zone_of(settings, "vectis-mail")
    assert brisbane == ZoneInfo("Australia/Brisbane")
    assert disclosure_reminders.zone_of(settings, "vaixus") == ZoneInfo("UTC")
    assert disclosure_reminders.zone_of(settings, "no-longer-configured") == timezone.utc
    plan = DisclosurePlan(ticket_id=1, agreed_date=date(2027, 3, 1), agreed_at=datetime(2027, 1, 1, tzinfo=timezone.utc))
    point = datetime(2027, 2, 21, 14, tzinfo=timezone.utc)
    for zone, before, at in ((brisbane, None, 7), (ZoneInfo("UTC"), None, None)):
        assert disclosure_reminders.due_point(plan, point - timedelta(minutes=1), zone) == before
        assert disclosure_reminders.due_point(plan, point, zone) == at
    assert disclosure_reminders.due_point(plan, datetime(2027, 2, 22, tzinfo=timezone.utc), ZoneInfo("UTC")) == 7
    # The day itself has come in Brisbane at 14:00 UTC the day before: no reminder any more.
    assert disclosure_reminders.due_point(plan, datetime(2027, 2, 28, 13, 59, tzinfo=timezone.utc), brisbane) == 1
    assert disclosure_reminders.due_point(plan, datetime(2027, 2, 28, 14, tzinfo=timezone.utc), brisbane) is None


def test_two_sweeps_at_once_remind_each_side_once(desk, cli):
    day = _today() + timedelta(days=20)
    _agree(desk, cli, day)
    now = _midnight(day) - timedelta(days=7) + timedelta(minutes=1)
    sent = sorted(sweep_twice_at_once(desk.settings, now))
    key = f"disclose:{desk.reference}:{day.isoformat()}:7d"
    assert sent == [key, f"{key}:reporter"]
    before = len(desk.sink.messages)
    sent_count = deliver_outbox(desk.settings, desk.running.engine, now).get("sent", 0)
    assert sorted(mail.rcpt_tos[0] for mail in desk.sink.wait_for(before + sent_count)[before:]) == sorted(
        [REPORTER, *MAINTAINER_ADDRESSES])


# -- the digest ----------------------------------------------------------------------------------


def test_the_digest_lists_agreed_and_proposed_dates_in_its_period(desk, cli):
    proposed = _today() + timedelta(days=10)
    _write(desk, f"#disclose {proposed.isoformat()}\n")
    now = datetime.now(timezone.utc)
    section = json.loads(cli("digest", "morning", "--preview", "--json", "--now", now.isoformat()).output
                         )["sections"]["coordinated_disclosures"]
    assert section["tickets"] == [desk.reference]
    assert f"the reporter proposes {proposed:%a %d %b %Y}, not agreed yet" in section["lines"][0]["detail"]

    cli("disclose-date", desk.reference, (proposed + timedelta(days=2)).isoformat(), "--quiet")
    text = cli("digest", "morning", "--preview", "--now", now.isoformat()).output
    assert f"disclosure agreed for {proposed + timedelta(days=2):%a %d %b %Y}; the reporter proposes" in text
    later = cli("digest", "morning", "--preview", "--json", "--now", (now + timedelta(days=30)).isoformat()).output
    assert json.loads(later)["sections"]["coordinated_disclosures"]["tickets"] == []


def test_a_proposal_for_a_closed_ticket_or_a_past_date_is_only_noted(desk, cli):
    got = _write(desk, f"#disclose {(_today() - timedelta(days=2)).isoformat()}\n")
    assert REPORTER not in got
    assert "NOT recorded as the reporter's proposal (not a date in the future)" in got[
        "ana@maintainers.test"][0].get_content()
    cli("close", desk.reference, "--reason", "invalid", "--quiet")
    got = _write(desk, f"#disclose {(_today() + timedelta(days=30)).isoformat()}\n")
    assert REPORTER not in got
    assert "(the ticket is closed)" in got["ana@maintainers.test"][0].get_content()
    assert _show(cli, desk.reference)["proposed_disclosure_date"] is None
    assert [e.detail["reason"] for e in desk.ticket().events if e.kind == "disclosure-proposal-noted"] == [
        "not a date in the future", "the ticket is closed"]
