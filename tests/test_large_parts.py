"""Large attachments are read from the raw message, not held decoded beside it (issue 18).

A 25 MB message with an 18 MiB attachment parses in the real parse helper within three times its
size of memory (the helper's own high-water mark, VmHWM), and every large part reads as it did when
the whole of it went through the feed parser and mail-parser: same attachments, same sizes and
SHA-256 of the decoded bytes, same bytes from ``extract_attachment``.
"""

from __future__ import annotations

import base64
import hashlib
import os
from email.message import EmailMessage
from pathlib import Path

import pytest

from intake.understand import large_parts, mime_reader, parse_guard
from intake.understand.content import extract_attachment
from intake.understand.parse import parse

# Parts of these tests are read as large from this size on (the shipped bound is 1 MiB): smaller, quicker.
LARGE = 64 * 1024


@pytest.fixture
def large_from_64_kib(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(large_parts, "LARGE_PART", LARGE)


@pytest.fixture(scope="module")
def big_message() -> tuple[bytes, bytes]:
    """A 25 MB message (text and an 18 MiB attachment of random bytes) and the attachment's bytes."""
    data = os.urandom(18 * 1024 * 1024)
    message = EmailMessage()
    message["From"] = "Reporter <reporter@example.org>"
    message["To"] = "security@example.com"
    message["Subject"] = "Crash dump"
    message.set_content("The crash dump is attached.\n" + "detail line\n" * 1000)
    message.add_attachment(data, maintype="application", subtype="octet-stream", filename="core.dump")
    return message.as_bytes(), data


def _status(pid: int, field: str) -> int:
    """A /proc/PID/status memory field in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise LookupError(field)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc (VmHWM, clear_refs)")
def test_a_25_mb_message_parses_in_the_helper_within_three_times_its_size(big_message):
    raw, data = big_message
    assert len(raw) > 25_000_000
    helper = parse_guard.BoundedParser(budget=60)
    try:
        assert helper.parse(b"From: a@example.org\r\nSubject: warm-up\r\n\r\nhi\r\n").subject == "warm-up"
        pid = helper._helper.process.pid
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # the high-water mark starts again from now
        idle = _status(pid, "VmRSS")
        mail = helper.parse(raw, timeout=300)
        growth = _status(pid, "VmHWM") - idle
        # The next one finds the first one's memory returned, not kept in the heap (2.7x then).
        again = helper.parse_and_score(raw, timeout=300, head=b"Received: from relay.example.org\r\n").mail
        growth_after_two = _status(pid, "VmHWM") - idle
    finally:
        helper.close()
    assert [(a.filename, a.size, a.sha256) for a in mail.attachments] == \
        [("core.dump", len(data), hashlib.sha256(data).hexdigest())]
    assert again.attachments == mail.attachments
    assert mail.body_text.startswith("The crash dump is attached.")
    assert growth < 3 * len(raw), f"the helper grew by {growth} bytes for a {len(raw)}-byte message"
    assert growth_after_two < 2.3 * len(raw), f"the helper grew by {growth_after_two} bytes after two messages"


def test_the_attachment_of_a_large_message_is_given_whole_from_the_raw_message(big_message):
    raw, data = big_message
    attachment, extracted = extract_attachment(raw, 1)
    assert (attachment.filename, attachment.size, extracted) == ("core.dump", len(data), data)


def _part(headers: str, body: bytes) -> bytes:
    return b"--b\r\n" + headers.encode() + b"\r\n\r\n" + body + b"\r\n"


def _wrapped(data: bytes, width: int = 76, eol: bytes = b"\r\n") -> bytes:
    encoded = base64.b64encode(data)
    return eol.join(encoded[i:i + width] for i in range(0, len(encoded), width))


def _odd_parts() -> bytes:
    """Large base64 parts of every shape the decoding has a rule for, and parts that stay in the tree."""
    blob = os.urandom(LARGE)
    key = b"-----BEGIN PGP PUBLIC KEY BLOCK-----\n\nnot really a key\n-----END PGP PUBLIC KEY BLOCK-----\n"
    octets = "Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64"
    parts = [
        _part("Content-Type: text/plain", b"Body text.\r\n"),
        _part(octets + '\r\nContent-Disposition: attachment; filename="plain.bin"', _wrapped(blob)),
        _part(octets, _wrapped(blob[:-1], 64, b"\n")),  # unnamed, LF lines
        _part(octets, _wrapped(blob[:-2]) + b"\r\n*** junk ~ outside the alphabet ***"),
        _part(octets, _wrapped(blob)[:-3]),  # padding lost, a lone character left over
        _part(octets, _wrapped(blob[:-1]) + b"\r\n" + _wrapped(b"after the padding")),  # '=' ends the data
        _part(octets, _wrapped(b" \t\r\n" * (LARGE // 3))),  # unnamed and blank: left out
        _part(octets + '\r\nContent-Disposition: attachment; filename="blank.bin"', _wrapped(b" " * LARGE)),
        _part(octets + '\r\nContent-Disposition: attachment; filename="8bit.bin"',
              _wrapped(blob) + b"\r\n\xe9\xe9"),  # a byte outside ASCII: kept in the tree
        _part(octets + '\r\nContent-Disposition: attachment; filename="key.asc"',
              _wrapped(blob[:LARGE // 2] + key + blob[LARGE // 2:])),  # an OpenPGP key: kept in the tree
        _part("Content-Type: text/plain\r\nContent-Transfer-Encoding: base64\r\n"
              'Content-Disposition: attachment; filename="notes.txt"', _wrapped(b"notes\n" * (LARGE // 4))),
        _part(octets, b""),  # empty
    ]
    return (b"From: a@example.org\r\nSubject: odd parts\r\nMIME-Version: 1.0\r\n"
            b'Content-Type: multipart/mixed; boundary="b"\r\n\r\npreamble\r\n' + b"".join(parts) + b"--b--\r\n")


def test_large_parts_read_as_the_whole_feed_parser_and_mail_parser_read_them(large_from_64_kib,
                                                                             monkeypatch: pytest.MonkeyPatch):
    raw = _odd_parts()
    reading = mime_reader.read_mime(raw)
    assert len(reading.large_parts) == 7  # the base64 attachments of 1 MiB and more, but the two kept
    left_in_bytes = parse(raw)
    with monkeypatch.context() as patch:
        patch.setattr(large_parts, "LARGE_PART", len(raw) + 1)  # every part through the feed parser
        assert mime_reader.read_mime(raw).large_parts == {}
        whole = parse(raw)
        whole_attachments = [extract_attachment(raw, a.index) for a in whole.attachments]
    assert left_in_bytes == whole
    assert [a.original_filename for a in whole.attachments] == \
        ["plain.bin", "", "", "", "", "blank.bin", "8bit.bin", "key.asc", "notes.txt"]
    assert whole.public_keys == left_in_bytes.public_keys
    for attachment, data in whole_attachments:
        assert extract_attachment(raw, attachment.index) == (attachment, data)
        assert hashlib.sha256(data).hexdigest() == attachment.sha256


def test_a_large_part_leaves_the_rest_of_the_tree_as_the_feed_parser_reads_it(large_from_64_kib):
    raw = _odd_parts()
    reading = mime_reader.read_mime(raw)
    fed_whole = mime_reader._BoundedFeedParser(mime_reader._Reading(), 0).parse(raw)
    parts = list(mime_reader.walk_parts(reading.root))
    assert len(parts) == len(list(mime_reader.walk_parts(fed_whole)))
    for (part, _, _), (whole_part, _, _) in zip(parts, mime_reader.walk_parts(fed_whole)):
        assert part.items() == whole_part.items()
        left = reading.large_parts.get(part._payload) if isinstance(part._payload, str) else None
        if left is not None:  # its body is the raw bytes it stands for, line break before the boundary aside
            body = raw[left.start:left.end].decode("ascii")
            assert whole_part._payload == body.removesuffix("\r\n")
        else:
            assert part._payload == whole_part._payload or part.is_multipart()


def test_the_helper_parses_the_head_it_is_handed_on_top_of_the_message():
    """The processor hands intake's trace fields apart (no second copy of the message to join them)."""
    head = b"Return-Path: <bounce@example.org>\r\nReceived: from relay.example.org\r\n"
    raw = b"From: a@example.org\r\nSubject: with a head\r\n\r\nBody.\r\n"
    helper = parse_guard.BoundedParser()
    try:
        result = helper.parse_and_score(raw, head=head)
        without = helper.parse_and_score(raw)
    finally:
        helper.close()
    assert result.mail == parse(head + raw) and result.mail.headers["return-path"] == "<bounce@example.org>"
    assert without.mail == parse(raw) and "return-path" not in without.mail.headers
