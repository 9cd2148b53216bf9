"""Triage and correspondence through the real CLI: assign, severity/CVSS, labels, close/reopen,
merge, reply, note, and the `intake tickets` filters. Tickets come in over real SMTP; replies go
out through the relay transport to a real SMTP server in the test."""

from __future__ import annotations

import email
import email.policy
import json
import os
import pwd
import sys
from datetime import datetime, timezone

import pytest

from conftest import deliver_outbox, process, report, smtp_send
from intake.send import outbox
from intake.tickets import reads
from intake.vocabulary import StageState

# Ana's login is the Unix account running the tests: the CLI records changes as the account of its uid.
MAINTAINERS = f"""
[[maintainers]]
name = "Ana Maintainer"
email = "ana@maintainers.test"
login = "{pwd.getpwuid(os.getuid()).pw_name}"

[[maintainers]]
name = "Bo Triager"
email = "bo@maintainers.test"
"""

QUICK_POLICIES = """
[policies.instant]
calendar = "utc"
auto_ack_counts = false

[[policies.instant.stages]]
name = "acknowledge"
duration = "0 minutes"

[policies.relaxed]
calendar = "utc"
auto_ack_counts = false
due_soon = "100 days"

[[policies.relaxed.stages]]
name = "acknowledge"
duration = "30 days"
"""


@pytest.fixture
def desk(make_settings, start_intake_listener, config_file, sink, monkeypatch):
    """Two tickets from two reporters, maintainers configured, outbound mail through the sink."""
    config_file.write_text(config_file.read_text() + MAINTAINERS + QUICK_POLICIES)
    settings = make_settings(INTAKE_OUTBOUND__TRANSPORT="smtp", INTAKE_OUTBOUND__RELAY=f"127.0.0.1:{sink.port}",
                             INTAKE_INTAKE__POLICY_BY_ADDRESS='{"security+now@example.com": "instant", '
                                                              '"security+later@example.com": "relaxed"}')
    running = start_intake_listener(settings)
    smtp_send(running.port, report(subject="SQL injection in search", message_id="<first@alice.test>"))
    smtp_send(running.port, report(subject="Same SQL injection", sender="carol@other.test",
                                   message_id="<second@carol.test>"), mail_from="carol@other.test")
    refs = process(settings, running.engine).tickets_opened
    deliver_outbox(settings, running.engine)
    sink.wait_for(2)
    sink.messages.clear()
    return settings, running, refs


def _events(engine, reference: str, kind: str):  # type: ignore[no-untyped-def]
    return [e for e in reads.ticket_detail(engine, reference).events if e.kind == kind]


# -- assign, severity, labels ----------------------------------------------------------------


def test_assign_to_a_maintainer_by_name_login_or_email(desk, cli):
    _, running, (first, second) = desk
    assert "assigned to ana@maintainers.test" in cli("assign", first, "ana").output
    cli("assign", second, "Bo Triager")
    assert reads.ticket_detail(running.engine, second).ticket.assignee == "bo@maintainers.test"
    [event] = _events(running.engine, first, "assigned")
    assert event.actor == "Ana Maintainer"  # the account running the CLI is her login
    assert "is not a maintainer" in cli("assign", first, "mallory@evil.test", code=1).output
    listed = json.loads(cli("tickets", "--assignee", "bo@maintainers.test", "--json").output)
    assert [t["reference"] for t in listed] == [second]


def test_severity_with_a_cvss_vector_is_validated_and_scored(desk, cli):
    _, running, (first, _) = desk
    out = cli("severity", first, "critical", "--cvss", "CVSS:3.1/AV:N/AC:L/PR:N/UI:N/S:U/C:H/I:H/A:H").output
    assert "CVSS 9.8" in out and "warning" not in out
    ticket = reads.ticket_detail(running.engine, first).ticket
    assert (ticket.severity, ticket.cvss_score) == ("critical", 9.8)
    assert ticket.cvss_vector == "CVSS:3.1/AV:N/AC:L/PR:N/UI:N/S:U/C:H/I:H/A:H"
    v4 = "CVSS:4.0/AV:N/AC:L/AT:N/PR:N/UI:N/VC:H/VI:H/VA:H/SC:N/SI:N/SA:N"
    assert "CVSS 9.3" in cli("severity", first, "critical", "--cvss", v4).output
    assert "rates critical, not low" in cli("severity", first, "low", "--cvss", v4).output


@pytest.mark.parametrize("vector, message", [
    ("CVSS:3.1/AV:X/AC:L/PR:N/UI:N/S:U/C:H/I:H/A:H", "invalid CVSS vector"),
    ("CVSS:4.0/AV:N", "invalid CVSS vector"),
    ("AV:N/AC:L/Au:N/C:P/I:P/A:P", "not a CVSS v3.x or v4.0 vector"),
])
def test_bad_cvss_vectors_are_refused_and_change_nothing(desk, cli, vector, message):
    _, running, (first, _) = desk
    assert message in cli("severity", first, "high", "--cvss", vector, code=1).output
    ticket = reads.ticket_detail(running.engine, first).ticket
    assert (ticket.severity, ticket.cvss_vector) == (None, None)


def test_labels_added_removed_and_filtered(desk, cli):
    _, running, (first, second) = desk
    cli("label", first, "web", "sqli")
    cli("label", second, "web")
    cli("label", first, "--remove", "web")
    assert reads.ticket_detail(running.engine, first).ticket.labels == ["sqli"]
    assert [t["reference"] for t in json.loads(cli("tickets", "--label", "web", "--json").output)] == [second]
    assert "invalid label" in cli("label", first, "Bad Label!", code=1).output


# -- close and reopen --------------------------------------------------------------------------


def test_close_needs_a_release_to_be_fixed_and_reopen_restores(desk, cli):
    _, running, (first, _) = desk
    assert "no release recorded" in cli("close", first, "--reason", "fixed", code=1).output
    assert "Invalid value for '--reason'" in cli("close", first, "--reason", "meh", code=2).output
    cli("close", first, "--reason", "invalid")
    ticket = reads.ticket_detail(running.engine, first).ticket
    assert (ticket.state, ticket.close_reason) == ("closed", "invalid")
    assert "already closed" in cli("close", first, "--reason", "spam", code=1).output
    assert [t["reference"] for t in json.loads(cli("tickets", "--state", "closed", "--json").output)] == [first]
    cli("reopen", first)
    ticket = reads.ticket_detail(running.engine, first).ticket
    assert (ticket.state, ticket.close_reason) == ("new", None)
    assert "is not closed" in cli("reopen", first, code=1).output
    cli("close", first, "--reason", "fixed", "--force")


def test_no_disclosure_before_a_release_without_force(desk, cli):
    _, running, (first, _) = desk
    cli("ack", first)
    cli("assess", first, "--severity", "high")
    assert "is not released yet" in cli("disclose", first, code=1).output
    cli("released", first, "--version", "2.0.1")
    cli("disclose", first)
    assert reads.ticket_detail(running.engine, first).ticket.state == "disclosed"


# -- merge --------------------------------------------------------------------------------------


def test_merge_moves_the_thread_closes_the_duplicate_and_tells_its_reporter(desk, cli, sink):
    settings, running, (first, second) = desk
    cli("merge", second, first)
    merged = reads.ticket_detail(running.engine, first)
    duplicate = reads.ticket_detail(running.engine, second)
    assert (duplicate.ticket.state, duplicate.ticket.close_reason) == ("closed", "duplicate")
    assert {"kind": "duplicate-of", "reference": first} in duplicate.ticket.links
    assert {"kind": "duplicate", "reference": second} in merged.ticket.links
    assert "<second@carol.test>" in [e.message_id for e in merged.entries]
    assert deliver_outbox(settings, running.engine) == {"sent": 1}
    [notice] = sink.wait_for(1)
    assert notice.rcpt_tos == ["carol@other.test"]
    parsed = email.message_from_bytes(notice.data, policy=email.policy.default)
    assert parsed["Subject"] == f"Re: [{second}] Same SQL injection"
    assert parsed["In-Reply-To"] == "<second@carol.test>"
    assert first in parsed.get_content()
    # Carol answers the notice: her reply lands in the merged ticket.
    answer = report(subject=f"Re: [{second}] Same SQL injection", sender="carol@other.test",
                    In_Reply_To=parsed["Message-ID"])
    smtp_send(running.port, answer, mail_from="carol@other.test")
    process(settings, running.engine)
    assert answer["Message-ID"] in [e.message_id for e in reads.ticket_detail(running.engine, first).entries]
    assert "closed" in cli("merge", first, second, code=1).output


# -- correspondence -----------------------------------------------------------------------------


def test_reply_reaches_the_reporter_from_the_intake_address_and_acknowledges(desk, cli, sink):
    settings, running, (first, _) = desk
    cli("reply", first, "--message", "Thanks, we can reproduce it.", "--cc", "coordinator@cert.test")
    assert deliver_outbox(settings, running.engine) == {"sent": 1}
    [mail] = sink.wait_for(1)
    assert sorted(mail.rcpt_tos) == ["alice@researcher.test", "coordinator@cert.test"]
    assert mail.mail_from == "security@example.com"  # not the null sender: a person wrote this
    parsed = email.message_from_bytes(mail.data, policy=email.policy.default)
    assert parsed["From"].addresses[0].addr_spec == "security@example.com"
    assert parsed["Subject"] == f"Re: [{first}] SQL injection in search"
    assert parsed["In-Reply-To"] == "<first@alice.test>" and "<first@alice.test>" in parsed["References"]
    assert parsed["Auto-Submitted"] is None
    assert "Thanks, we can reproduce it." in parsed.get_content()
    assert b"maintainers.test" not in mail.data  # the researcher never sees a maintainer's address
    detail = reads.ticket_detail(running.engine, first)
    assert [e.kind for e in detail.entries if e.direction == "out"][-1] == "correspondence"
    [milestone] = [e for e in detail.events if e.kind == "milestone"]
    assert milestone.detail["milestone"] == "acknowledged" and milestone.actor == "Ana Maintainer"
    stages = json.loads(cli("show", first, "--json").output)["stages"]
    assert stages[0]["state"] == "met"


def test_reply_text_from_a_file_or_the_editor_and_empty_sends_nothing(desk, cli, tmp_path, monkeypatch):
    _, running, (first, _) = desk
    text_file = tmp_path / "reply.txt"
    text_file.write_text("From a file.\n")
    cli("reply", first, "--file", str(text_file))
    editor = tmp_path / "editor.py"
    editor.write_text("import sys\nopen(sys.argv[1], 'w').write('From the editor.\\n# dropped\\n')\n")
    monkeypatch.setenv("EDITOR", f"{sys.executable} {editor}")
    cli("reply", first)
    assert "message is empty" in cli("reply", first, "--message", "  \n", code=1).output
    bodies = [e.body_text for e in reads.ticket_detail(running.engine, first).entries if e.kind == "correspondence"]
    assert bodies == ["From a file.\n", "From the editor.\n"]
    assert len([r for r in outbox.listing(running.engine) if r.kind == "correspondence"]) == 2


def test_a_note_stays_internal(desk, cli):
    _, running, (first, _) = desk
    before = len(outbox.listing(running.engine))
    cli("note", first, "-m", "Looks like CVE-2024-1234 again.")
    [entry] = [e for e in reads.ticket_detail(running.engine, first).entries if e.kind == "note"]
    assert (entry.direction, entry.sender) == ("internal", "Ana Maintainer")
    assert len(outbox.listing(running.engine)) == before
    assert "Looks like CVE-2024-1234" in cli("show", first).output


# -- listing ------------------------------------------------------------------------------------


def test_tickets_sorted_by_next_deadline_and_filtered_by_breach(desk, cli, sink):
    settings, running, (first, second) = desk
    smtp_send(running.port, report(subject="breaches at once"), rcpt_tos=["security+now@example.com"])
    smtp_send(running.port, report(subject="due in a month"), rcpt_tos=["security+later@example.com"])
    instant, relaxed = process(settings, running.engine).tickets_opened
    listed = json.loads(cli("tickets", "--json").output)
    # Next deadline first: the instant one (already due), the two 72-hour ones, the 30-day one.
    assert [t["reference"] for t in listed] == [instant, first, second, relaxed]
    assert [t["reference"] for t in json.loads(cli("tickets", "--breached", "--json").output)] == [instant]
    assert [t["reference"] for t in json.loads(cli("tickets", "--due-soon", "--json").output)] == [relaxed]
    assert [t["reference"] for t in json.loads(cli("tickets", "--policy", "relaxed", "--json").output)] == [relaxed]
    by_receipt = json.loads(cli("tickets", "--sort", "received", "--json").output)
    assert [t["reference"] for t in by_receipt] == [first, second, instant, relaxed]
    assert "BREACHED" in cli("tickets").output
    year = datetime.now(timezone.utc).year
    assert all(t["reference"].startswith(f"SEC-{year}-") for t in listed)


def test_a_finished_ticket_shows_its_unmet_stages_as_closed_not_breached(desk, cli, sink):
    """Past due and closed as invalid: nothing is left to meet, so nothing of it is breached (as the
    sweep, the digest and `intake stats` count it), in `intake show` as in the listing."""
    settings, running, _ = desk
    for subject in ("breaches at once", "breaches at once too"):
        smtp_send(running.port, report(subject=subject), rcpt_tos=["security+now@example.com"])
    closed, still_open = process(settings, running.engine).tickets_opened
    cli("close", closed, "--reason", "invalid")
    closed_stages = json.loads(cli("show", closed, "--json").output)["stages"]
    open_stages = json.loads(cli("show", still_open, "--json").output)["stages"]
    assert closed_stages and {stage["state"] for stage in closed_stages} == {StageState.CLOSED}
    assert StageState.BREACHED in {stage["state"] for stage in open_stages}
    assert "breached" not in cli("show", closed).output
    assert [t["reference"] for t in json.loads(cli("tickets", "--all", "--breached", "--json").output)] == [still_open]
