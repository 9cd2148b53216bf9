"""Credit: recognised in reports and replies sent over real SMTP, set with `intake credit`, listed
for release notes with `intake credits`."""

from __future__ import annotations

import json
import time
from datetime import datetime, timedelta, timezone

import pytest

from conftest import process, report, smtp_send
from intake.tickets import reads
from intake.understand import credit_words


@pytest.fixture
def open_reports(make_settings, start_intake_listener):
    """Send one report per body over SMTP and process them; returns (settings, engine, references)."""

    def open_(*bodies: str):  # type: ignore[no-untyped-def]
        settings = make_settings()
        running = start_intake_listener(settings)
        for number, body in enumerate(bodies):
            smtp_send(running.port, report(subject=f"Report {number}", body=body,
                                           message_id=f"<report{number}@researcher.test>"))
        opened = process(settings, running.engine).tickets_opened
        assert len(opened) == len(bodies)
        return settings, running, opened

    return open_


def shown_credit(cli, reference: str) -> dict | None:  # type: ignore[no-untyped-def]
    return json.loads(cli("show", reference, "--json").output)["credit"]


def test_a_stated_preference_is_recognised_when_the_ticket_opens(cli, open_reports):
    _, running, [named, anonymous, silent] = open_reports(
        "Steps to reproduce: ...\n\nPlease credit me as Jane Doe (@janed, https://jane.example). Thanks!\n",
        "The token leaks in the Referer header.\nPlease keep me anonymous.\n",
        "No credit card numbers leak, but the session id does.\n",
    )
    assert shown_credit(cli, named) == {
        "anonymous": False, "name": "Jane Doe", "handle": "@janed", "url": "https://jane.example",
        "source": "report",
        "statement": "Please credit me as Jane Doe (@janed, https://jane.example). Thanks!"}
    assert shown_credit(cli, anonymous)["anonymous"] is True
    assert shown_credit(cli, silent) is None  # "no credit card" is not a wish
    events = json.loads(cli("show", named, "--json").output)["events"]
    [event] = [e for e in events if e["kind"] == "credit-set"]
    assert event["actor"] == "intake" and event["detail"]["name"] == "Jane Doe"
    assert "credit: Jane Doe (@janed) (from report)" in cli("show", named).output


@pytest.mark.parametrize(("text", "expected"), [
    ("Credit: Bob Builder", ("Bob Builder", None, None, False)),
    ("I'd like to be credited as @bob_b", (None, "@bob_b", None, False)),
    ('I would like to be credited as "Carol C" https://carol.example/', ("Carol C", None, "https://carol.example/", False)),
    ("please credit me as J. R. Smith of Acme Corp.", ("J. R. Smith of Acme Corp", None, None, False)),
    ("No credit, please.", (None, None, None, True)),
    ("credit: none", (None, None, None, True)),
    ("I don't need any credit for this", (None, None, None, True)),
    ("> please credit me as Someone Quoted", None),
    ("We give no credit to scanners.", None),
])
def test_recognised_statements(text, expected):
    found = credit_words.recognise(f"Hello,\n{text}\n")
    assert (found and (found.name, found.handle, found.url, found.anonymous)) == (expected or None)


def test_a_reporter_reply_that_states_it_sets_the_credit(cli, open_reports):
    settings, running, [reference] = open_reports("Steps to reproduce: ...\n")
    reply = report(subject=f"Re: [{reference}] Report 0", message_id="<reply@researcher.test>",
                   body="Credit: Alice R. (https://alice.example)\n\nOn Mon, someone wrote:\n"
                        "please credit me as Someone Else\n",
                   In_Reply_To="<report0@researcher.test>")
    smtp_send(running.port, reply)
    process(settings, running.engine)
    assert shown_credit(cli, reference) | {"statement": None} == {
        "anonymous": False, "name": "Alice R", "handle": None, "url": "https://alice.example",
        "source": "reply", "statement": None}


def test_credit_command_shows_sets_and_clears(cli, open_reports):
    _, _, [reference] = open_reports("Steps to reproduce: ...\n")
    assert f"{reference}: no credit preference recorded" in cli("credit", reference).output
    out = cli("credit", reference, "--name", "Jane Doe", "--handle", "@janed", "--url", "https://jane.example").output
    assert "credited as Jane Doe (@janed) https://jane.example (from cli)" in out
    data = json.loads(cli("credit", reference, "--json").output)
    assert data["credit"]["name"] == "Jane Doe" and data["credit"]["source"] == "cli"
    cli("credit", reference, "--anonymous")
    assert shown_credit(cli, reference)["anonymous"] is True
    cli("credit", reference, "--clear")
    assert shown_credit(cli, reference) is None
    events = [e for e in json.loads(cli("show", reference, "--json").output)["events"] if e["kind"] == "credit-set"]
    assert [bool(e["detail"].get("cleared")) for e in events] == [False, False, True]
    assert all(e["actor"] != "intake" for e in events)  # the person at the keyboard


def test_credit_command_refuses_what_it_cannot_record(cli, open_reports):
    _, _, [reference] = open_reports("Steps to reproduce: ...\n")
    assert "one of them" in cli("credit", reference, "--name", "X", "--anonymous", code=2).output
    assert "not an http(s) URL" in cli("credit", reference, "--name", "X", "--url", "javascript:alert(1)",
                                       code=2).output
    assert "give a name or a handle" in cli("credit", reference, "--url", "https://x.example", code=2).output
    assert "no ticket SEC-1999-0001" in cli("credit", "SEC-1999-0001", "--name", "X", code=1).output
    assert shown_credit(cli, reference) is None


def _ship(cli, reference: str, at: datetime, milestone: str = "released") -> None:  # type: ignore[no-untyped-def]
    """Acknowledge, assess and then release (or resolve) *reference*, all at *at*."""
    stamp = at.isoformat()
    cli("ack", reference, "--at", stamp)
    cli("assess", reference, "--severity", "high", "--at", stamp)
    if milestone == "released":
        cli("released", reference, "--version", "1.4.2", "--at", stamp)
    else:
        cli(milestone, reference, "--at", stamp)


def test_credits_lists_tickets_that_went_out_since_a_date(cli, open_reports):
    _, running, [early, named, anonymous, unknown, still_open] = open_reports(
        "Credit: Early Bird\n", "Please credit me as Jane *Doe* [x](https://evil.example)\n",
        "Please keep me anonymous.\n", "Steps.\n", "Credit: Not Yet\n")
    received = reads.ticket_detail(running.engine, early).ticket.received_at
    _ship(cli, early, received + timedelta(milliseconds=1))
    # After every report was received (a milestone cannot be recorded before that), however long
    # the five deliveries took on a busy machine.
    last_received = max(reads.ticket_detail(running.engine, reference).ticket.received_at
                        for reference in (named, anonymous, unknown))
    cutoff = max(received, last_received) + timedelta(milliseconds=100)
    while datetime.now(timezone.utc) <= cutoff + timedelta(milliseconds=50):
        time.sleep(0.05)
    _ship(cli, named, cutoff + timedelta(milliseconds=10))
    _ship(cli, anonymous, cutoff + timedelta(milliseconds=20), milestone="resolve")
    _ship(cli, unknown, cutoff + timedelta(milliseconds=30))
    cli("ack", still_open)

    data = json.loads(cli("credits", "--since", cutoff.isoformat(), "--format", "json").output)
    assert [c["reference"] for c in data["credits"]] == [named, anonymous]
    first, second = data["credits"]
    assert first | {"at": None, "subject": None} == {
        "reference": named, "subject": None, "milestone": "released", "at": None, "version": "1.4.2",
        "anonymous": False, "name": "Jane Doe x", "handle": None, "url": "https://evil.example",
        "credited_as": "Jane Doe x"}
    assert second["anonymous"] is True and second["milestone"] == "resolved"
    assert second["credited_as"] == "anonymous reporter"
    assert data["without_preference"] == [unknown]

    everything = json.loads(cli("credits", "--format", "json").output)
    assert [c["reference"] for c in everything["credits"]] == [early, named, anonymous]

    text = cli("credits", "--since", cutoff.isoformat()).output
    assert f"{named}  released" in text and "anonymous reporter" in text and "Early Bird" not in text
    assert f"no credit preference recorded for {unknown}" in text  # on stderr
    markdown = cli("credits", "--since", cutoff.isoformat(), "--format", "markdown").stdout
    assert markdown.splitlines() == [f"- [Jane Doe x](https://evil.example) ({named})",
                                     f"- Anonymous reporter ({anonymous})"]
    day = cli("credits", "--since", (received + timedelta(days=1)).strftime("%Y-%m-%d"), "--format", "json")
    assert json.loads(day.output)["credits"] == []
    assert "--since" in cli("credits", "--since", "last tuesday", code=2).output
