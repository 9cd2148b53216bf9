"""Digests: sections for a seeded database, once per period, DST-correct schedules, the scheduler's
jobs, and the `intake sweep|digest|reminders` commands."""

from __future__ import annotations

import email
import email.policy
import json
import os
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from conftest import process, report
from intake.run import scheduler
from intake.send import outbox
from intake.sla import digest
from intake.store import inbound, schema
from intake.store.db import make_engine, write_session
from intake.tickets import milestones, triage
from intake.tickets import milestones, reads

UTC = timezone.utc
INTAKE = Path(sys.executable).parent / "intake"
MAINTAINERS = '[{"name": "Mia", "email": "mia@example.com"}]'
DIGESTS = """
[scheduler.digests.morning]
cron = "0 8 * * mon-fri"
timezone = "Australia/Brisbane"
recipients = ["team@example.com"]
due_within = "48 hours"
disclosures_within = "14 days"

[scheduler.digests.berlin]
cron = "0 8 * * *"
timezone = "Europe/Berlin"
send_empty = true
"""


@pytest.fixture
def desk(make_settings, config_file):
    config_file.write_text(config_file.read_text() + DIGESTS)

    class Desk:
        settings = make_settings(INTAKE_MAINTAINERS=MAINTAINERS, INTAKE_INTAKE__DEFAULT_POLICY="vectis-mail")
        engine = make_engine(settings.database_url)
        schema.upgrade(engine)

        def open(self, received: datetime, subject: str, sender: str = "alice@researcher.test",
                 policy: str | None = None) -> str:
            rcpt = f"security+{policy}@example.com" if policy else "security@example.com"
            inbound.store(self.engine, [inbound.Arrival(sender, [rcpt], "127.0.0.1", "test",
                                                        report(subject=subject, sender=sender).as_bytes(), received)])
            [reference] = process(self.settings, self.engine, received).tickets_opened
            return reference

        def change(self, reference: str, change) -> None:  # type: ignore[no-untyped-def]
            with write_session(self.engine) as session:
                change(session, self.settings, reads.find(session, reference))

    return Desk()


def _sections(built: digest.Digest) -> dict[str, list[str]]:
    return {key: section["tickets"] for key, section in built.as_dict()["sections"].items()}


def test_digest_sections_for_a_seeded_database(desk):
    now = datetime(2026, 6, 10, 22, 0, tzinfo=UTC)  # Thu 11 Jun 08:00 in Brisbane: a scheduled time
    day = timedelta(days=1)
    # Old enough that its acknowledgement breached (due 2 business days after Mon 1 Jun).
    breached = desk.open(datetime(2026, 6, 1, 0, 0, tzinfo=UTC), "Breached one")
    # Received Tuesday: acknowledge due Thursday 22:00 UTC, within the next 48 hours of *now*.
    due_soon = desk.open(now - 2 * day + timedelta(hours=1), "Due soon one")
    # Acknowledged and assessed, then waiting on the reporter.
    waiting = desk.open(datetime(2026, 6, 8, 0, 0, tzinfo=UTC), "Waiting one")
    at = datetime(2026, 6, 8, 1, 0, tzinfo=UTC)
    desk.change(waiting, lambda s, st, t: milestones.record(s, st, t, "acknowledged", at=at, now=at, actor="mia"))
    desk.change(waiting, lambda s, st, t: milestones.assess(s, st, t, "high", at=at, now=at, actor="mia"))
    desk.change(waiting, lambda s, st, t: milestones.wait(s, st, t, now=at, actor="mia"))
    # Released: disclosure due 7 days after, inside the 14-day window.
    disclosing = desk.open(datetime(2026, 6, 2, 0, 0, tzinfo=UTC), "<script>Disclosing</script> one")
    at = datetime(2026, 6, 9, 0, 0, tzinfo=UTC)
    for milestone in ("acknowledged", "assessed", "released"):
        desk.change(disclosing, lambda s, st, t, m=milestone: milestones.record(s, st, t, m, at=at, now=at,
                                                                                actor="mia"))
    # New since the previous scheduled digest (Wed 08:00 Brisbane = Tue 22:00 UTC).
    new = desk.open(now - timedelta(hours=3), "New one")
    resolved = desk.open(datetime(2026, 6, 1, 1, 0, tzinfo=UTC), "Resolved one")
    at = datetime(2026, 6, 2, 0, 0, tzinfo=UTC)
    for milestone in ("acknowledged", "assessed", "resolved"):
        desk.change(resolved, lambda s, st, t, m=milestone: milestones.record(s, st, t, m, at=at, now=at,
                                                                              actor="mia"))

    built = digest.build(desk.engine, desk.settings, "morning", now)
    assert built.period == now and built.since == now - day
    sections = _sections(built)
    assert sections["new"] == [new]
    assert sections["due_soon"] == [due_soon]  # acknowledge due Thu 09:00 Brisbane, in an hour
    assert set(sections["breached"]) == {breached}  # acknowledge and assess; never the resolved one
    assert sections["waiting"] == [waiting]
    assert sections["disclosures"] == [disclosing]
    assert built.counts["new"]["unassessed"] == 3  # breached, due soon, new
    assert built.counts["waiting"]["high"] == 1 and "resolved" not in built.counts

    mail = digest.render(desk.settings, built, ["team@example.com"])
    parsed = email.message_from_bytes(mail.raw, policy=email.policy.default)
    assert parsed.get_content_type() == "multipart/alternative"
    text = parsed.get_body(("plain",)).get_content()
    html = parsed.get_body(("html",)).get_content()
    assert "Waiting on the reporter (1)" in text and waiting in text
    assert "&lt;script&gt;Disclosing&lt;/script&gt;" in html and "<script>Disclosing" not in html
    assert "Thu 11 Jun 2026 08:00 AEST" in parsed["Subject"]
    # The footer carries the `intake stats` figures for the last 90 days.
    assert built.metrics.tickets == 6
    acknowledge = next(stage for stage in built.metrics.stages if stage.stage == "acknowledge")
    assert (acknowledge.met, acknowledge.open_breaches) == (3, 1)
    assert "Metrics over the last 90 days" in text and "6 ticket(s) received since" in text
    assert "by decision: new-ticket 6" in text and "Metrics over the last 90 days" in html


def test_finished_tickets_are_never_breached_nor_counted_open(desk, cli):
    now = datetime(2026, 6, 10, 22, 0, tzinfo=UTC)  # acknowledge and assess long past due for all four
    still_open = desk.open(datetime(2026, 6, 1, 0, 0, tzinfo=UTC), "Still open")
    invalid = desk.open(datetime(2026, 6, 1, 0, 1, tzinfo=UTC), "Closed as invalid", sender="bob@researcher.test")
    duplicate = desk.open(datetime(2026, 6, 1, 0, 2, tzinfo=UTC), "Closed as duplicate",
                          sender="carol@researcher.test")
    merged = desk.open(datetime(2026, 6, 1, 0, 3, tzinfo=UTC), "Merged", sender="dave@researcher.test")
    at = datetime(2026, 6, 2, 0, 0, tzinfo=UTC)
    for reference, reason in ((invalid, "invalid"), (duplicate, "duplicate")):
        desk.change(reference, lambda s, st, t, r=reason: triage.close(s, st, t, r, now=at, actor="mia"))
    desk.change(merged, lambda s, st, t: triage.merge(s, st, t, reads.find(s, still_open), now=at, actor="mia"))

    built = digest.build(desk.engine, desk.settings, "morning", now)
    breached = built.as_dict()["sections"]["breached"]
    assert breached["tickets"] == [still_open, still_open]  # its acknowledge and assess; no closed one
    assert breached["total"] == 2
    assert set(built.counts) == {"new"} and sum(built.counts["new"].values()) == 1  # open tickets only
    text = digest.text(desk.settings, built)
    assert "Breached (past due, not met) (2)" in text
    assert not {invalid, duplicate, merged} & set(text.split())
    data = json.loads(cli("digest", "morning", "--now", now.isoformat(), "--preview", "--json").output)
    assert data["sections"]["breached"]["total"] == 2 and set(data["sections"]["breached"]["tickets"]) == {still_open}
    assert set(data["counts"]) == {"new"}


def test_a_digest_goes_once_per_period_and_missed_periods_are_not_sent_in_a_burst(desk):
    desk.open(datetime(2026, 6, 1, 0, 0, tzinfo=UTC), "Something")
    monday = datetime(2026, 6, 7, 22, 5, tzinfo=UTC)  # Mon 8 Jun 08:05 Brisbane
    assert digest.send(desk.engine, desk.settings, "morning", monday).status == "sent"
    assert digest.send(desk.engine, desk.settings, "morning", monday + timedelta(hours=1)).status == "already-sent"
    # Down Tuesday to Thursday morning: one digest, for Thursday, nothing for Tuesday or Wednesday.
    thursday = datetime(2026, 6, 10, 23, 0, tzinfo=UTC)
    outcome = digest.send(desk.engine, desk.settings, "morning", thursday)
    assert outcome.status == "sent" and outcome.digest.key == "digest:morning:2026-06-10T22:00Z"
    assert outcome.digest.since == datetime(2026, 6, 7, 22, 0, tzinfo=UTC)  # new since the last digest sent
    sent = [row for row in outbox.listing(desk.engine) if row.kind == "digest"]
    assert sorted(row.dedupe_key for row in sent) == ["digest:morning:2026-06-07T22:00Z",
                                                      "digest:morning:2026-06-10T22:00Z"]
    assert all(row.recipients == ["team@example.com"] for row in sent)


def test_an_empty_digest_is_skipped_unless_configured(desk):
    now = datetime(2026, 6, 8, 6, 0, tzinfo=UTC)
    assert digest.send(desk.engine, desk.settings, "morning", now).status == "empty"
    assert digest.send(desk.engine, desk.settings, "berlin", now).status == "sent"  # send_empty = true
    [row] = [row for row in outbox.listing(desk.engine) if row.kind == "digest"]
    assert row.recipients == ["mia@example.com"]  # no recipients of its own: the maintainers


@pytest.mark.parametrize(("zone_cron", "before", "after"), [
    # Europe/Berlin springs forward on Sun 29 Mar 2026: 08:00 is 07:00 UTC before, 06:00 UTC after.
    ("berlin", datetime(2026, 3, 28, 7, 0, tzinfo=UTC), datetime(2026, 3, 29, 6, 0, tzinfo=UTC)),
    # ... and falls back on Sun 25 Oct 2026.
    ("berlin", datetime(2026, 10, 24, 6, 0, tzinfo=UTC), datetime(2026, 10, 25, 7, 0, tzinfo=UTC)),
])
def test_a_digest_schedule_keeps_its_local_time_across_a_dst_change(desk, zone_cron, before, after):
    outcomes = [digest.send(desk.engine, desk.settings, zone_cron, at + timedelta(minutes=1)) for at in (before, after)]
    assert [o.digest.period for o in outcomes] == [before, after]
    assert [o.digest.period.astimezone(o.digest.period.tzinfo).hour for o in outcomes] == [8, 8]
    # An hour after the old UTC time but before the new local 08:00 it is still the previous period.
    assert digest.send(desk.engine, desk.settings, zone_cron, after - timedelta(minutes=1)).status == "already-sent"
    trigger = desk.settings.scheduler.digests[zone_cron].trigger()
    assert trigger.get_next_fire_time(None, before + timedelta(minutes=1)) == after


def test_sydney_weekday_digest_across_the_october_change(make_settings, config_file):
    config_file.write_text(config_file.read_text() + DIGESTS.replace("Australia/Brisbane", "Australia/Sydney"))
    schedule = make_settings().scheduler.digests["morning"]
    # Sydney moves to AEDT on Sun 4 Oct 2026: Friday 08:00 is 22:00 UTC, Monday 08:00 is 21:00 UTC.
    friday = digest.latest_fire_time(schedule.trigger(), datetime(2026, 10, 4, 12, 0, tzinfo=UTC))
    monday = digest.latest_fire_time(schedule.trigger(), datetime(2026, 10, 5, 12, 0, tzinfo=UTC))
    assert friday == datetime(2026, 10, 1, 22, 0, tzinfo=UTC)
    assert monday == datetime(2026, 10, 4, 21, 0, tzinfo=UTC)


def test_scheduler_jobs_coalesce_and_skip_misfires(desk):
    jobs = scheduler.build_scheduler(desk.engine, desk.settings)
    jobs.start(paused=True)
    try:
        by_id = {job.id: job for job in jobs.get_jobs()}
        assert set(by_id) == {"sweep", "purge", "digest:morning", "digest:berlin"}
        for job in by_id.values():
            assert job.coalesce and job.max_instances == 1
            assert job.misfire_grace_time == int(desk.settings.scheduler.misfire_grace)
        # No digest is fired for a time that passed before start-up.
        assert by_id["digest:morning"].next_run_time > datetime.now(UTC)
        assert by_id["sweep"].trigger.interval == timedelta(seconds=desk.settings.scheduler.sweep_interval)
        # The daily purge ([retention] is set in the shipped config), never at start-up itself.
        assert by_id["purge"].trigger.interval == timedelta(days=1)
        assert by_id["purge"].next_run_time > datetime.now(UTC) + timedelta(minutes=5)
    finally:
        jobs.shutdown(wait=False)


# -- the commands ---------------------------------------------------------------------------------


def test_digest_command_previews_and_sends(desk, cli, config_file, monkeypatch):
    desk.open(datetime(2026, 6, 1, 0, 0, tzinfo=UTC), "Something")
    now = "2026-06-07T22:05:00+00:00"
    preview = cli("digest", "morning", "--now", now, "--preview")
    assert 'intake digest "morning" for Mon 08 Jun 2026 08:00 AEST' in preview.output
    assert "Breached (past due, not met) (1)" in preview.output
    data = json.loads(cli("digest", "morning", "--now", now, "--preview", "--json").output)
    assert data["status"] == "preview" and data["sections"]["breached"]["total"] == 1
    assert [r for r in outbox.listing(desk.engine) if r.kind == "digest"] == []
    assert "queued (digest:morning:2026-06-07T22:00Z)" in cli("digest", "morning", "--now", now, "--send").output
    assert "was sent already" in cli("digest", "morning", "--now", now, "--send").output
    assert "no digest schedule 'evening'" in cli("digest", "evening", "--send", code=1).output
    assert "give --preview or --send" in cli("digest", "morning", code=2).output
    assert "no UTC offset" in cli("digest", "morning", "--preview", "--now", "2026-06-07T22:00", code=2).output


def test_sweep_and_reminders_commands(desk, cli):
    reference = desk.open(datetime(2026, 6, 1, 0, 0, tzinfo=UTC), "Something")
    now = "2026-06-03T01:00:00+00:00"  # acknowledge (due Wed 3 Jun 10:00 Brisbane) breached an hour ago
    dry = json.loads(cli("sweep", "--now", now, "--dry-run", "--json").output)
    assert dry["dry_run"] and [n["key"] for n in dry["notifications"]] == [f"breach:{reference}:acknowledge:0"]
    done = json.loads(cli("sweep", "--now", now, "--json").output)
    assert [n["key"] for n in done["notifications"]] == [f"breach:{reference}:acknowledge:0"]
    assert json.loads(cli("sweep", "--now", now, "--json").output)["notifications"] == []
    assert "queued 0 mail(s)" in cli("sweep", "--now", now).output
    listed = json.loads(cli("reminders", reference, "--now", now, "--json").output)
    assert [(s["kind"], s["audience"]) for s in listed["sent"]] == [
        ("new-ticket", "maintainers"), ("breach", "maintainers"), ("acknowledgement", "reporter")]
    assert {"stage": "acknowledge", "kind": "breach", "point": "repeat 1",
            "at": "2026-06-04T00:00:00+00:00", "audience": "maintainers"} in listed["next"]
    assert "acknowledge breach repeat 1" in cli("reminders", reference, "--now", now).output
    assert "no ticket SEC-1999-0001" in cli("reminders", "SEC-1999-0001", code=1).output


def test_two_sweep_processes_on_one_database_never_double_send(desk, config_file):
    references = [desk.open(datetime(2026, 6, 1, 0, n, tzinfo=UTC), f"Report {n}", sender=f"r{n}@researcher.test")
                  for n in range(30)]
    env = {key: value for key, value in os.environ.items() if not key.startswith("INTAKE_")}
    env.update(INTAKE_DATABASE__URL=desk.settings.database_url, INTAKE_MAINTAINERS=MAINTAINERS,
               INTAKE_INTAKE__DEFAULT_POLICY="vectis-mail")
    command = [str(INTAKE), "--config", str(config_file), "sweep", "--now", "2026-06-03T01:00:00Z", "--json"]
    runs = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    outputs = [run.communicate(timeout=120) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs
    sent = [n["key"] for out, _ in outputs for n in json.loads(out)["notifications"]]
    assert sorted(sent) == sorted(f"breach:{ref}:acknowledge:0" for ref in references)
    assert sorted(row.dedupe_key for row in outbox.listing(desk.engine) if row.kind != "acknowledgement"
                  and row.kind != "new-ticket") == sorted(f"{key}>mia@example.com" for key in sent)
