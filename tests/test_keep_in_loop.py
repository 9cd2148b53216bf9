"""Keep-in-loop, end to end: reports come in over real SMTP, sweeps run at explicit instants across
periods, and mail goes through the relay transport to a real SMTP sink. A reporter with no mail for
the policy's keep_in_loop gets one "still being worked on" mail per period (not before, exactly
once across repeated sweeps, restarts and two nodes at once), a reply to them starts the period
again, maintainers are told, and nothing goes for waiting or finished tickets or to an unreachable
reporter. ``intake reminders REF`` lists it beside the maintainers' notices."""

from __future__ import annotations

import email
import email.policy
import json
import threading
from datetime import datetime, timedelta, timezone

import pytest
from pydantic import ValidationError
from sqlalchemy import select, update

from conftest import _fresh_postgres_database, deliver_outbox
from intake.send import composer
from intake.sla import deadlines, reminders
from intake.sla.engine import PolicyConfig
from intake.store.db import make_engine, read_session, write_session
from intake.store.models import Outbox, Ticket
from intake.tickets import correspondence, reads
from test_maintainer_mail import MAINTAINERS
from test_openpgp import Keys, _decrypted
from test_status_reply import readme_example
from test_updates import two_reports

REPORTER = "alice@researcher.test"
QUEUED = "keep-in-loop-queued"
PERIOD = timedelta(days=30)

POLICIES = """
[policies.monthly]
title = "Example monthly policy"
calendar = "utc"
auto_ack_counts = true
keep_in_loop = "30 days"

[[policies.monthly.stages]]
name = "acknowledge"
duration = "1 days"

[[policies.monthly.stages]]
name = "resolve"
duration = "90 days"

[policies.no-dates]
calendar = "utc"
auto_ack_counts = true
keep_in_loop = "30 days"

[[policies.no-dates.stages]]
name = "acknowledge"
duration = "1 days"
"""


@pytest.fixture
def database_url(request: pytest.FixtureRequest) -> str:
    """SQLite, but a fresh PostgreSQL database for a test marked ``postgres``."""
    if request.node.get_closest_marker("postgres") is None:
        return request.getfixturevalue("sqlite_url")
    url, drop = _fresh_postgres_database(request.getfixturevalue("postgres_server"),
                                         request.getfixturevalue("postgres_template"))
    request.addfinalizer(drop)
    return url


class Desk:
    """The listener with its reports in, the acknowledgements delivered; sweeps and deliveries at *now*."""

    def __init__(self, settings, running, references, sink):  # type: ignore[no-untyped-def]
        self.settings, self.running, self.sink, self.references = settings, running, sink, references
        self.engine = running.engine

    def opened(self, reference: str) -> datetime:
        """When the reporter of *reference* last got mail: its acknowledgement."""
        return max(e.at for e in reads.ticket_detail(self.engine, reference).events if e.kind.endswith("-queued"))

    def sweep(self, now: datetime, engine=None) -> reminders.SweepResult:  # type: ignore[no-untyped-def]
        return reminders.sweep(engine or self.engine, self.settings, now)

    def deliver(self, now: datetime) -> list[tuple[str, email.message.EmailMessage]]:
        """(recipient, message) of the mail the outbox delivers at *now*."""
        before = len(self.sink.messages)
        sent = deliver_outbox(self.settings, self.engine, now).get("sent", 0)
        return [(m.rcpt_tos[0], email.message_from_bytes(m.data, policy=email.policy.default))
                for m in self.sink.wait_for(before + sent)[before:]]

    def queued(self, reference: str) -> list[dict]:  # type: ignore[type-arg]
        return [e.detail for e in reads.ticket_detail(self.engine, reference).events if e.kind == QUEUED]

    def set(self, reference: str, **values: object) -> None:
        with write_session(self.engine) as session:
            session.execute(update(Ticket).where(Ticket.reference == reference).values(**values))


def _words(message: email.message.EmailMessage) -> str:
    return " ".join(message.get_content().split())


@pytest.fixture
def desk(make_settings, start_intake_listener, config_file, sink):  # type: ignore[no-untyped-def]
    """Alice's report under "monthly" (a resolve date to name), Carol's under "no-dates" (none)."""
    config_file.write_text(config_file.read_text() + POLICIES + MAINTAINERS)

    def start(**env: str) -> Desk:
        return Desk(*two_reports(make_settings, start_intake_listener, sink, "monthly", "no-dates", **env), sink)

    return start


def test_after_a_period_without_mail_the_reporter_hears_once_and_maintainers_are_told(desk):
    desk = desk()
    first, _ = desk.references
    opened = desk.opened(first)
    assert desk.sweep(opened + PERIOD - timedelta(minutes=1)).keep_in_loop == []
    assert desk.deliver(opened + PERIOD) == []

    due = opened + PERIOD + timedelta(minutes=5)
    [planned] = [p for p in desk.sweep(due).keep_in_loop if p.reference == first]
    delivered = desk.deliver(due)
    [(to, mail)] = [(to, m) for to, m in delivered if first in m["Subject"] and to == REPORTER]
    assert mail["From"].addresses[0].addr_spec == "security@example.com"
    assert mail["Subject"] == f"Re: [{first}] SQL injection in search"
    assert mail["In-Reply-To"] == "<first@alice.test>"
    text = _words(mail)
    assert "is still being worked on" in text and "We have not written to you for 30 days" in text
    ticket = reads.ticket_detail(desk.engine, first).ticket
    [resolve] = [s for s in deadlines.ticket_stage_statuses(desk.engine, desk.settings, ticket, due)
                 if s.stage == "resolve"]
    assert f"Resolution (target), by {composer.PromisedDate('', resolve.due_at, 'UTC').due_local}" in text
    # Maintainers (no assignee: the notice recipients) are told, each once.
    told = sorted(to for to, m in delivered if m["Subject"].startswith(f"[{first}] Reporter kept in the loop"))
    assert told == ["ana@maintainers.test", "bo@maintainers.test"] == planned.maintainers
    assert [d["maintainers_told"] for d in desk.queued(first)] == [told]

    # Repeated sweeps, and a restart (a new engine), send nothing more in this period.
    assert [p.reference for p in desk.sweep(due + timedelta(hours=1)).keep_in_loop] == []
    restarted = make_engine(desk.settings.database_url)
    assert desk.sweep(due + timedelta(days=29), engine=restarted).keep_in_loop == []
    restarted.dispose()
    assert desk.deliver(due + timedelta(days=29)) == []
    # The next is due a full period after this one.
    assert [p.reference for p in desk.sweep(due + PERIOD).keep_in_loop if p.reference == first] == [first]
    assert len(desk.queued(first)) == 2


def test_without_a_pending_date_it_says_so(desk):
    desk = desk()
    _, plain = desk.references
    due = desk.opened(plain) + PERIOD
    desk.sweep(due)
    [mail] = [m for to, m in desk.deliver(due) if to == "carol@other.test"]
    assert "No date is set for the next step yet" in _words(mail) and "Next date" not in _words(mail)


def test_a_reply_to_the_reporter_starts_the_period_again(desk):
    desk = desk()
    first, _ = desk.references
    replied = desk.opened(first) + timedelta(days=20)
    with write_session(desk.engine) as session:
        ticket = session.scalars(select(Ticket).where(Ticket.reference == first)).one()
        correspondence.reply(session, desk.settings, ticket, "We reproduced it.", now=replied, actor="ana")
    assert first not in [p.reference for p in desk.sweep(replied + timedelta(days=25)).keep_in_loop]
    assert [p.reference for p in desk.sweep(replied + PERIOD).keep_in_loop if p.reference == first] == [first]


@pytest.mark.parametrize("state", ["waiting", "resolved", "closed", "disclosed"])
def test_nothing_for_a_ticket_not_being_worked_on(desk, cli, state):
    desk = desk()
    first, _ = desk.references
    desk.set(first, state=state)
    later = desk.opened(first) + 3 * PERIOD
    assert first not in [p.reference for p in desk.sweep(later).keep_in_loop]
    listed = json.loads(cli("reminders", first, "--now", later.isoformat(), "--json").output)
    assert listed["keep-in-loop"]["why_not"] == f"the ticket is {state}: not being worked on"


@pytest.mark.parametrize("values, why", [
    ({"reporter_unreachable_at": datetime(2026, 1, 1, tzinfo=timezone.utc)}, "the reporter is unreachable"),
    ({"reporter": "security@example.com"}, "the reporter is one of intake's own addresses"),
])
def test_nothing_to_an_unreachable_reporter_or_to_intake_itself(desk, cli, values, why):
    desk = desk()
    first, _ = desk.references
    desk.set(first, **values)
    later = desk.opened(first) + 3 * PERIOD
    assert first not in [p.reference for p in desk.sweep(later).keep_in_loop]
    assert not [m for _, m in desk.deliver(later) if m["Subject"].startswith((f"Re: [{first}]", f"[{first}] Reporter"))]
    shown = cli("reminders", first, "--now", later.isoformat()).output
    assert f"to reporter: no keep-in-loop mail (30 days without mail): {why}" in shown


def test_an_imported_ticket_counts_from_its_import(desk):
    desk = desk()
    first, _ = desk.references
    imported = desk.opened(first) + timedelta(days=10)
    desk.set(first, imported_at=imported)
    assert first not in [p.reference for p in desk.sweep(imported + PERIOD - timedelta(minutes=1)).keep_in_loop]
    assert first in [p.reference for p in desk.sweep(imported + PERIOD).keep_in_loop]


def test_dry_run_shows_the_mail_and_sends_nothing(desk, cli):
    desk = desk()
    first, _ = desk.references
    due = desk.opened(first) + PERIOD + timedelta(minutes=5)
    shown = cli("sweep", "--now", due.isoformat(), "--dry-run").output
    assert f"{first} keep-in-loop to {REPORTER}" in shown and "2 keep-in-loop mail(s) to reporters" in shown
    planned = json.loads(cli("sweep", "--now", due.isoformat(), "--dry-run", "--json").output)["keep-in-loop"]
    assert {p["ticket"] for p in planned} == set(desk.references)
    assert desk.queued(first) == [] and desk.deliver(due) == []


def test_encrypted_to_the_reporters_key(desk, cli, tmp_path):
    keys = Keys(tmp_path)
    desk = desk(INTAKE_OPENPGP__KEY_FILE=str(keys.org_file))
    first, _ = desk.references
    cli("key", first, str(keys.reporter_public))
    due = desk.opened(first) + PERIOD
    desk.sweep(due)
    [mail] = [m for to, m in desk.deliver(due) if to == REPORTER]
    assert "still being worked on" not in mail.as_string()
    assert "is still being worked on" in " ".join(_decrypted(mail, keys.reporter).split())


def test_intake_reminders_lists_mail_to_the_reporter_beside_mail_to_maintainers(desk, cli):
    desk = desk()
    first, _ = desk.references
    due = desk.opened(first) + PERIOD
    before = json.loads(cli("reminders", first, "--now", (due - timedelta(days=1)).isoformat(), "--json").output)
    assert [(s["audience"], s["kind"], s["status"]) for s in before["sent"] if s["audience"] == "reporter"] == [
        ("reporter", "acknowledgement", "sent")]
    assert {s["audience"] for s in before["sent"]} == {"reporter", "maintainers"}
    assert [n for n in before["next"] if n["audience"] == "reporter"] == [
        {"stage": None, "kind": "keep-in-loop", "point": "after 30 days", "at": due.isoformat(),
         "audience": "reporter"}]
    assert [n["kind"] for n in cli_json(cli, first, due)["due_now"] if n["audience"] == "reporter"] == ["keep-in-loop"]

    desk.sweep(due)
    desk.deliver(due)
    cli("close", first, "--reason", "invalid", "--quiet")
    after = cli_json(cli, first, due + timedelta(hours=1))
    assert [s["kind"] for s in after["sent"] if s["audience"] == "reporter"] == ["acknowledgement", "keep-in-loop"]
    assert [(s["kind"], s["to"]) for s in after["sent"] if s["kind"] == "keep-in-loop-notice"] == [
        ("keep-in-loop-notice", ["ana@maintainers.test", "bo@maintainers.test"])]
    assert {s["audience"] for s in after["sent"] if s["kind"] == "keep-in-loop-notice"} == {"maintainers"}
    assert [(s["kind"], s["point"], s["why"]) for s in after["suppressed"] if s["audience"] == "reporter"] == [
        ("progress-update", "closed", "--quiet")]
    shown = cli("reminders", first, "--now", (due + timedelta(hours=1)).isoformat()).output
    assert f"to reporter: keep-in-loop queued {due.isoformat()} to {REPORTER} (sent)" in shown
    assert "to maintainers: new-ticket" in shown
    assert "to reporter: progress-update closed" in shown and "--quiet" in shown


def cli_json(cli, reference: str, now: datetime) -> dict:  # type: ignore[no-untyped-def,type-arg]
    return json.loads(cli("reminders", reference, "--now", now.isoformat(), "--json").output)


@pytest.mark.postgres
def test_two_nodes_sweeping_at_once_send_one_mail_per_period(desk):
    desk = desk()
    due = max(desk.opened(reference) for reference in desk.references) + PERIOD
    results: list[reminders.SweepResult] = []
    start = threading.Barrier(2, timeout=30)

    def node() -> None:
        engine = make_engine(desk.settings.database_url)  # a sweeper of its own, as another node has
        start.wait()
        results.append(desk.sweep(due, engine=engine))
        engine.dispose()

    threads = [threading.Thread(target=node) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(p.reference for result in results for p in result.keep_in_loop) == sorted(desk.references)
    with read_session(desk.engine) as session:
        keys = list(session.scalars(select(Outbox.dedupe_key).where(Outbox.kind == "keep-in-loop")))
    assert len(keys) == 2 and {key.split(":")[1] for key in keys} == set(desk.references)
    assert all(len(desk.queued(reference)) == 1 for reference in desk.references)


def test_readme_shows_the_keep_in_loop_mail_as_the_template_renders_it():
    rendered = composer.render(
        "keep-in-loop.txt.j2", None, reference="SEC-2026-0001", subject="Auth bypass in admin",
        reporter_name="Alice Researcher", period="30 days",
        next_date=composer.PromisedDate("Fix released (target)", datetime(2027, 1, 4, 7, 0, tzinfo=timezone.utc),
                                        "Australia/Brisbane"),
        from_name="Example Security", intake_address="security@example.com")
    assert readme_example("Keep-in-loop") == rendered


@pytest.mark.parametrize("text, span", [("30 days", timedelta(days=30)), ("36 hours", timedelta(hours=36)),
                                        ("", None), (None, None)])
def test_keep_in_loop_is_elapsed_time_of_a_day_or_more(text, span):
    policy = PolicyConfig(auto_ack_counts=True, keep_in_loop=text,
                          stages=[{"name": "acknowledge", "duration": "1 days"}])
    assert policy.keep_in_loop_span == span


@pytest.mark.parametrize("text", ["2 business days", "12 hours", "0 days", "a month"])
def test_keep_in_loop_refuses_business_time_less_than_a_day_and_nonsense(text):
    with pytest.raises(ValidationError):
        PolicyConfig(auto_ack_counts=True, keep_in_loop=text, stages=[{"name": "acknowledge", "duration": "1 days"}])
