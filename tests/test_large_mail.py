"""Large mail through the real listener: DATA spooled (one copy held), its rules kept exactly, and
the listener's memory budget (``smtp.memory_budget``: 452 4.3.1, never a lost 250)."""

from __future__ import annotations

import base64
import hashlib
import os
import smtplib
import socket
import threading
import time
import uuid
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import all_tickets, process
from intake.cli.app import main
from intake.receive import spool
from intake.store import key_rotation
from test_listener import RawSMTP, message_bytes, stored_rows
from test_serve import serve, serve_env  # noqa: F401 - fixtures

MIB = 1024 * 1024


@pytest.fixture
def database_url(sqlite_url: str) -> str:
    return sqlite_url


def report_with_attachment(attachment: bytes, marker: str) -> bytes:
    """A multipart report (CRLF, as on the wire) with *attachment* base64-encoded."""
    boundary = f"=={marker}=="
    head = (f"From: Alice <alice-{marker}@researcher.test>\r\nTo: security@example.com\r\n"
            f"Subject: crash dump {marker}\r\nMessage-ID: <{marker}@researcher.test>\r\nMIME-Version: 1.0\r\n"
            f"Content-Type: multipart/mixed; boundary=\"{boundary}\"\r\n\r\n--{boundary}\r\n"
            "Content-Type: text/plain\r\n\r\nThe dump is attached.\r\n\r\n"
            f"--{boundary}\r\nContent-Type: application/octet-stream\r\n"
            "Content-Disposition: attachment; filename=\"core.bin\"\r\nContent-Transfer-Encoding: base64\r\n\r\n")
    return head.encode() + base64.encodebytes(attachment).replace(b"\n", b"\r\n") + f"--{boundary}--\r\n".encode()


def send(port: int, data: bytes, options: tuple[str, ...] = ()) -> tuple[int, str]:
    """One transaction; the reply to the end of DATA (or to DATA, or MAIL, when refused there)."""
    with smtplib.SMTP("127.0.0.1", port, timeout=120) as client:
        client.ehlo("client.test")
        code, text = client.mail("alice@researcher.test", list(options))
        if code != 250:
            return code, text.decode()
        assert client.rcpt("security@example.com")[0] == 250
        try:
            code, text = client.data(data)
        except smtplib.SMTPDataError as refused:  # at DATA itself, before the message
            return refused.smtp_code, refused.smtp_error.decode()
        return code, text.decode()


def wait_until(condition, seconds: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


# -- a 25 MB report, whole -------------------------------------------------------------------


@pytest.mark.parametrize("sealed", [False, True], ids=["clear", "storage-key"])
def test_a_25_mb_report_round_trips_with_its_18_mib_attachment_intact(make_settings, start_intake_listener, cli,
                                                                        tmp_path, sealed):
    env = {"INTAKE_PROCESSING__MESSAGE_BUDGET": "60", "INTAKE_PROCESSING__PARSE_TIMEOUT": "120",
           "INTAKE_PROCESSING__CLAIM_LEASE": "240"}
    if sealed:
        key = tmp_path / "storage.key"
        assert CliRunner().invoke(main, ["storage", "keygen", str(key)]).exit_code == 0
        env["INTAKE_STORAGE__KEY_FILE"] = str(key)
    settings = make_settings(**env)
    running = start_intake_listener(settings)
    attachment = os.urandom(18 * MIB)
    data = report_with_attachment(attachment, "large")
    assert len(data) > 25_000_000
    code, text = send(running.port, data)
    assert code == 250, text
    [row] = stored_rows(running.engine)
    assert row["size"] == len(data)
    process(settings, running.engine)
    [ticket] = all_tickets(running.engine)
    out = tmp_path / "core.bin"
    cli("attachment", ticket.reference, "1", "-o", str(out))
    assert hashlib.sha256(out.read_bytes()).hexdigest() == hashlib.sha256(attachment).hexdigest()


# -- DATA's rules, on a spooled message ------------------------------------------------------


def test_dot_stuffing_and_bare_lf_come_through_exactly_past_the_spool_threshold(make_settings, start_intake_listener):
    running = start_intake_listener(make_settings())
    # Lines starting with a dot on both sides of the in-memory part (spool.BUFFER_BYTES), a bare LF
    # inside a line, a line of two dots and one that is a dot and spaces.
    body = b"".join(b".%07d dotted line\r\nplain %07d with a bare\nLF inside\r\n..\r\n. \r\n" % (n, n)
                    for n in range(3 * spool.BUFFER_BYTES // 50))
    message = b"From: alice@researcher.test\r\nSubject: dots\r\n\r\n" + body
    assert len(message) > 2 * spool.BUFFER_BYTES
    client = RawSMTP(running.port, timeout=60)
    assert client.command("EHLO client.test")[0] == 250
    assert client.command("MAIL FROM:<alice@researcher.test>")[0] == 250
    assert client.command("RCPT TO:<security@example.com>")[0] == 250
    assert client.command("DATA")[0] == 354
    stuffed = b"\r\n".join(b"." + line if line.startswith(b".") else line for line in message.split(b"\r\n"))
    client.send(stuffed + b".\r\n")
    assert client.reply()[0] == 250
    client.close()
    [row] = stored_rows(running.engine)
    assert bytes(row["raw"]) == message
    assert row["sha256"] == hashlib.sha256(message).hexdigest()


@pytest.mark.parametrize("over", [-1, 0, 1])
def test_the_size_limit_is_exact_to_the_byte_on_a_spooled_message(make_settings, start_intake_listener, over):
    limit = 3 * spool.BUFFER_BYTES + 17
    running = start_intake_listener(make_settings(INTAKE_SMTP__MAX_MESSAGE_SIZE=str(limit)))
    data = message_bytes(f"edge{over}", limit - 200)
    data += b"y" * (limit + over - len(data) - 2) + b"\r\n"
    assert len(data) == limit + over
    code, _ = send(running.port, data)
    assert code == (552 if over > 0 else 250)
    assert len(stored_rows(running.engine)) == (0 if over > 0 else 1)
    assert running.handler.memory.used == 0


def test_a_client_gone_mid_data_leaves_no_message_no_spool_file_and_no_budget_held(make_settings,
                                                                                   start_intake_listener, tmp_path):
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    running = start_intake_listener(make_settings(INTAKE_SMTP__SPOOL_DIR=str(spool_dir)))
    client = RawSMTP(running.port)
    for command in ("EHLO client.test", "MAIL FROM:<alice@researcher.test>", "RCPT TO:<security@example.com>"):
        assert client.command(command)[0] == 250
    assert client.command("DATA")[0] == 354
    client.send(message_bytes("cut", 3 * spool.BUFFER_BYTES))  # past the buffer: a spool file is open
    wait_until(lambda: running.handler.memory.used >= 3 * spool.BUFFER_BYTES)
    client.sock.shutdown(socket.SHUT_RDWR)
    client.close()
    wait_until(lambda: running.handler.memory.used == 0)
    assert stored_rows(running.engine) == []
    assert list(spool_dir.iterdir()) == []
    assert send(running.port, message_bytes("after", 2 * spool.BUFFER_BYTES))[0] == 250


def test_a_spool_folder_that_cannot_be_written_answers_451_and_small_mail_still_goes(make_settings,
                                                                                     start_intake_listener, tmp_path):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    running = start_intake_listener(make_settings(INTAKE_SMTP__SPOOL_DIR=str(not_a_folder)))
    assert send(running.port, message_bytes("big", 2 * spool.BUFFER_BYTES))[0] == 451
    assert send(running.port, message_bytes("small", 1000))[0] == 250
    [row] = stored_rows(running.engine)
    assert b"marker small" in row["raw"]
    assert running.handler.memory.used == 0


# -- the memory budget -----------------------------------------------------------------------


def test_data_past_the_memory_budget_gets_452_at_data_or_after_it_and_is_taken_once_there_is_room(
        make_settings, start_intake_listener):
    budget = 4 * MIB
    running = start_intake_listener(make_settings(INTAKE_SMTP__MAX_MESSAGE_SIZE=str(budget),
                                                  INTAKE_SMTP__MEMORY_BUDGET=str(budget)))
    holder = RawSMTP(running.port, timeout=60)
    for command in ("EHLO client.test", "MAIL FROM:<alice@researcher.test>", "RCPT TO:<security@example.com>"):
        assert holder.command(command)[0] == 250
    assert holder.command("DATA")[0] == 354
    first = message_bytes("first", 3 * MIB)
    holder.send(first)  # most of the budget, held until the final dot
    wait_until(lambda: running.handler.memory.used >= 3 * MIB)
    # A declared size that does not fit: 452 at DATA, before any byte of the message.
    assert send(running.port, message_bytes("declared", 2 * MIB), ("SIZE=%d" % (2 * MIB),))[0] == 452
    # Undeclared: read to its end, then 452; nothing of it stored.
    assert send(running.port, message_bytes("undeclared", 2 * MIB))[0] == 452
    holder.send(b".\r\n")
    assert holder.reply()[0] == 250
    holder.close()
    assert send(running.port, message_bytes("retried", 2 * MIB))[0] == 250
    markers = [row["raw"][row["raw"].index(b"marker "):][:20] for row in stored_rows(running.engine)]
    assert [m.split(b"\r\n")[0] for m in markers] == [b"marker first", b"marker retried"]
    assert running.handler.memory.used == 0


def test_many_concurrent_large_messages_each_250_is_stored_and_each_452_is_not(make_settings,
                                                                               start_intake_listener):
    budget = 5 * MIB
    running = start_intake_listener(make_settings(INTAKE_SMTP__MAX_MESSAGE_SIZE=str(2 * MIB),
                                                  INTAKE_SMTP__MEMORY_BUDGET=str(budget)))
    replies: dict[str, int] = {}
    start = threading.Barrier(12)

    def client(marker: str) -> None:
        start.wait(30)
        replies[marker] = send(running.port, message_bytes(marker, 2 * MIB - 4096))[0]

    threads = [threading.Thread(target=client, args=(f"m{n}-{uuid.uuid4().hex[:6]}",)) for n in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert len(replies) == 12 and set(replies.values()) <= {250, 452}, replies
    stored = {row["raw"].split(b"marker ")[1].split(b"\r\n")[0].decode() for row in stored_rows(running.engine)}
    assert stored == {marker for marker, code in replies.items() if code == 250}
    assert 250 in replies.values()
    assert running.handler.memory.used == 0


# -- memory of the real service --------------------------------------------------------------


def _memory(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} for {pid}")


@pytest.mark.slow
@pytest.mark.parametrize("sealed", [False, True], ids=["clear", "storage-key"])
def test_the_listener_of_intake_serve_grows_by_less_than_three_times_a_25_mb_message(serve, serve_env,  # noqa: F811
                                                                                    tmp_path, sealed):
    if sealed:  # sealing adds no whole copy: the message goes into its row sealed piece by piece
        serve_env["INTAKE_STORAGE__KEY_FILE"] = str(key_rotation.write_storage_key(tmp_path / "storage.key").source)
    server = serve()
    server.start()
    assert send(server.port, message_bytes("warm", 2 * spool.BUFFER_BYTES))[0] == 250
    pid = server.process.pid  # the listener: `intake serve` itself (the worker is its child)
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # its peak RSS (VmHWM) starts again from now
    before = _memory(pid, "VmRSS")
    data = report_with_attachment(os.urandom(18 * MIB), "rss")
    assert send(server.port, data)[0] == 250
    grown = _memory(pid, "VmHWM") - before
    assert grown < 3 * len(data), f"the listener grew by {grown / len(data):.2f}x the message"
    assert server.stop() == 0


def test_spool_reads_back_what_was_written_in_memory_and_in_its_file(tmp_path):
    lines = [b"%d\r\n" % n * 50 for n in range(2 * spool.BUFFER_BYTES // 200)]
    for count in (3, len(lines)):  # under the buffer; past it, into the file
        with spool.Spool(tmp_path) as data:
            for line in lines[:count]:
                data.append(line)
            assert data.content() == b"".join(lines[:count])
    assert list(tmp_path.iterdir()) == []

