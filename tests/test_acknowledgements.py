"""The acknowledgement says only what will happen: each date it promises is a stage its policy
tracks, unmet and reminded of, stated as stored; the policy is named by its title; and README's
copies of the three shipped acknowledgements are what the code renders."""

from __future__ import annotations

import email
import email.policy
import re
from datetime import datetime, timedelta, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import select, update

from conftest import all_tickets, deliver_outbox, process, report, smtp_send
from intake.store.db import read_session, write_session
from intake.store.models import Deadline, InboundMessage
from intake.vocabulary import MILESTONE_SPEC

SHIPPED_POLICIES = ("vaixus", "vectis-mail", "emailconnect")
RECEIVED = datetime(2026, 12, 18, 5, 0, tzinfo=timezone.utc)  # a Friday, 15:00 in Brisbane
README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture
def database_url(sqlite_url: str) -> str:
    return sqlite_url


def _preview(cli, policy: str) -> str:  # type: ignore[no-untyped-def]
    return cli("sla", "explain", "--policy", policy, "--received", RECEIVED.isoformat(), "--acknowledgement").output


def _stated(body: str) -> dict[str, list[str]]:
    """What the acknowledgement's "What happens next" promises: each stage's label and its dates
    (one, or one per group of severities, earliest first)."""
    if "What happens next" not in body:
        return {}
    section = body.split("What happens next\n-----------------\n")[1].split("\n\n")[0]
    stated: dict[str, list[str]] = {}
    label = ""
    for line in section.splitlines():
        if match := re.fullmatch(r"- (.+?): by (.+)", line):
            stated[match[1]] = [match[2]]
        elif match := re.fullmatch(r"- (.+?), depending on how severe we find the issue", line):
            label = match[1]
            stated[label] = []
        elif match := re.fullmatch(r"  - (.+) severity: by (.+)", line):
            stated[label].append(match[2])
        else:
            assert line == "  when we assess it:", line
    return stated


def _local(due: datetime, zone: str) -> str:
    """*due* as a reporter reads it: in the policy's zone, with UTC beside it when that is not UTC."""
    text = due.astimezone(ZoneInfo(zone)).strftime("%a %d %b %Y %H:%M %Z")
    return text if zone == "UTC" else text + due.astimezone(timezone.utc).strftime(" (%d %b %H:%M UTC)")


def _stored(engine, ticket_id: int) -> list[Deadline]:  # type: ignore[no-untyped-def]
    with read_session(engine) as session:
        return list(session.scalars(select(Deadline).where(Deadline.ticket_id == ticket_id)
                                    .order_by(Deadline.position)))


def _acknowledged_over_smtp(make_settings, start_intake_listener, sink, policy: str):  # type: ignore[no-untyped-def]
    """One report received at RECEIVED under *policy*, over the listener; its acknowledgement
    delivered through the outbox to the sink. Returns settings, engine, ticket and the body."""
    settings = make_settings(INTAKE_INTAKE__DEFAULT_POLICY=policy, INTAKE_OUTBOUND__TRANSPORT="smtp",
                             INTAKE_OUTBOUND__RELAY=f"127.0.0.1:{sink.port}")
    running = start_intake_listener(settings)
    smtp_send(running.port, report())
    with write_session(running.engine) as session:  # as if it had arrived at RECEIVED
        session.execute(update(InboundMessage).values(received_at=RECEIVED))
    now = RECEIVED + timedelta(seconds=30)
    process(settings, running.engine, now=now)
    assert deliver_outbox(settings, running.engine, now=now) == {"sent": 1}
    [delivered] = sink.wait_for(1)
    message = email.message_from_bytes(delivered.data, policy=email.policy.default)
    [ticket] = all_tickets(running.engine)
    return settings, running.engine, ticket, message.get_content().replace("\r\n", "\n")


@pytest.mark.parametrize("policy_name", SHIPPED_POLICIES)
def test_each_shipped_policy_promises_exactly_its_tracked_unmet_reminded_stages_as_stored(
        make_settings, start_intake_listener, sink, cli, policy_name):
    settings, engine, ticket, body = _acknowledged_over_smtp(make_settings, start_intake_listener, sink, policy_name)
    policy = settings.policies[policy_name]
    stored = _stored(engine, ticket.id)
    tracked = [row for row in stored if row.met_at is None and row.due_at is not None and row.notify_at is not None]
    assert tracked, "every shipped policy has a stage left to promise"
    stated = _stated(body)
    labels = {stage.name: MILESTONE_SPEC[stage.milestone].stage_label for stage in policy.stages}
    assert list(stated) == [labels[row.stage] for row in tracked]
    zone = settings.all_calendars[policy.calendar].timezone
    for row in tracked:
        # The first (or only) date is the stored one; a severity-dependent stage states more only
        # while severity is unknown.
        assert stated[labels[row.stage]][0] == _local(row.due_at, zone)
        assert (len(stated[labels[row.stage]]) > 1) == row.severity_assumed
    # The policy by its title, never by its key.
    assert f'our security policy, "{policy.title}".' in body
    assert policy_name not in body
    # What the reporter got is what `intake sla explain --acknowledgement` (and README) shows.
    assert body == _preview(cli, policy_name)


def test_an_acknowledgement_that_counts_promises_no_person_and_one_that_does_not_does(
        make_settings, start_intake_listener, sink):
    settings, engine, ticket, body = _acknowledged_over_smtp(make_settings, start_intake_listener, sink,
                                                             "emailconnect")
    [acknowledge] = [row for row in _stored(engine, ticket.id) if row.stage == "acknowledge"]
    assert acknowledge.met_at is not None  # `intake show` has it met at once ...
    assert "Acknowledgement by a person" not in body and "a person" not in body  # ... and the mail agrees
    assert "This automatic reply is our acknowledgement of your report." in body
    assert list(_stated(body)) == ["Initial assessment", "Resolution (target)"]
    assert "Initial assessment: by Fri 25 Dec 2026 05:00 UTC" in body  # 7 days from receipt


def test_a_person_is_promised_where_only_a_person_acknowledges(cli, make_settings):
    make_settings()
    body = _preview(cli, "vaixus")
    assert _stated(body) == {"Acknowledgement by a person": ["Mon 21 Dec 2026 05:00 UTC"]}  # 72 hours
    assert "our acknowledgement" not in body


def test_severity_dependent_dates_are_the_ones_the_stage_gets_once_severity_is_set(
        make_settings, start_intake_listener, sink, cli):
    settings, engine, ticket, body = _acknowledged_over_smtp(make_settings, start_intake_listener, sink,
                                                             "vectis-mail")
    strictest, otherwise = _stated(body)["Fix released (target)"]
    assert "  - critical or high severity: by " + strictest in body
    assert "  - any other severity: by " + otherwise in body
    zone = settings.all_calendars["aest"].timezone

    def fix_due() -> str:
        [fix] = [row for row in _stored(engine, ticket.id) if row.stage == "fix"]
        return _local(fix.due_at, zone)

    assert fix_due() == strictest == "Sun 17 Jan 2027 15:00 AEST (17 Jan 05:00 UTC)"  # 30 days
    for severity, stated in (("medium", otherwise), ("low", otherwise), ("none", otherwise),
                             ("high", strictest), ("critical", strictest)):
        cli("severity", ticket.reference, severity)
        assert fix_due() == stated, severity
    assert otherwise == "Thu 18 Mar 2027 15:00 AEST (18 Mar 05:00 UTC)"  # 90 days


def _edit_config(config_file: Path, old: str, new: str) -> None:
    text = config_file.read_text(encoding="utf-8")
    assert old in text
    config_file.write_text(text.replace(old, new, 1), encoding="utf-8")


def test_a_policy_url_is_given_a_missing_title_is_the_description_and_nothing_is_promised_when_nothing_is_left(
        cli, config_file, make_settings):
    make_settings()
    _edit_config(config_file, 'title = "Vaixus Technologies Security Policy (June 2026)"\n',
                 'title = "Vaixus Technologies Security Policy (June 2026)"\n'
                 'url = "https://vaixus.example/security-policy"\n')
    _edit_config(config_file, 'title = "Vectis Mail security policy (SECURITY.md)"\n', "")
    vaixus = _preview(cli, "vaixus")
    assert ('These dates follow our security policy, "Vaixus Technologies Security Policy (June 2026)":\n'
            "https://vaixus.example/security-policy\n") in vaixus
    assert 'our security policy, "Vectis Mail SECURITY.md".' in _preview(cli, "vectis-mail")
    # Where the automatic reply meets vaixus' only stage, nothing is left to promise, and it says none.
    _edit_config(config_file, 'calendar = "utc"\nauto_ack_counts = false\n', 'calendar = "utc"\nauto_ack_counts = true\n')
    bare = _preview(cli, "vaixus")
    assert _stated(bare) == {} and "These dates" not in bare
    assert ('This automatic reply is our acknowledgement of your report.\n\n'
            'We handle your report under our security policy, "Vaixus Technologies Security Policy (June 2026)":\n'
            "https://vaixus.example/security-policy\n") in bare


def test_a_policy_whose_clocks_stop_while_waiting_says_its_dates_move(cli, config_file, make_settings):
    make_settings()
    _edit_config(config_file, "auto_ack_counts = true\npause_while_waiting = false\n",
                 "auto_ack_counts = true\npause_while_waiting = true\n")
    body = _preview(cli, "emailconnect")
    assert "When we ask you a question, these dates move later by the time we wait\nfor your answer." in body
    assert "these dates move later" not in _preview(cli, "vectis-mail")


def test_a_policy_url_must_be_https(cli, config_file, make_settings):
    make_settings()
    _edit_config(config_file, 'title = "EmailConnect responsible disclosure policy"\n',
                 'title = "EmailConnect responsible disclosure policy"\nurl = "http://emailconnect.example/"\n')
    assert "https://" in cli("check-config", code=78).output


def test_readme_shows_each_shipped_acknowledgement_as_the_code_renders_it(cli, make_settings):
    make_settings()
    blocks = re.findall(r"```text\n\$ (intake sla explain [^\n]* --acknowledgement)\n(.*?)```",
                        README.read_text(encoding="utf-8"), re.DOTALL)
    shown = {re.search(r"--policy (\S+)", command)[1]: (command, text) for command, text in blocks}
    assert sorted(shown) == sorted(SHIPPED_POLICIES)
    for command, text in shown.values():
        assert text == cli(*command.split()[1:]).output, command


def test_severities_that_end_at_one_instant_are_one_date(cli, config_file, make_settings):
    make_settings()
    # "7 days" and "168 hours" differ as text (so the stage depends on severity) but end together.
    _edit_config(config_file, 'name = "assess"\nduration = "7 days"\n',
                 'name = "assess"\nduration = "7 days"\nby_severity = { critical = "168 hours" }\n')
    body = _preview(cli, "emailconnect")
    assert "\n- Initial assessment: by Fri 25 Dec 2026 05:00 UTC\n" in body and "severity" not in body
