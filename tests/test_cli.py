"""The operator CLI against a real database filled over real SMTP."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest

from conftest import process, report, smtp_send


@pytest.fixture
def two_tickets(make_settings, start_intake_listener):
    settings = make_settings()
    running = start_intake_listener(settings)
    smtp_send(running.port, report(subject="Stored XSS in comments", message_id="<one@researcher.test>"))
    message = report(subject="Open redirect", sender="bob@researcher.test", message_id="<two@researcher.test>")
    message.add_attachment(b"GET /redirect?to=evil HTTP/1.1\r\n", maintype="text", subtype="plain",
                           filename="../../etc/poc.txt")
    smtp_send(running.port, message, mail_from="bob@researcher.test")
    process(settings, running.engine)
    return running


def _ref(n: int) -> str:
    return f"SEC-{datetime.now(timezone.utc).year}-{n:04d}"


def test_tickets_lists_as_table_and_json(cli, two_tickets):
    table = cli("tickets").output
    assert table.splitlines()[0].split()[:3] == ["REFERENCE", "STATE", "SEVERITY"]
    assert _ref(1) in table and _ref(2) in table and "Open redirect" in table
    data = json.loads(cli("tickets", "--json").output)
    assert [t["reference"] for t in data] == [_ref(1), _ref(2)]
    assert data[1] | {"received_at": None, "next_due": None} == {
        "reference": _ref(2), "subject": "Open redirect", "reporter": "bob@researcher.test", "state": "new",
        "severity": None, "policy": "vaixus", "assignee": None, "received_at": None, "imported_at": None,
        "close_reason": None,
        "cvss_vector": None, "cvss_score": None, "labels": [], "next_due": None, "breached": False,
        "due_soon": False}
    assert data[1]["next_due"]["stage"] == "acknowledge"  # vaixus: a person acknowledges within 72 hours
    assert json.loads(cli("tickets", "--state", "new", "--json").output) == data
    assert json.loads(cli("tickets", "--state", "closed", "--json").output) == []


def test_show_gives_ticket_thread_and_events(cli, two_tickets):
    data = json.loads(cli("show", _ref(2), "--json").output)
    assert data["reference"] == _ref(2)
    [report_entry, ack_entry] = data["thread"]
    assert report_entry["kind"] == "report" and report_entry["message_id"] == "<two@researcher.test>"
    [attachment] = report_entry["attachments"]
    assert attachment["filename"] == "poc.txt"  # no path: safe to write anywhere
    assert attachment["original_filename"] == "../../etc/poc.txt"
    assert attachment["size"] == len(b"GET /redirect?to=evil HTTP/1.1\r\n")
    assert ack_entry["kind"] == "automatic" and ack_entry["direction"] == "out"
    assert [e["kind"] for e in data["events"]] == ["opened", "acknowledgement-queued"]
    assert data["messages"][0]["decision"] == "new-ticket"

    human = cli("show", _ref(2).lower()).output  # references are case-insensitive
    assert "Open redirect" in human and "attachment 1: poc.txt" in human and "opened" in human


def test_show_unknown_reference_fails(cli, two_tickets):
    result = cli("show", "SEC-1999-0001", code=1)
    assert "no ticket SEC-1999-0001" in result.output


def test_outbox_lists_queued_acknowledgements(cli, two_tickets):
    data = json.loads(cli("outbox", "--json").output)
    assert sorted(d["key"] for d in data) == [f"ack:{_ref(1)}", f"ack:{_ref(2)}"]
    assert {d["status"] for d in data} == {"pending"}
    assert "ack:" in cli("outbox").output


def test_reprocess_needs_an_id_or_failed(cli, two_tickets):
    assert "give a stored message ID or --failed" in cli("reprocess", code=2).output
    assert "no stored message 999" in cli("reprocess", "999", code=1).output
    assert "nothing to reprocess" in cli("reprocess", "--failed").output
    assert "is not failed or ignored" in cli("reprocess", "1").output


def test_reprocess_failed_opens_the_ticket(cli, make_settings, start_intake_listener, tmp_path):
    templates = tmp_path / "broken-templates"
    templates.mkdir()
    (templates / "acknowledgement.txt.j2").write_text("{% if %}")  # a syntax error in the operator's template
    settings = make_settings(INTAKE_INTAKE__TEMPLATES_DIR=str(templates))
    running = start_intake_listener(settings)
    smtp_send(running.port, report(message_id="<later@researcher.test>"))
    assert len(process(settings, running.engine).failed) == 1
    assert json.loads(cli("tickets", "--json").output) == []

    (templates / "acknowledgement.txt.j2").unlink()
    from intake.send.composer import _environment
    _environment.cache_clear()
    output = cli("reprocess", "--failed").output
    assert f"opened {_ref(1)}" in output
    assert json.loads(cli("show", _ref(1), "--json").output)["messages"][0]["status"] == "processed"


def test_check_config_reports_ok(cli):
    assert "OK" in cli("check-config").output


def test_attachment_writes_the_exact_bytes_safely(cli, two_tickets, tmp_path):
    target = tmp_path / "out" / "poc.bin"
    target.parent.mkdir()
    cli("attachment", _ref(2), "1", "-o", str(target))
    assert target.read_bytes() == b"GET /redirect?to=evil HTTP/1.1\r\n"
    assert target.stat().st_mode & 0o777 == 0o600  # a stranger's file: not world-readable
    shown = json.loads(cli("show", _ref(2), "--json").output)["thread"][0]["attachments"][0]
    import hashlib
    assert hashlib.sha256(target.read_bytes()).hexdigest() == shown["sha256"]
    assert "exists" in cli("attachment", _ref(2), "1", "-o", str(target), code=1).output
    target.write_bytes(b"old")
    cli("attachment", _ref(2), "1", "-o", str(target), "--force")
    assert target.read_bytes() == b"GET /redirect?to=evil HTTP/1.1\r\n"
    assert cli("attachment", _ref(2), "1", "-o", "-").stdout_bytes.startswith(b"GET /redirect")


def test_attachment_number_out_of_range_or_unknown_ticket(cli, two_tickets, tmp_path):
    assert "has 1 attachment(s); there is no number 2" in cli("attachment", _ref(2), "2", "-o",
                                                             str(tmp_path / "x"), code=1).output
    assert "has 0 attachment(s)" in cli("attachment", _ref(1), "1", "-o", str(tmp_path / "x"), code=1).output
    assert "no ticket" in cli("attachment", "SEC-1999-0009", "1", "-o", str(tmp_path / "x"), code=1).output
    assert not (tmp_path / "x").exists()


def test_attachment_never_follows_a_symlink_and_replaces_with_mode_0600(cli, two_tickets, tmp_path):
    """Finding 11: `-o F --force` with F a symbolic link wrote through it, keeping the target's mode."""
    victim = tmp_path / "authorized_keys"
    victim.write_bytes(b"ssh-ed25519 AAAA maintainer\n")
    victim.chmod(0o644)
    link = tmp_path / "out.bin"
    link.symlink_to(victim)
    for force in ([], ["--force"]):
        result = cli("attachment", _ref(2), "1", "-o", str(link), *force, code=1)
        assert "symbolic link" in result.output
    assert victim.read_bytes() == b"ssh-ed25519 AAAA maintainer\n" and link.is_symlink()

    existing = tmp_path / "existing.bin"
    existing.write_bytes(b"old")
    existing.chmod(0o644)
    cli("attachment", _ref(2), "1", "-o", str(existing), "--force")
    assert existing.read_bytes() == b"GET /redirect?to=evil HTTP/1.1\r\n"
    assert existing.stat().st_mode & 0o777 == 0o600  # a new file, not the old one's mode
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".partial")) == []
    assert "cannot write" in cli("attachment", _ref(2), "1", "-o", str(tmp_path / "no" / "such"), code=1).output


def test_tickets_lists_open_tickets_unless_all(cli, two_tickets):
    """Closed tickets were listed by default; now --open (the default) hides finished ones and --all
    shows them too. Asking for a state shows its tickets, finished or not."""
    cli("close", _ref(1), "--reason", "invalid")
    assert [t["reference"] for t in json.loads(cli("tickets", "--json").output)] == [_ref(2)]
    assert [t["reference"] for t in json.loads(cli("tickets", "--open", "--json").output)] == [_ref(2)]
    listed = json.loads(cli("tickets", "--all", "--json").output)
    assert [t["reference"] for t in listed] == [_ref(2), _ref(1)]  # the closed one has no next deadline: last
    assert listed[1]["state"] == "closed" and listed[1]["next_due"] is None
    assert [t["reference"] for t in json.loads(cli("tickets", "--state", "closed", "--json").output)] == [_ref(1)]
    assert _ref(1) not in cli("tickets").output and _ref(1) in cli("tickets", "--all").output


def test_tickets_unknown_state_is_a_usage_error_naming_the_states(cli, two_tickets):
    """`--state bogus` printed "no tickets" and exited 0."""
    result = cli("tickets", "--state", "bogus", code=2)
    assert "'bogus' is not one of" in result.output
    for state in ("new", "waiting", "acknowledged", "assessed", "released", "resolved", "disclosed", "closed"):
        assert f"'{state}'" in result.output
    assert "no tickets" not in result.output
    cli("tickets", "--state", "assessed")  # a milestone's state is a state


def test_version_prints_the_installed_version(cli):
    from importlib.metadata import version

    assert cli("--version").output == f"intake {version('intake')}\n"
