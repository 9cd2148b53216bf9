"""`intake stats` and :func:`intake.sla.stats.compute` over tickets opened by real SMTP (or stored as
received days ago)."""

from __future__ import annotations

import json
import time
from datetime import datetime, timedelta, timezone

import pytest

from conftest import process, report, smtp_send
from intake.sla import stats
from intake.store import inbound
from intake.store.db import make_engine
from intake.tickets import reads


@pytest.fixture
def three_tickets(make_settings, start_intake_listener, cli):
    """Three reports under the vaixus policy (acknowledge within 72 hours), a duplicate and a spam;
    the first two acknowledged 10 and 20 ms after receipt."""
    settings = make_settings()
    running = start_intake_listener(settings)
    for number in range(3):
        smtp_send(running.port, report(subject=f"Report {number}", message_id=f"<r{number}@researcher.test>"))
    smtp_send(running.port, report(subject="Report 0", message_id="<r0@researcher.test>"))  # the same again
    smtp_send(running.port, report(subject="Cheap pills", X_Spam_Flag="YES"))
    refs = process(settings, running.engine).tickets_opened
    received = {ref: reads.ticket_detail(running.engine, ref).ticket.received_at for ref in refs}
    time.sleep(0.05)
    for ref, after in zip(refs[:2], (10, 20)):
        cli("ack", ref, "--at", (received[ref] + timedelta(milliseconds=after)).isoformat())
    return running.engine, refs, received


def test_stage_times_on_time_share_and_breaches(three_tickets):
    engine, refs, received = three_tickets
    start = min(received.values())
    later = start + timedelta(days=10)  # the third ticket's 72 hours are long gone
    figures = stats.compute(engine, since=start - timedelta(days=1), now=later)
    [acknowledge] = figures.stages
    assert acknowledge.stage == "acknowledge" and acknowledge.met == 2 and acknowledge.met_on_time == 2
    assert acknowledge.median_seconds == pytest.approx(0.015)
    assert acknowledge.p90_seconds == pytest.approx(0.020)
    assert acknowledge.open_breaches == 1
    assert acknowledge.on_time_share == pytest.approx(2 / 3)
    assert figures.tickets == 3
    assert figures.by_state == {"acknowledged": 2, "new": 1}
    assert figures.by_severity == {"unassessed": 3}
    assert figures.by_decision == {"new-ticket": 3, "duplicate": 1, "spam": 1}
    text = figures.render_text()
    assert "3 ticket(s) received since" in text and "67%" in text and "by decision: new-ticket 3" in text

    # Before the deadline there is no breach; a window after every receipt counts nothing.
    assert stats.compute(engine, start - timedelta(days=1), start + timedelta(hours=1)).stages[0].open_breaches == 0
    empty = stats.compute(engine, later, later)
    assert empty.tickets == 0 and empty.stages == [] and empty.by_decision == {}


def test_stats_command_prints_text_and_json(cli, three_tickets):
    data = json.loads(cli("stats", "--json").output)
    assert data["tickets"] == 3 and data["by_decision"]["spam"] == 1
    [acknowledge] = data["stages"]
    assert acknowledge == {"stage": "acknowledge", "met": 2, "met_on_time": 2,
                           "median_seconds": pytest.approx(0.015), "p90_seconds": pytest.approx(0.02),
                           "on_time_share": 1.0, "open_breaches": 0}
    assert datetime.fromisoformat(data["since"]) < datetime.now(timezone.utc) - timedelta(days=89)
    text = cli("stats", "--since", "1d").output
    assert text.splitlines()[1].split() == ["STAGE", "MET", "MEDIAN", "P90", "ON", "TIME", "OPEN", "BREACHES"]
    tomorrow = (datetime.now(timezone.utc) + timedelta(days=1)).strftime("%Y-%m-%d")
    assert json.loads(cli("stats", "--since", tomorrow, "--json").output)["tickets"] == 0
    assert "--since" in cli("stats", "--since", "soon", code=2).output


def test_finished_tickets_are_not_open_breaches(make_settings, cli):
    """Closed for any reason, merged or resolved: past its deadlines, a ticket is no open breach."""
    settings = make_settings()
    engine = make_engine(settings.database_url)
    now = datetime.now(timezone.utc)
    received = now - timedelta(days=10)  # the vaixus policy's 72 hours to acknowledge are long gone
    refs = []
    for number in range(5):
        sender = f"r{number}@researcher.test"
        inbound.store(engine, [inbound.Arrival(sender, ["security@example.com"], "127.0.0.1", "test",
                                               report(subject=f"Report {number}", sender=sender).as_bytes(),
                                               received + timedelta(minutes=number))])
        refs += process(settings, engine, received + timedelta(minutes=number)).tickets_opened
    still_open, invalid, duplicate, merged, resolved = refs
    cli("close", invalid, "--reason", "invalid")
    cli("close", duplicate, "--reason", "duplicate")
    cli("merge", merged, still_open)
    cli("resolve", resolved, "--force")

    [acknowledge] = stats.compute(engine, received - timedelta(days=1), now).stages
    assert acknowledge.open_breaches == 1
    [acknowledge] = json.loads(cli("stats", "--json").output)["stages"]
    assert acknowledge["open_breaches"] == 1 and acknowledge["on_time_share"] == 0.0
