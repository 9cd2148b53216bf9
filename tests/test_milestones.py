"""Stored deadlines, milestones, waiting, `intake sla explain|recompute` and the stages in `intake show`.

Tickets are opened over real SMTP into a real database; the CLI runs against the same config.
Where a state depends on the time, the service functions get an explicit ``now``.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import inspect, select

from conftest import process, report, smtp_send
from intake.sla import deadlines
from intake.sla.engine import DEFAULT_MET_BY
from intake.store.db import read_session, write_session
from intake.store.models import Deadline
from intake.tickets import credit, milestones
from intake.tickets.opening import STAGE_LABELS
from intake.tickets import milestones, reads

PAUSING_POLICY = """
[policies.pausing]
calendar = "utc"
auto_ack_counts = true
pause_while_waiting = true
due_soon = "2 days"

[[policies.pausing.stages]]
name = "acknowledge"
duration = "24 hours"

[[policies.pausing.stages]]
name = "assess"
duration = "7 days"
"""


@pytest.fixture
def open_ticket(make_settings, start_intake_listener, config_file):
    """Open one ticket under *policy* over SMTP; returns (settings, engine, reference)."""

    def open_(policy: str = "vectis-mail", extra_config: str = ""):  # type: ignore[no-untyped-def]
        if extra_config:
            config_file.write_text(config_file.read_text() + extra_config)
        settings = make_settings(INTAKE_INTAKE__DEFAULT_POLICY=policy)
        running = start_intake_listener(settings)
        smtp_send(running.port, report(subject="RCE in the importer"))
        [reference] = process(settings, running.engine).tickets_opened
        return settings, running.engine, reference

    return open_


def stored_deadlines(engine, reference: str) -> dict[str, Deadline]:  # type: ignore[no-untyped-def]
    with read_session(engine) as session:
        ticket = reads.find(session, reference)
        return {d.stage: d for d in session.scalars(select(Deadline).where(Deadline.ticket_id == ticket.id))}


def received_at(engine, reference: str) -> datetime:  # type: ignore[no-untyped-def]
    return reads.ticket_detail(engine, reference).ticket.received_at


# -- stored deadlines --------------------------------------------------------------------------


def test_a_new_ticket_stores_every_stage_of_its_policy(open_ticket):
    _, engine, reference = open_ticket("vectis-mail")
    received = received_at(engine, reference)
    stored = stored_deadlines(engine, reference)
    assert sorted(stored, key=lambda s: stored[s].position) == ["acknowledge", "assess", "fix", "disclose"]
    # fix: severity unknown, so the strictest duration (30 days, critical/high) applies, and says so.
    assert stored["fix"].due_at == received + timedelta(days=30) and stored["fix"].severity_assumed
    assert stored["disclose"].due_at is None and stored["disclose"].started_at is None
    # vectis-mail wants a human acknowledgement: the automatic one does not meet the stage.
    assert stored["acknowledge"].met_at is None
    assert "business days in Australia/Brisbane" in stored["acknowledge"].basis


def test_where_the_automatic_acknowledgement_counts_it_meets_the_stage(open_ticket):
    _, engine, reference = open_ticket("emailconnect")
    stored = stored_deadlines(engine, reference)
    assert stored["acknowledge"].met_at is not None
    assert stored["acknowledge"].met_at <= stored["acknowledge"].due_at
    assert stored["assess"].met_at is None


def test_unmet_deadlines_are_indexed_by_due(open_ticket):
    _, engine, _ = open_ticket()
    indexes = {index["name"]: index["column_names"] for index in inspect(engine).get_indexes("deadline")}
    assert indexes["ix_deadline_unmet_due"] == ["due_at"]


# -- milestones --------------------------------------------------------------------------------


def test_milestones_in_order_meet_their_stages_and_start_disclosure(open_ticket, cli):
    _, engine, reference = open_ticket("vectis-mail")
    cli("ack", reference)
    out = cli("assess", reference, "--severity", "low").output
    assert "fix due" in out  # the severity moved the fix deadline
    cli("released", reference, "--version", "1.4.2")
    stored = stored_deadlines(engine, reference)
    received = received_at(engine, reference)
    assert stored["acknowledge"].met_at and stored["assess"].met_at and stored["fix"].met_at
    assert stored["fix"].due_at == received + timedelta(days=90) and not stored["fix"].severity_assumed
    assert stored["disclose"].due_at == stored["fix"].met_at + timedelta(days=7)
    detail = reads.ticket_detail(engine, reference)
    assert detail.ticket.state == "released" and detail.ticket.severity == "low"
    recorded = [e for e in detail.events if e.kind == "milestone"]
    assert [e.detail["milestone"] for e in recorded] == ["acknowledged", "assessed", "released"]
    assert recorded[2].detail["version"] == "1.4.2" and all(e.actor for e in recorded)
    cli("disclose", reference)
    cli("resolve", reference)
    assert reads.ticket_detail(engine, reference).ticket.state == "resolved"
    assert all(d.met_at for d in stored_deadlines(engine, reference).values())


def test_a_milestone_out_of_order_is_refused_unless_forced(open_ticket, cli):
    _, engine, reference = open_ticket("vectis-mail")
    refused = cli("released", reference, code=1).output
    assert "is not assessed yet" in refused and "`intake assess`" in refused and "--force" in refused
    assert not [e for e in reads.ticket_detail(engine, reference).events if e.kind == "milestone"]
    cli("released", reference, "--force")
    [event] = [e for e in reads.ticket_detail(engine, reference).events if e.kind == "milestone"]
    assert event.detail == {"milestone": "released", "at": event.detail["at"], "forced": True}


def test_a_milestone_twice_in_the_future_or_before_its_predecessor_is_refused(open_ticket, cli):
    _, engine, reference = open_ticket("vectis-mail")
    cli("ack", reference)
    assert "is already acknowledged" in cli("ack", reference, code=1).output
    future = (datetime.now(timezone.utc) + timedelta(hours=1)).isoformat()
    assert "is in the future" in cli("assess", reference, "--severity", "high", "--at", future, code=1).output
    before = (received_at(engine, reference) - timedelta(minutes=1)).isoformat()
    assert "before" in cli("assess", reference, "--severity", "high", "--at", before, "--force", code=1).output
    assert "no UTC offset" in cli("ack", reference, "--at", "2026-12-01T10:00:00", code=2).output
    assert "no ticket SEC-1999-0001" in cli("ack", "SEC-1999-0001", code=1).output
    assert reads.ticket_detail(engine, reference).ticket.severity is None


def test_a_milestone_dated_before_the_one_it_follows_is_refused(open_ticket):
    settings, engine, reference = open_ticket("vectis-mail")
    received = received_at(engine, reference)
    now = received + timedelta(days=3)
    with write_session(engine) as session:
        ticket = reads.find(session, reference)
        milestones.record(session, settings, ticket, "acknowledged", at=received + timedelta(days=2), now=now,
                          actor="ana")
        with pytest.raises(milestones.Refused, match="would come before acknowledged"):
            milestones.assess(session, settings, ticket, "high", at=received + timedelta(days=1), now=now,
                              actor="ana")


def test_severity_change_after_assessment_moves_the_fix_deadline(open_ticket):
    settings, engine, reference = open_ticket("vectis-mail")
    received = received_at(engine, reference)
    with write_session(engine) as session:
        ticket = reads.find(session, reference)
        milestones.record(session, settings, ticket, "acknowledged", at=received, now=received, actor="ana")
        milestones.assess(session, settings, ticket, "medium", at=received, now=received, actor="ana")
    assert stored_deadlines(engine, reference)["fix"].due_at == received + timedelta(days=90)
    with write_session(engine) as session:
        ticket = reads.find(session, reference)
        milestones.assess(session, settings, ticket, "critical", at=received + timedelta(days=1),
                          now=received + timedelta(days=1), actor="ana", force=True)
    assert stored_deadlines(engine, reference)["fix"].due_at == received + timedelta(days=30)


# -- states at a given time --------------------------------------------------------------------


def test_stage_states_follow_the_clock(open_ticket):
    settings, engine, reference = open_ticket("vaixus")  # acknowledge within 72 hours, by a person
    received = received_at(engine, reference)

    def ack_state(now: datetime) -> str:
        with read_session(engine) as session:
            [stage] = deadlines.stage_statuses(session, settings, reads.find(session, reference), now)
        return stage.state

    assert ack_state(received + timedelta(hours=1)) == "ok"
    assert ack_state(received + timedelta(hours=60)) == "due-soon"  # within 24 hours of the due time
    assert ack_state(received + timedelta(hours=73)) == "breached"
    with write_session(engine) as session:
        milestones.record(session, settings, reads.find(session, reference), "acknowledged",
                          at=received + timedelta(hours=80), now=received + timedelta(hours=80), actor="ana")
    assert ack_state(received + timedelta(hours=81)) == "met-late"


def test_show_lists_each_stage_with_due_met_and_state(open_ticket, cli):
    _, engine, reference = open_ticket("vectis-mail")
    cli("ack", reference)
    data = json.loads(cli("show", reference, "--json").output)
    by_stage = {stage["stage"]: stage for stage in data["stages"]}
    assert list(by_stage) == ["acknowledge", "assess", "fix", "disclose"]
    assert by_stage["acknowledge"]["state"] == "met" and by_stage["acknowledge"]["met_at"]
    assert by_stage["assess"]["state"] == "ok" and by_stage["assess"]["met_at"] is None
    assert by_stage["disclose"] == {**by_stage["disclose"], "state": "pending", "due": None}
    assert datetime.fromisoformat(by_stage["fix"]["due"]) == received_at(engine, reference) + timedelta(days=30)
    human = cli("show", reference).output
    assert "Deadlines:" in human and "AEST (+10:00)" in human and "pending" in human


# -- waiting on the reporter -------------------------------------------------------------------


def test_waiting_pauses_the_clocks_of_a_pausing_policy(open_ticket):
    settings, engine, reference = open_ticket("pausing", PAUSING_POLICY)
    received = received_at(engine, reference)
    with write_session(engine) as session:
        milestones.wait(session, settings, reads.find(session, reference), now=received + timedelta(days=1),
                        actor="ana")
    assert stored_deadlines(engine, reference)["assess"].due_at is None
    with read_session(engine) as session:
        statuses = deadlines.stage_statuses(session, settings, reads.find(session, reference),
                                            received + timedelta(days=2))
    assert {s.stage: s.state for s in statuses} == {"acknowledge": "met", "assess": "paused"}
    with write_session(engine) as session:
        milestones.resume(session, settings, reads.find(session, reference), now=received + timedelta(days=3),
                          actor="ana")
    assert stored_deadlines(engine, reference)["assess"].due_at == received + timedelta(days=9)
    assert reads.ticket_detail(engine, reference).ticket.state == "new"


def test_wait_and_resume_by_cli_and_a_reporter_reply_resumes(open_ticket, cli, start_intake_listener):
    settings, engine, reference = open_ticket("pausing", PAUSING_POLICY)
    assert "already" in (cli("wait", reference).output + cli("wait", reference, code=1).output)
    assert reads.ticket_detail(engine, reference).ticket.state == "waiting"
    assert stored_deadlines(engine, reference)["assess"].due_at is None
    cli("resume", reference)
    assert "is not waiting" in cli("resume", reference, code=1).output
    cli("wait", reference)
    running = start_intake_listener(settings)
    smtp_send(running.port, report(subject=f"Re: [{reference}] RCE in the importer"))
    process(settings, running.engine)
    assert reads.ticket_detail(engine, reference).ticket.state == "new"
    assert stored_deadlines(engine, reference)["assess"].due_at is not None  # its clock runs again


# -- sla explain -------------------------------------------------------------------------------


def test_sla_explain_json_gives_every_stage_with_offset_and_basis(cli):
    # Friday 15:00 in Brisbane, "2 business days" -> Tuesday 15:00.
    data = json.loads(cli("sla", "explain", "--policy", "vectis-mail", "--received", "2026-06-05T15:00:00+10:00",
                          "--json").output)
    assert data["policy"] == "vectis-mail"
    stages = {stage["stage"]: stage for stage in data["stages"]}
    assert list(stages) == ["acknowledge", "assess", "fix", "disclose"]
    assert stages["acknowledge"]["due"] == "2026-06-09T15:00:00+10:00"
    assert datetime.fromisoformat(stages["acknowledge"]["due"]) == datetime(2026, 6, 9, 5, tzinfo=timezone.utc)
    assert "2 business days in Australia/Brisbane" in stages["acknowledge"]["basis"]
    assert stages["disclose"]["due"] is None and "released" in stages["disclose"]["basis"]
    assert "strictest" in stages["fix"]["basis"]


def test_sla_explain_with_severity_and_release(cli):
    data = json.loads(cli("sla", "explain", "--policy", "vectis-mail", "--received", "2026-12-24T15:00:00+10:00",
                          "--severity", "medium", "--released", "2027-02-01T00:00:00Z", "--json").output)
    stages = {stage["stage"]: stage for stage in data["stages"]}
    assert datetime.fromisoformat(stages["fix"]["due"]) == datetime(2027, 3, 24, 5, tzinfo=timezone.utc)  # 90 days
    assert datetime.fromisoformat(stages["disclose"]["due"]) == datetime(2027, 2, 8, tzinfo=timezone.utc)
    # Christmas Eve: the holidays and the weekend after it are skipped, and named.
    assert "skipped Fri 25 Dec (Christmas Day), Sat 26 Dec (weekend)" in stages["acknowledge"]["basis"]


def test_sla_explain_for_people_gives_the_zone_and_utc(cli):
    out = cli("sla", "explain", "--policy", "vectis-mail", "--received", "2026-12-24T15:00:00+10:00").output
    assert "Tue 29 Dec 2026 15:00 AEST (+10:00) = 2026-12-29 05:00 UTC" in out
    assert "Christmas Day" in out


def test_sla_explain_refuses_unknown_policy_and_bad_input(cli):
    assert "no policy 'nope'" in cli("sla", "explain", "--policy", "nope", "--received", "2026-01-01T00:00Z",
                                     code=2).output
    assert "not an ISO 8601" in cli("sla", "explain", "--policy", "vaixus", "--received", "yesterday", code=2).output
    assert "Invalid value for '--severity'" in cli("sla", "explain", "--policy", "vaixus", "--received",
                                                   "2026-01-01T00:00Z", "--severity", "urgent", code=2).output


# -- sla recompute -----------------------------------------------------------------------------


def test_recompute_applies_a_changed_policy_to_stored_deadlines(open_ticket, cli, config_file, make_settings):
    _, engine, reference = open_ticket("vaixus")
    received = received_at(engine, reference)
    assert stored_deadlines(engine, reference)["acknowledge"].due_at == received + timedelta(hours=72)
    assert json.loads(cli("sla", "recompute", "--json").output)["changes"] == []  # nothing changed yet

    text = config_file.read_text()
    config_file.write_text(text.replace('name = "acknowledge"\nduration = "72 hours"',
                                        'name = "acknowledge"\nduration = "48 hours"', 1))
    make_settings(INTAKE_INTAKE__DEFAULT_POLICY="vaixus")  # the CLI reads the edited file
    result = json.loads(cli("sla", "recompute", "--json").output)
    assert result["tickets"] == 1
    [change] = result["changes"]
    assert change["reference"] == reference and change["stage"] == "acknowledge"
    assert datetime.fromisoformat(change["due_after"]) == received + timedelta(hours=48)
    assert stored_deadlines(engine, reference)["acknowledge"].due_at == received + timedelta(hours=48)
    assert json.loads(cli("sla", "recompute", "--json").output)["changes"] == []


def test_recompute_reports_a_ticket_whose_policy_is_gone_and_goes_on(open_ticket, cli, config_file, make_settings):
    _, engine, reference = open_ticket("pausing", PAUSING_POLICY)
    config_file.write_text(config_file.read_text().replace(PAUSING_POLICY, ""))
    make_settings()
    result = cli("sla", "recompute", "--json", code=1)
    assert "policy 'pausing' is not in the configuration" in json.loads(result.stdout)["errors"][reference]
    assert stored_deadlines(engine, reference)["assess"].due_at is not None  # kept as they were


def test_what_derives_from_the_milestones_declared_once():
    """MILESTONE_SPECS is the one declaration; the engine's defaults, the acknowledgement's stage
    names, the order checks, the state order and the credits are read from it."""
    assert DEFAULT_MET_BY == {"acknowledge": "acknowledged", "assess": "assessed", "fix": "released",
                              "resolve": "resolved", "disclose": "disclosed"}
    assert STAGE_LABELS["acknowledge"] == "Acknowledgement by a person" and STAGE_LABELS["fix"] == "Fix released (target)"
    assert milestones.FOLLOWS == {"acknowledged": (), "assessed": ("acknowledged",), "released": ("assessed",),
                                  "disclosed": ("released",), "resolved": ("assessed",)}
    # Resolved is the last state a milestone moves a ticket to, though disclosure can come after it.
    assert milestones._STATE_ORDER == ("new", "acknowledged", "assessed", "released", "disclosed", "resolved")
    assert set(credit.OUT_MILESTONES) == {"released", "disclosed", "resolved"}
