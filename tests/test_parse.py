"""intake.parse and intake.parse_guard: pure tests, no database, no network.

Hostile messages are built here; real-world ones come from the shared corpus."""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import random
import re
import subprocess
import sys
import time
from email.feedparser import BytesFeedParser
from email.header import Header
from email.message import EmailMessage, Message
from pathlib import Path

import mailparser
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mailparser.utils import decode_base64_payload

from conftest import CORPUS
from intake.understand import body_text, content, mime_reader, parse as parse_module, parse_guard
from intake.understand.body_text import MAX_BODY_TEXT
from intake.understand.content import extract_attachment
from intake.understand.header_text import MAX_FILENAME, clean_text, safe_filename
from intake.understand.mime_reader import MAX_MIME_DEPTH, MAX_MIME_PARTS
from intake.understand.parse import parse, parse_headers_only
from intake.understand.parsed_mail import DeliveryReport, ParsedMail
from intake.understand.quality import SHIPPED_RULES, SpamScore, load_rules

# Generous: each hostile message parses in milliseconds; unbounded, several take seconds or never end.
# Measured in this process's CPU time, which other work on a busy machine does not stretch.
QUICK = 5.0


def mail(headers: str, body: str | bytes = "Hello.\n") -> bytes:
    """A message from header lines (CRLF added) and a body."""
    head = "".join(f"{line}\r\n" for line in headers.strip("\n").split("\n"))
    return head.encode("utf-8") + b"\r\n" + (body.encode("utf-8") if isinstance(body, str) else body)


def timed_parse(raw: bytes) -> tuple[ParsedMail, float]:
    """The parse of *raw* and the CPU seconds it took (parse runs in this process)."""
    started = time.process_time()
    parsed = parse(raw)
    return parsed, time.process_time() - started


def limit_warnings(parsed: ParsedMail, name: str) -> list[str]:
    return [w for w in parsed.warnings if w.startswith(f"limit {name} ")]


def corpus_file(relative: str) -> bytes:
    path = CORPUS / relative
    if not path.exists():
        pytest.skip(f"no corpus at {CORPUS}")
    return re.sub(rb"\r?\n", b"\r\n", path.read_bytes())  # as an MTA hands it over


# -- limits ------------------------------------------------------------------------------------


def test_a_thousand_nested_multiparts_are_cut_at_the_depth_limit():
    depth = 1000
    opening = "".join(f'Content-Type: multipart/mixed; boundary="b{i}"\r\n\r\n--b{i}\r\n' for i in range(1, depth))
    closing = "".join(f"\r\n--b{i}--\r\n" for i in reversed(range(1, depth)))
    raw = mail('From: a@example.org\nSubject: deep\nContent-Type: multipart/mixed; boundary="b0"',
               '--b0\r\nContent-Type: text/plain\r\n\r\nthe readable part\r\n--b0\r\n' + opening
               + "Content-Type: text/plain\r\n\r\nburied\r\n" + closing + "--b0--\r\n")
    parsed, seconds = timed_parse(raw)
    assert seconds < QUICK
    assert limit_warnings(parsed, "MAX_MIME_DEPTH")
    assert "the readable part" in parsed.body_text and "buried" not in parsed.body_text
    # The part at the limit is kept whole, as an attachment holding the deeper structure.
    [opaque] = parsed.attachments
    assert opaque.content_type == "multipart/mixed" and opaque.size > 1000
    assert parsed.part_count == MAX_MIME_DEPTH + 2  # the root, the text part, the chain down to the limit


def test_ten_thousand_parts_stop_at_the_part_limit():
    parts = "".join(f"--b\r\nContent-Type: application/octet-stream\r\n\r\npart {i}\r\n" for i in range(10_000))
    raw = mail('From: a@example.org\nSubject: many\nContent-Type: multipart/mixed; boundary="b"',
               "--b\r\nContent-Type: text/plain\r\n\r\nfirst\r\n" + parts + "--b--\r\n")
    parsed, seconds = timed_parse(raw)
    assert seconds < QUICK
    assert limit_warnings(parsed, "MAX_MIME_PARTS")
    assert parsed.part_count == MAX_MIME_PARTS
    assert parsed.body_text.strip() == "first" and parsed.subject == "many"
    assert len(parsed.attachments) == MAX_MIME_PARTS - 2  # the root and the text part count too
    assert parsed.attachments[-1].sha256 == hashlib.sha256(f"part {MAX_MIME_PARTS - 3}".encode()).hexdigest()


def test_five_thousand_headers_stop_at_the_header_limit():
    filler = "\n".join(f"X-Filler-{i}: {i}" for i in range(5_000))
    raw = mail(f"From: a@example.org\nSubject: headers\n{filler}\nPrecedence: bulk")
    parsed, seconds = timed_parse(raw)
    assert seconds < QUICK
    assert limit_warnings(parsed, "MAX_HEADER_FIELDS")
    assert parsed.header_count == 5_003  # counted, though not all read
    assert parsed.subject == "headers" and parsed.body_text == "Hello.\n"
    assert parsed.precedence is None  # past the limit: not read


def test_a_one_megabyte_header_is_cut():
    raw = mail(f"From: a@example.org\nSubject: {'a' * 1_000_000}\nX-Intake-Loop: after")
    parsed, seconds = timed_parse(raw)
    assert seconds < QUICK
    assert limit_warnings(parsed, "MAX_HEADER_LENGTH") == [
        "limit MAX_HEADER_LENGTH (65536): a Subject header was cut"]
    assert parsed.subject == "a" * 998  # display values are one bounded line
    assert parsed.headers["x-intake-loop"] == "after"  # what follows is still read


@pytest.mark.parametrize("boundary", ['"b"' + ";" * 100_000, '"b' + ";" * 100_000 + '"'],
                         ids=["semicolons after the boundary", "semicolons inside an open quote"])
def test_semicolon_stuffed_content_type_parameters_are_cut(boundary: str):
    # Unbounded, the stdlib's parameter parser takes ~6 s on the quoted form (quadratic).
    raw = mail(f"From: a@example.org\nSubject: params\nContent-Type: multipart/mixed; boundary={boundary}",
               "--b\r\nContent-Type: text/plain\r\n\r\ninside\r\n--b--\r\n")
    parsed, seconds = timed_parse(raw)
    assert seconds < QUICK
    assert limit_warnings(parsed, "MAX_MIME_PARAMETERS")
    assert parsed.subject == "params"


def test_long_encoded_file_names_are_decoded_from_their_start_only():
    # Encoded words decode in quadratic time: 70 ms for one 64 KB name, unbounded ~40 s for these.
    part = (b'--b\r\nContent-Type: application/octet-stream\r\nContent-Disposition: attachment; filename="'
            + b"=?utf-8?q?a?= " * 4_600 + b'"\r\n\r\ndata\r\n')
    parsed, seconds = timed_parse(mail('From: a@example.org\nContent-Type: multipart/mixed; boundary="b"',
                                       part * 300 + b"--b--\r\n"))
    assert seconds < QUICK
    assert len(parsed.attachments) == 300
    assert parsed.attachments[0].original_filename == "a" * 255  # display-bounded
    assert parsed.attachments[0].filename == "a" * MAX_FILENAME


def test_fifty_thousand_nested_comments_in_an_address_header():
    # The stdlib's address parsers recurse once per nesting level: RecursionError. These 100 KB
    # are cut at the header limit, which leaves the comments unclosed: malformed, not guessed at.
    nested = "(" * 50_000 + ")" * 50_000
    parsed, seconds = timed_parse(mail(f"From: Alice <alice@example.org>\nTo: security@example.com {nested}"))
    assert seconds < QUICK
    assert parsed.to == [] and parsed.from_address == "alice@example.org"
    assert parsed.warnings == ["limit MAX_HEADER_LENGTH (65536): a To header was cut",
                               "To header is malformed (a comment or angle address is not closed); "
                               "its addresses were ignored"]


def test_deeply_nested_comments_within_the_header_limit_are_read():
    nested = "(" * 30_000 + ")" * 30_000
    parsed, seconds = timed_parse(mail(f"From: Alice <alice@example.org> {nested}\nTo: security@example.com {nested}"))
    assert seconds < QUICK
    assert parsed.from_address == "alice@example.org" and parsed.to == ["security@example.com"]
    assert parsed.warnings == []


def test_a_crafted_address_is_not_misattributed():
    # CVE-2023-27043: the stdlib's parseaddr() reads this as alice@example.org.
    parsed = parse(mail("From: alice@example.org)<bob@example.org>"))
    assert parsed.from_address == ""
    assert any(w.startswith("From header is malformed") for w in parsed.warnings)
    quoted = parse(mail('From: "alice@example.org" <bob@example.org>'))
    assert (quoted.from_address, quoted.from_name) == ("bob@example.org", "alice@example.org")


def test_body_text_is_cut_at_the_body_limit():
    parsed, seconds = timed_parse(mail("From: a@example.org\nSubject: long", "x" * (MAX_BODY_TEXT + 10)))
    assert seconds < QUICK
    assert len(parsed.body_text) == MAX_BODY_TEXT
    assert limit_warnings(parsed, "MAX_BODY_TEXT")


def test_html_beyond_the_html_limit_is_not_converted(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(body_text, "MAX_HTML_INPUT", 50)
    parsed = parse(mail("From: a@example.org\nContent-Type: text/html",
                        "<p>" + "early " * 10 + "</p>" + "<p>late</p>" * 100))
    assert "early" in parsed.body_text and "late" not in parsed.body_text
    assert limit_warnings(parsed, "MAX_HTML_INPUT")


@pytest.mark.parametrize("nested", ["<ul><li>item ", "<blockquote>quote "])
def test_deeply_nested_html_lists_and_quotes_are_flattened(nested: str):
    # Unbounded, html2text took 4 minutes and 500 MB of output on 200 KB of nested <ul><li>.
    parsed, seconds = timed_parse(mail("From: a@example.org\nContent-Type: text/html", nested * 15_000))
    assert seconds < QUICK
    assert limit_warnings(parsed, "MAX_HTML_NESTING")
    assert parsed.body_text.count(nested.split(">")[-1].strip()) == 15_000  # every bit of text kept


def test_the_parse_never_raises_even_when_an_internal_step_fails(monkeypatch: pytest.MonkeyPatch):
    def broken(*args: object) -> None:
        raise RuntimeError("bug")

    monkeypatch.setattr(parse_module, "extract_content", broken)
    parsed = parse(mail("From: Alice <alice@example.org>\nSubject: still here\nMessage-ID: <m1@example.org>"))
    assert (parsed.subject, parsed.from_address, parsed.message_id) == ("still here", "alice@example.org",
                                                                       "<m1@example.org>")
    assert parsed.warnings == ["parse failed (RuntimeError); only the header block was read"]


# -- recipients ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("headers", "count", "undisclosed"), [
    ("To: undisclosed-recipients:;", 0, True),  # an AttributeError in the stdlib's modern parser (gh-83281)
    ("To: unlisted-recipients:; (no To-header on input)", 0, True),
    ("Subject: no To or Cc at all", 0, True),
    ("To: undisclosed-recipients:;\nCc: carol@example.org", 1, True),
    ("To: Sec <security@example.com>, BOB@example.org\nCc: bob@example.org, carol@example.org", 3, False),
    ("To: team: alice@example.org, bob@example.org;", 2, False),
])
def test_recipient_count_and_undisclosed_recipients(headers: str, count: int, undisclosed: bool):
    parsed = parse(mail(f"From: a@example.org\n{headers}"))
    assert parsed.recipient_count == count
    assert parsed.undisclosed_recipients is undisclosed
    assert not [w for w in parsed.warnings if "malformed" in w]


def test_to_and_cc_list_addresses_in_order():
    parsed = parse(mail('From: a@example.org\nTo: "Sec, Team" <security@example.com>, b@example.org\n'
                        "Cc: c@example.org"))
    assert parsed.to == ["security@example.com", "b@example.org"]
    assert parsed.cc == ["c@example.org"]


# -- headers and charsets -----------------------------------------------------------------------


@pytest.mark.parametrize(("text", "charset"), [
    ("Überlauf im Parser", "utf-8"),
    ("Débordement de tampon", "iso-8859-1"),
    ("Переполнение буфера", "koi8-r"),
    ("バッファオーバーフロー", "iso-2022-jp"),
    ("缓冲区溢出", "gb2312"),
    ("Ελληνικά", "iso-8859-7"),
])
def test_rfc2047_subjects_in_several_charsets(text: str, charset: str):
    encoded = Header(text, charset).encode()
    assert encoded.startswith("=?")
    assert parse(mail(f"From: a@example.org\nSubject: [Report] {encoded}")).subject == f"[Report] {text}"


@given(st.lists(st.sampled_from(["Re:", " ", "  ", "\t", "\r\n ", "\n\t", "report", "=?", "?=",
                                  "=?utf-8?q?caf=C3=A9?=", "=?utf-8?b?w6k=?=", "=?x-unknown?q?a?=", "\u00e9", "\udce9",
                                  "(x)", "\\", '"', ";", "\x0b"]),
                max_size=12).map("".join))
@settings(max_examples=500, deadline=None)
def test_header_text_is_decoded_as_the_modern_policy_decodes_it(value: str):
    # Most values (plain ASCII, no encoded word) skip the stdlib's parser: they must read the same.
    from email.policy import default

    from intake.understand.header_text import decode_words

    try:
        expected = str(default.header_factory("unstructured", value.replace("\r", "").replace("\n", "")))
    except Exception:  # noqa: BLE001 - the fallback decodes these its own way
        return
    assert decode_words(value) == expected


@given(st.lists(st.sampled_from([chr(c) for c in range(128)] + ["\r\n ", "\u2028", "\x85", "\u00e9", "\udce9"]),
                max_size=40).map("".join), st.sampled_from([3, 200, 998]))
@settings(max_examples=500, deadline=None)
def test_display_safe_text_is_the_same_by_the_short_way(value: str, limit: int):
    # Plain ASCII values without a line break skip the general path: they must come out the same.
    from intake.understand import header_text

    cleaned = clean_text(value, limit)
    assert cleaned == header_text._one_line(value, limit)
    assert len(cleaned) <= limit and "\n" not in cleaned and "\x00" not in cleaned


def test_an_unknown_charset_decodes_with_replacement():
    parsed = parse(mail("From: a@example.org\nSubject: =?x-unknown?q?caf=E9?=\n"
                        "Content-Type: text/plain; charset=x-unknown", b"caf\xe9 au lait\n"))
    assert parsed.body_text == "caf\ufffd au lait\n"
    assert parsed.subject == "caf\ufffd"
    assert parsed.warnings == ["MIME defects: CharsetDecodeDefect"]  # mail-parser's report of its fallback


def test_a_mislabelled_charset_decodes_with_replacement():
    parsed = parse(mail("From: a@example.org\nContent-Type: text/plain; charset=utf-8", b"na\xefve caf\xe9\n"))
    assert parsed.body_text == "na\ufffdve caf\ufffd\n"
    assert parsed.warnings == ["MIME defects: CharsetDecodeDefect"]  # mail-parser's report of its fallback


def test_utf8_text_labelled_with_another_charset_is_read_as_utf8():
    parsed = parse(mail("From: a@example.org\nContent-Type: text/plain; charset=gb2312", "你好，漏洞报告\n"))
    assert parsed.body_text == "你好，漏洞报告\n"
    assert parsed.warnings == ["MIME defects: CharsetDecodeDefect"]  # mail-parser's report of its fallback


def test_raw_8bit_utf8_headers_and_smtputf8_addresses():
    raw = mail("From: Jörg Müller <jörg@exämple.de>\nTo: sécurité@example.com\nSubject: Überlauf im Parser")
    parsed = parse(raw)
    assert parsed.subject == "Überlauf im Parser"
    assert (parsed.from_name, parsed.from_address) == ("Jörg Müller", "jörg@exämple.de")
    assert parsed.to == ["sécurité@example.com"]


def test_raw_latin1_headers_decode_with_replacement():
    parsed = parse(b"From: J\xf6rg <j@example.org>\r\nSubject: Fr\xf6sche\r\n\r\nbody\r\n")
    assert parsed.subject == "Fr\ufffdsche"  # as the stdlib's modern policy reads it
    assert parsed.from_name == "J\ufffdrg"


def test_display_values_are_single_safe_lines():
    assert clean_text("a\u2028b\x85c\rd\ne\x00f\x9bg") == "a b c d efg"
    hostile = parse(mail("From: a@example.org\nSubject: =?utf-8?q?Hi=0D=0ABcc=3A_x=40evil=2Eexample?="))
    assert hostile.subject == "Hi Bcc: x@evil.example"
    assert len(hostile.subject.splitlines()) == 1


def test_loop_headers_are_collected_first_occurrence_lowercased():
    parsed = parse(mail("From: a@example.org\nList-Id: <dev.lists.example.org>\nX-Auto-Response-Suppress: All\n"
                        "X-Spam-Flag: YES\nX-Spam-Flag: NO\nReceived: not collected"))
    assert parsed.headers == {"list-id": "<dev.lists.example.org>", "x-auto-response-suppress": "All",
                              "x-spam-flag": "YES"}


def test_a_leading_byte_order_mark_does_not_hide_the_headers():
    parsed = parse(b"\xef\xbb\xbf" + mail("From: a@example.org\nSubject: after a BOM"))
    assert (parsed.subject, parsed.from_address) == ("after a BOM", "a@example.org")


# -- body -----------------------------------------------------------------------------------------


def test_html_only_mail_becomes_text_without_script_or_style():
    html = ("<html><head><style>body { color: red }</style><script>var secret = 1;</script></head>"
            "<body><p>Hello <b>team</b>, see <a href='https://poc.example/x'>the PoC</a>.</p>"
            "<script type='text/javascript'>alert('xss')</script><SCRIPT>steal()</SCRIPT></body></html>")
    parsed = parse(mail("From: a@example.org\nContent-Type: text/html; charset=utf-8", html))
    assert "Hello **team**" in parsed.body_text and "https://poc.example/x" in parsed.body_text
    for active in ("color: red", "secret", "alert", "steal", "<script", "<style"):
        assert active not in parsed.body_text


def test_plain_text_is_preferred_over_html():
    message = EmailMessage()
    message["From"] = "a@example.org"
    message.set_content("the plain version\n")
    message.add_alternative("<p>the html version</p>", subtype="html")
    parsed = parse(message.as_bytes())
    assert parsed.body_text == "the plain version\n" and parsed.attachments == []


def test_parts_after_a_reused_boundary_are_recovered():
    # A nested multipart reusing its parent's boundary closes the parent early in the stdlib.
    raw = mail('From: a@example.org\nContent-Type: multipart/mixed; boundary="b"',
               '--b\r\nContent-Type: multipart/alternative; boundary="b"\r\n\r\n'
               "--b\r\nContent-Type: text/plain\r\n\r\nhello\r\n--b--\r\n\r\n"
               '--b\r\nContent-Type: application/zip; name="poc.zip"\r\nContent-Transfer-Encoding: base64\r\n\r\n'
               + base64.b64encode(b"PK\x03\x04 zip").decode() + "\r\n--b--\r\n")
    parsed = parse(raw)
    assert [a.filename for a in parsed.attachments] == ["poc.zip"]
    assert extract_attachment(raw, 1)[1] == b"PK\x03\x04 zip"
    assert "parts after a premature closing MIME boundary were recovered" in parsed.warnings


def test_an_inline_forwarded_message_is_read_and_an_attached_one_kept_whole():
    forwarded = b"From: vendor@example.net\r\nSubject: original\r\n\r\nthe forwarded text\r\n"
    inline = parse(mail('From: a@example.org\nContent-Type: multipart/mixed; boundary="b"',
                        b"--b\r\nContent-Type: text/plain\r\n\r\nFYI\r\n--b\r\nContent-Type: message/rfc822\r\n\r\n"
                        + forwarded + b"--b--\r\n"))
    assert "FYI" in inline.body_text and "the forwarded text" in inline.body_text
    attached_raw = mail('From: a@example.org\nContent-Type: multipart/mixed; boundary="b"',
                        b"--b\r\nContent-Type: text/plain\r\n\r\nFYI\r\n--b\r\nContent-Type: message/rfc822\r\n"
                        b'Content-Disposition: attachment; filename="fwd.eml"\r\n\r\n' + forwarded + b"--b--\r\n")
    attached = parse(attached_raw)
    assert "the forwarded text" not in attached.body_text
    [eml] = attached.attachments
    assert (eml.filename, eml.content_type) == ("fwd.eml", "message/rfc822")
    # The exact bytes, less the CRLF that belongs to the closing delimiter.
    assert extract_attachment(attached_raw, 1)[1] == forwarded.removesuffix(b"\r\n")


# -- content extraction (mail-parser) -----------------------------------------------------------


def test_mail_parser_extracts_the_attachments_it_extracts_on_its_own():
    # One of mail-parser's own test messages: the same names, types and decoded bytes as it gives alone.
    raw = corpus_file("spamscope-mail-parser/mail_test_7.eml")
    alone = [(a["filename"], a["mail_content_type"], hashlib.sha256(decode_base64_payload(a["payload"])).hexdigest())
             for a in mailparser.parse_from_bytes(raw).attachments]
    assert len(alone) == 8
    assert [(a.original_filename, a.content_type, a.sha256) for a in parse(raw).attachments] == alone


def test_a_defect_only_mail_parser_reports_is_a_warning():
    # A Latin-1 byte in a file name: the stdlib records no defect, mail-parser a MimeHeaderDefect.
    parsed = parse(mail('From: a@example.org\nContent-Type: multipart/mixed; boundary="b"',
                        b"--b\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n--b\r\n"
                        b'Content-Type: application/pdf\r\nContent-Disposition: attachment; filename="r\xe9sum\xe9.pdf"'
                        b"\r\n\r\n%PDF-1.4\r\n--b--\r\n"))
    assert parsed.warnings == ["MIME defects: MimeHeaderDefect"]
    [attachment] = parsed.attachments
    assert (attachment.original_filename, attachment.filename) == ("r\ufffdsum\ufffd.pdf", "r_sum_.pdf")


def test_nameless_parts_are_attachments_with_deterministic_names():
    # Alone, mail-parser reads a nameless binary as text and drops it from the list, names a
    # Content-ID part after its ID, and lists a flattened copy of a multipart marked as attachment.
    raw = mail('From: a@example.org\nContent-Type: multipart/mixed; boundary="b"',
               b"--b\r\nContent-Type: text/plain\r\n\r\nhi\r\n"
               b"--b\r\nContent-Type: application/octet-stream\r\n\r\n\x7fELF\x02\x01\x01\x00\r\n"
               b"--b\r\nContent-Type: image/png\r\nContent-ID: <img1@example.org>\r\n"
               b"Content-Transfer-Encoding: base64\r\n\r\niVBORw0KGgo=\r\n"
               b'--b\r\nContent-Type: multipart/mixed; boundary="c"\r\nContent-Disposition: attachment; filename="all"\r\n'
               b'\r\n--c\r\nContent-Type: text/x-log; name="a.log"\r\n\r\nlog line\r\n--c--\r\n--b--\r\n')
    parsed = parse(raw)
    assert [(a.filename, a.original_filename, a.content_type) for a in parsed.attachments] == [
        ("attachment-1", "", "application/octet-stream"), ("attachment-2", "", "image/png"),
        ("a.log", "a.log", "text/x-log")]
    assert extract_attachment(raw, 1)[1] == b"\x7fELF\x02\x01\x01\x00"
    assert extract_attachment(raw, 2)[1] == b"\x89PNG\r\n\x1a\n"
    assert parsed.body_text == "hi" and parse(raw) == parsed


@pytest.mark.parametrize(("charset", "encoded", "text"), [
    ("iso-8859-1", b"\x93quoted\x94 caf\xe9", "\u201cquoted\u201d caf\u00e9"),  # Outlook's: windows-1252
    ("gb2312", "朱镕基".encode("gbk"), "朱镕基"),  # 镕 is GBK, not GB 2312
    ("iso-8859-8-i", "שלום".encode("iso-8859-8"), "שלום"),  # Python has no codec of that name
])
def test_charset_labels_are_read_as_mail_software_reads_them(charset: str, encoded: bytes, text: str):
    parsed = parse(mail(f"From: a@example.org\nContent-Type: text/plain; charset={charset}", encoded + b"\n"))
    assert (parsed.body_text, parsed.warnings) == (text + "\n", [])
    assert parsed.headers["content-type"] == f"text/plain; charset={charset}"  # as sent


def test_iso_2022_jp_text_is_decoded():
    # Alone, mail-parser returns 7-bit text that is valid UTF-8 undecoded: escape sequences here.
    text = "クロスサイトスクリプティングの報告"
    parsed = parse(mail("From: a@example.org\nContent-Type: text/plain; charset=iso-2022-jp\n"
                        "Content-Transfer-Encoding: 7bit", text.encode("iso-2022-jp") + b"\n"))
    assert parsed.body_text == text + "\n"


@pytest.mark.parametrize("raw", [
    b'Content-Type: multipart/mixed; boundary="ab"\r\n\r\n--ab\r\nContent-Type: multipart/mixed; boundary="a"\r\n'
    b"\r\n--ab\r\nContent-Type: text/plain\r\n\r\nthe text\r\n--a\r\n",
    b"From: a@example.org\r\nContent-Type: message/rfc822\r\n\r\n"
    b'Content-Type: multipart/mixed; boundary="x"\r\n\r\nthe text\r\n',
], ids=["top-level multipart without epilogue", "top-level message/rfc822"])
def test_messages_that_crash_mail_parser_alone_are_read(raw: bytes):
    # A part missing its start boundary: mailparser.parse_from_bytes raises AttributeError on the
    # first, TypeError on the second (in its epilogue recovery; the reader recovers parts itself).
    parsed = parse(raw)
    assert "StartBoundaryNotFoundDefect" in parsed.warnings[0]
    assert not [w for w in parsed.warnings if "extraction failed" in w]
    assert "the text" in parsed.body_text or b"the text" in extract_attachment(raw, 1)[1]


def test_when_mail_parser_fails_everything_else_is_still_read(monkeypatch: pytest.MonkeyPatch):
    def failing(message: object) -> None:
        raise AttributeError("'NoneType' object has no attribute 'index'")  # outside its own hierarchy

    monkeypatch.setattr(content, "MailParser", failing)
    raw = mail("From: Alice <alice@example.org>\nSubject: report\nAuto-Submitted: auto-replied", "the report\n")
    parsed = parse(raw)
    assert (parsed.subject, parsed.from_address, parsed.auto_submitted) == ("report", "alice@example.org",
                                                                          "auto-replied")
    assert (parsed.body_text, parsed.attachments) == ("", [])
    assert parsed.warnings == ["content extraction failed (AttributeError in mail-parser); "
                               "body text and attachments are only in the stored raw message"]
    with pytest.raises(LookupError):
        extract_attachment(raw, 1)


def test_mail_parser_writes_nothing_to_our_log(caplog: pytest.LogCaptureFixture):
    # It quotes raw header text, line breaks included; what matters reaches ParsedMail.warnings.
    with caplog.at_level(logging.DEBUG):
        parse(corpus_file("spamscope-mail-parser/mail_test_10.eml"))
    assert not [record for record in caplog.records if record.name.startswith("mailparser")]


# -- encryption ---------------------------------------------------------------------------------

ARMORED = ("-----BEGIN PGP MESSAGE-----\n\nhQEMA0pAQ0O5lmuXAQf/Zx3q9Lw0c0mF+zY7y9kQ1qN8d3b2w==\n=Xk2a\n"
           "-----END PGP MESSAGE-----\n")


def test_pgp_mime_is_flagged_with_the_ciphertext_intact():
    raw = mail('From: a@example.org\nSubject: ...\n'
               'Content-Type: multipart/encrypted; protocol="application/pgp-encrypted"; boundary="enc"',
               "--enc\r\nContent-Type: application/pgp-encrypted\r\nContent-Description: PGP/MIME version\r\n\r\n"
               "Version: 1\r\n--enc\r\nContent-Type: application/octet-stream; name=\"encrypted.asc\"\r\n"
               "Content-Disposition: inline; filename=\"encrypted.asc\"\r\n\r\n" + ARMORED + "--enc--\r\n")
    parsed = parse(raw)
    assert parsed.encrypted == "pgp-mime" and "encrypted: pgp-mime" in parsed.warnings
    assert ARMORED.rstrip("\n") in parsed.body_text  # the last line break belongs to the boundary
    control, ciphertext = parsed.attachments
    assert control.content_type == "application/pgp-encrypted"
    assert control.sha256 == hashlib.sha256(b"Version: 1").hexdigest()
    assert ciphertext.filename == "encrypted.asc"
    assert ciphertext.sha256 == hashlib.sha256(ARMORED.removesuffix("\n").encode()).hexdigest()


def test_inline_pgp_is_flagged_with_the_armored_block_unchanged():
    parsed = parse(mail("From: a@example.org\nSubject: report", "Hi,\n\n" + ARMORED + "\nthanks\n"))
    assert parsed.encrypted == "inline-pgp"
    assert ARMORED in parsed.body_text


@pytest.mark.parametrize(("smime_type", "flagged"), [("enveloped-data", "smime"), ("signed-data", None)])
def test_smime_enveloped_data_is_flagged(smime_type: str, flagged: str | None):
    der = bytes(range(256)) * 4
    raw = mail(f'From: a@example.org\nContent-Type: application/pkcs7-mime; smime-type={smime_type}; name="smime.p7m"\n'
               'Content-Transfer-Encoding: base64\nContent-Disposition: attachment; filename="smime.p7m"',
               base64.encodebytes(der).decode())
    parsed = parse(raw)
    assert parsed.encrypted == flagged
    [attachment] = parsed.attachments
    assert (attachment.filename, attachment.size) == ("smime.p7m", len(der))
    assert attachment.sha256 == hashlib.sha256(der).hexdigest()


# -- reports and bounces ------------------------------------------------------------------------


def test_dsn_sample_delivery_status():
    parsed = parse(corpus_file("mimekit/messages/delivery-status.txt"))
    assert parsed.is_report == "delivery-status"
    assert parsed.delivery_report == DeliveryReport(
        original_message_id="<31FC7EB4.41C6@netscape.com>", original_ticket=None,
        recipient="newsletter-request@imusic.com", action="failed", status=None,
        diagnostic="X-LOCAL; 500 (err.nosuchuser)")
    assert parsed.undisclosed_recipients and parsed.recipient_count == 1  # To: unlisted-recipients:; Cc: postmaster


def test_dsn_sample_bounce_with_base64_recipient_fields():
    # Proofpoint re-encoded the per-recipient block of this DSN as base64.
    report = parse(corpus_file("mimekit/messages/bounce.txt")).delivery_report
    assert report == DeliveryReport(
        original_message_id="<44565655.JitbitHelpdesk.13439.691a0afc-a0a0-457c-8208-f20b7c4a4cb1@jitbit.com>",
        original_ticket=None, recipient="netec.test@netecgc.com", action="failed", status="5.1.1",
        diagnostic="smtp; 550 5.1.1 <netec.test@netecgc.com>: Recipient address rejected: User unknown")


def test_dsn_sample_delivery_failure_with_returned_headers():
    report = parse(corpus_file("spamscope-mail-parser/mail_malformed_2.eml")).delivery_report
    assert report == DeliveryReport(
        original_message_id="<004801d1fc84$01c934ac$b247f0b7$@infospacemail.com>", original_ticket=None,
        recipient="abh@netpar.com.br", action="failed", status="4.2.2", diagnostic=None)


ACK_HEADERS = ("From: Security Team <security@example.com>\r\nTo: alice@researcher.test\r\n"
               "Subject: [SEC-2026-0001] Received: XSS\r\nMessage-ID: <ack.SEC-2026-0001.abc@example.com>\r\n"
               "X-Intake-Ticket: SEC-2026-0001\r\nAuto-Submitted: auto-replied\r\n")


@pytest.mark.parametrize("returned_type", ["message/rfc822", "text/rfc822-headers"])
def test_a_dsn_returning_our_acknowledgement(returned_type: str):
    returned = ACK_HEADERS + ("\r\nWe received your report.\r\n" if returned_type == "message/rfc822" else "")
    raw = mail('From: MAILER-DAEMON@mx.researcher.test\nTo: security@example.com\nSubject: Undelivered Mail\n'
               'Content-Type: multipart/report; report-type=delivery-status; boundary="r"',
               "--r\r\nContent-Type: text/plain\r\n\r\nYour message could not be delivered.\r\n"
               "--r\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx.researcher.test\r\n\r\n"
               "Final-Recipient: rfc822; alice@researcher.test\r\nAction: failed\r\nStatus: 5.1.1\r\n"
               "Diagnostic-Code: smtp; 550 5.1.1 user unknown\r\n"
               f"--r\r\nContent-Type: {returned_type}\r\n\r\n{returned}--r--\r\n")
    parsed = parse(raw)
    assert parsed.is_report == "delivery-status"
    assert parsed.delivery_report == DeliveryReport(
        original_message_id="<ack.SEC-2026-0001.abc@example.com>", original_ticket="SEC-2026-0001",
        recipient="alice@researcher.test", action="failed", status="5.1.1",
        diagnostic="smtp; 550 5.1.1 user unknown")


def test_a_qmail_bounce_quoting_our_headers():
    raw = mail("From: MAILER-DAEMON@mx.researcher.test\nTo: security@example.com\n"
               "Subject: failure notice\nMessage-ID: <bounce1@mx.researcher.test>",
               "Hi. This is the qmail-send program at mx.researcher.test.\r\n"
               "I'm afraid I wasn't able to deliver your message to the following addresses.\r\n"
               "This is a permanent error; I've given up. Sorry it didn't work out.\r\n\r\n"
               "<alice@researcher.test>:\r\n192.0.2.7 does not like recipient.\r\n"
               "Remote host said: 550 5.1.1 <alice@researcher.test>: Recipient address rejected\r\n\r\n"
               "--- Below this line is a copy of the message.\r\n\r\n"
               + ACK_HEADERS + "\r\nWe received your report.\r\n")
    parsed = parse(raw)
    assert parsed.is_report is None
    assert parsed.delivery_report == DeliveryReport(
        original_message_id="<ack.SEC-2026-0001.abc@example.com>", original_ticket="SEC-2026-0001",
        recipient="alice@researcher.test", action="failed", status="5.1.1",
        diagnostic="Remote host said: 550 5.1.1 <alice@researcher.test>: Recipient address rejected")


def test_an_exim_bounce_with_the_returned_message_attached():
    raw = mail("From: Mail Delivery System <Mailer-Daemon@mx.researcher.test>\nTo: security@example.com\n"
               "Subject: Mail delivery failed: returning message to sender\n"
               "X-Failed-Recipients: alice@researcher.test\n"
               'Content-Type: multipart/mixed; boundary="x"',
               "--x\r\nContent-Type: text/plain\r\n\r\n"
               "This message was created automatically by mail delivery software.\r\n\r\n"
               "  alice@researcher.test\r\n    mailbox is full: retry timeout exceeded\r\n"
               "--x\r\nContent-Type: message/rfc822\r\nContent-Disposition: attachment\r\n\r\n"
               + ACK_HEADERS + "\r\nWe received your report.\r\n--x--\r\n")
    report = parse(raw).delivery_report
    assert report is not None
    assert (report.original_message_id, report.original_ticket, report.recipient, report.action) == (
        "<ack.SEC-2026-0001.abc@example.com>", "SEC-2026-0001", "alice@researcher.test", "failed")


def test_a_researcher_quoting_a_bounce_is_not_a_bounce():
    raw = mail("From: Alice <alice@researcher.test>\nSubject: Your MX leaks internal hosts in bounces",
               "Hi. This is the qmail-send program at mx.example.com.\r\n\r\n" + ACK_HEADERS)
    assert parse(raw).delivery_report is None


@pytest.mark.parametrize(("relative", "report_type"), [
    ("mimekit/messages/disposition-notification.txt", "disposition-notification"),
    ("mimekit/messages/feedback-report.txt", "feedback-report"),
])
def test_mdn_and_feedback_reports_are_reports_but_not_bounces(relative: str, report_type: str):
    parsed = parse(corpus_file(relative))
    assert parsed.is_report == report_type
    assert parsed.delivery_report is None  # documented: only bounces carry a DeliveryReport


# -- attachments --------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "expected"), [
    ("../../etc/passwd", "passwd"),
    ("..\\..\\Windows\\boot.ini", "boot.ini"),
    ("/absolute/path/poc.html", "poc.html"),
    ("..", "attachment-3"),
    ("", "attachment-3"),
    ("a\x00b\x07c\r\nd.txt", "abc d.txt"),
    ("a..b...c.sh", "a.b.c.sh"),
    ("<script>.svg", "_script_.svg"),
    ("..hidden", "hidden"),
])
def test_safe_filename(name: str, expected: str):
    assert safe_filename(name, 3) == expected


def test_safe_filename_bounds_long_names_and_keeps_the_extension():
    name = safe_filename("x" * 5_000 + ".pdf", 1)
    assert len(name) == MAX_FILENAME and name.endswith(".pdf")


def test_extract_attachment_round_trip():
    binary = bytes(range(256)) * 20
    text = b"GET /redirect?to=evil HTTP/1.1\r\nHost: example.com\r\n"
    message = EmailMessage()
    message["From"] = "a@example.org"
    message.set_content("see attached\n")
    message.add_attachment(binary, maintype="application", subtype="octet-stream", filename="../../dump.bin")
    message.add_attachment(text, maintype="text", subtype="plain", filename="request.txt")
    raw = message.as_bytes()
    parsed = parse(raw)
    assert [a.filename for a in parsed.attachments] == ["dump.bin", "request.txt"]
    for listed, original in zip(parsed.attachments, (binary, text)):
        attachment, data = extract_attachment(raw, listed.index)
        assert attachment == listed and data == original
        assert attachment.sha256 == hashlib.sha256(original).hexdigest()
    for missing in (0, 3):
        with pytest.raises(LookupError):
            extract_attachment(raw, missing)


# -- time bound ---------------------------------------------------------------------------------


def sleepy_parse(raw: bytes) -> ParsedMail:
    """A parse that hangs on demand: the stand-in for a pathological input (runs in the helper)."""
    if b"X-Test-Hang: yes" in raw:
        time.sleep(60)
    return parse(raw)


def crashing_parse(raw: bytes) -> ParsedMail:
    """A parse that kills its process on demand, as a segfault or the OOM killer would."""
    if b"X-Test-Crash: yes" in raw:
        os._exit(1)
    return parse(raw)


def test_parse_bounded_returns_within_the_bound_and_the_helper_is_usable_after():
    helper = parse_guard.BoundedParser(parse_function=sleepy_parse)
    try:
        assert helper.parse(mail("From: a@example.org\nSubject: warm-up")).subject == "warm-up"
        started = time.monotonic()
        hung = helper.parse(mail("From: Alice <alice@example.org>\nSubject: =?utf-8?q?h=C3=A4ngt?=\n"
                                 "Message-ID: <hang@example.org>\nX-Test-Hang: yes"), timeout=1)
        assert time.monotonic() - started < 1 + QUICK
        assert hung.warnings == ["parse timed out after 1 s"]
        assert (hung.subject, hung.from_address, hung.message_id) == ("hängt", "alice@example.org",
                                                                     "<hang@example.org>")
        after = helper.parse(mail("From: a@example.org\nSubject: next", "next body\n"))
        assert (after.subject, after.body_text, after.warnings) == ("next", "next body\n", [])
    finally:
        helper.close()


def test_the_helper_parses_at_the_lowest_cpu_priority_and_its_caller_keeps_its_own():
    ours = os.nice(0)
    helper = parse_guard.BoundedParser()
    try:
        assert helper.parse(mail("From: a@example.org\nSubject: warm-up")).subject == "warm-up"
        pid = helper._helper.process.pid
        assert os.getpriority(os.PRIO_PROCESS, pid) == 19
        if hasattr(os, "SCHED_BATCH"):
            assert os.sched_getscheduler(pid) == os.SCHED_BATCH
        assert os.nice(0) == ours
    finally:
        helper.close()


def main_reimported(raw: bytes) -> ParsedMail:
    """A parse that says whether its process ran the parent's main script again (its __main__ is then that file)."""
    mail = parse(raw)
    mail.warnings.append(f"main script run again: {hasattr(sys.modules['__main__'], '__file__')}")
    return mail


def test_the_helper_of_a_script_does_not_run_the_script_again(tmp_path):
    """As under the ``intake`` console script: the helper imports what it needs, not the whole CLI."""
    script = tmp_path / "script.py"
    script.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from intake.understand import parse_guard\n"
        "import test_parse\n"
        "if __name__ == '__main__':\n"
        "    helper = parse_guard.BoundedParser(parse_function=test_parse.main_reimported)\n"
        "    print(helper.parse(b'Subject: x\\r\\n\\r\\nbody\\r\\n').warnings)\n"
        "    helper.close()\n")
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "['main script run again: False']"


def test_a_helper_that_dies_is_replaced():
    helper = parse_guard.BoundedParser(parse_function=crashing_parse)
    try:
        died = helper.parse(mail("From: a@example.org\nSubject: boom\nX-Test-Crash: yes"))
        assert died.subject == "boom" and died.warnings[0].startswith("parse helper died")
        assert helper.parse(mail("From: a@example.org\nSubject: fine")).warnings == []
    finally:
        helper.close()


def test_the_helper_scores_as_the_rules_do_and_a_change_of_rules_reaches_it():
    from intake.understand.quality import parse_rules
    raw = mail("From: a@example.org\nSubject: Bounty?", "Your domain has no DMARC record. Do you pay bounties?\n")
    strict = parse_rules('threshold = 1.0\n[[rule]]\nname = "asks"\ndescription = "asks"\nscore = 1.0\n'
                         'body = ["bount"]\n')
    lenient = parse_rules('threshold = 9.0\n[[rule]]\nname = "asks"\ndescription = "asks"\n'
                          'score = 1.0\nbody = ["bount"]\n')
    try:
        result = parse_guard.parse_and_score(raw, strict)
        parsed, quality = result.mail, result.quality
        assert parsed == parse(raw) and quality == strict.score(parse(raw)).as_dict()
        assert quality["low_quality"] and quality["matched"] == ["asks"]
        assert parse_guard.parse_and_score(raw, lenient).quality["low_quality"] is False
    finally:
        parse_guard.close()


def test_a_message_cut_short_is_still_scored_on_what_was_read():
    from intake.understand.quality import parse_rules
    rules = parse_rules('threshold = 1.0\n[[rule]]\nname = "short"\ndescription = "short"\nscore = 1.0\n'
                        'max_body_chars = 10\n')
    helper = parse_guard.BoundedParser(parse_function=sleepy_parse, rules=rules)
    try:
        result = helper.parse_and_score(mail("From: a@example.org\nSubject: x\nX-Test-Hang: yes",
                                             "a long body that is never read\n"), timeout=0.5)
        hung, quality = result.mail, result.quality
        assert hung.warnings == ["parse timed out after 0.5 s"] and quality["matched"] == ["short"]
    finally:
        helper.close()


def _burn_cpu(seconds: float) -> None:
    """Spin for *seconds* of CPU time (the budget, measured in CPU time, is what must stop it)."""
    end = time.process_time() + seconds
    while time.process_time() < end:
        continue


def busy_parse(raw: bytes) -> ParsedMail:
    """A parse that burns CPU on demand (runs in the helper): what a super-linear parser would do."""
    if b"X-Test-Busy: yes" in raw:
        _burn_cpu(30)
    return parse(raw)


class BusyRules:
    """Rules whose scoring of a mail with the subject "busy" burns CPU (picklable: they go to the
    helper), for the budget; other mail scores as no rule matched."""

    def score(self, mail: ParsedMail) -> SpamScore:
        if mail.subject == "busy":
            _burn_cpu(30)
        return SpamScore(0.0, [], 1.0, False)


def test_the_cpu_budget_stops_each_step_and_says_what_was_not_done():
    parser = parse_guard.BoundedParser(parse_function=busy_parse, rules=BusyRules(), budget=0.2)
    credit_me = "Please credit me as Jane Doe.\n"
    try:
        cut = parser.parse_and_score(mail("From: a@example.org\nSubject: x\nX-Test-Busy: yes", credit_me), timeout=20)
        assert cut.mail.warnings == ["processing budget (0.2 s of CPU) spent while parsing; "
                                     "only the header block was read"]
        assert cut.mail.subject == "x" and cut.cpu_seconds > 0.1 and cut.work.report_credit is None
        unscored = parser.parse_and_score(mail("From: a@example.org\nSubject: busy", credit_me), timeout=20)
        assert unscored.mail.warnings == ["processing budget (0.2 s of CPU) spent while scoring: not scored; "
                                          "credit and commands not read"]
        assert unscored.quality == {} and unscored.work.report_credit is None and unscored.mail.body_text
        # The helper is not killed: the next message is read in full, credit included.
        whole = parser.parse_and_score(mail("From: a@example.org\nSubject: y", credit_me))
        assert whole.mail.warnings == [] and whole.work.report_credit.name == "Jane Doe"
    finally:
        parser.close()


def test_parse_bounded_gives_what_parse_gives():
    raw = corpus_file("mimekit/messages/bounce.txt")
    try:
        assert parse_guard.parse_and_score(raw, load_rules(SHIPPED_RULES)).mail == parse(raw)
    finally:
        parse_guard.close()


def test_the_header_only_fallback_reads_loop_headers():
    fallback = parse_headers_only(mail("From: a@example.org\nTo: undisclosed-recipients:;\n"
                                       "Auto-Submitted: auto-replied\nX-Intake-Loop: marker"), "why")
    assert fallback.warnings == ["why"] and fallback.auto_submitted == "auto-replied"
    assert fallback.headers == {"auto-submitted": "auto-replied", "x-intake-loop": "marker"}
    assert fallback.undisclosed_recipients and fallback.body_text == ""


# -- corpus -------------------------------------------------------------------------------------

SAMPLES = sorted(p for p in CORPUS.rglob("*") if p.is_file() and p.suffix in {".eml", ".txt", ""}
                 and not p.name.startswith(("LICENSE", "COPYING", "NOTICE", "README")))


@pytest.mark.skipif(not SAMPLES, reason=f"no corpus at {CORPUS}")
def test_every_corpus_message_parses_quickly_without_falling_back(capsys: pytest.CaptureFixture[str]):
    timings = []
    for path in SAMPLES:
        parsed, seconds = timed_parse(re.sub(rb"\r?\n", b"\r\n", path.read_bytes()))
        timings.append((seconds, path.relative_to(CORPUS).as_posix()))
        assert not [w for w in parsed.warnings if w.startswith(("parse failed", "content extraction failed"))], path
    timings.sort(reverse=True)
    with capsys.disabled():
        print(f"\ncorpus: {len(timings)} messages in {sum(s for s, _ in timings) * 1000:.0f} ms; slowest: "
              + ", ".join(f"{name} {seconds * 1000:.1f} ms" for seconds, name in timings[:3]))
    assert timings[0][0] < QUICK


# -- reading fast: the same Message as feeding the whole message --------------------------------

_LINE_BREAKS = st.sampled_from(["\r\n", "\n", "\r"])
_HEADER_LINES = st.one_of(
    st.sampled_from(["Subject: hello", "From: a@example.org", "X-H: v", "X:", ": no name", "From x",
                     "From ", "no colon here", "Content-Type: text/plain; charset=utf-8",
                     "Content-Type: multipart/mixed; boundary=b", "Content-Type: multipart/mixed",
                     "Content-Type: message/rfc822", "Content-Type: message/delivery-status",
                     "Content-Type: text/plain; a=1; b=2; c=3", "Content-Transfer-Encoding: base64",
                     "X-\xe9t\xe9: 8-bit", "Subject: caf\xe9", "--b", "--b--", ""]),
    st.builds(lambda lead, text: lead + text, st.sampled_from([" ", "\t"]), st.text("ab: \xe9", max_size=12)),
    st.builds(lambda name, text: f"{name}:{text}", st.text("XYab-", min_size=1, max_size=4),
              st.text("ab ;=\xe9", max_size=30)),
)
_BODY_LINES = st.one_of(st.sampled_from(["", "--b", "--b--", "From me", "X: not a header", " indented",
                                         "Content-Type: text/plain", "\xff\xfe bytes"]),
                        st.text("ab \xe9\t:", max_size=10))


@st.composite
def _messages(draw) -> bytes:  # type: ignore[no-untyped-def]
    """Header lines (folded, malformed, 8-bit), then what ends them or not, then body lines; any
    line break anywhere, the last line with or without one."""
    if draw(st.booleans()):  # lines of either kind, in any order
        lines = draw(st.lists(st.tuples(st.one_of(_HEADER_LINES, _BODY_LINES), _LINE_BREAKS), max_size=14))
    else:  # a header block, a blank line or a body line or nothing, a body
        lines = draw(st.lists(st.tuples(_HEADER_LINES.filter(bool), _LINE_BREAKS), max_size=8))
        lines += draw(st.sampled_from([[], [("", "\r\n")], [("", "\n")], [("", "\r")], [("body", "\n")]]))
        lines += draw(st.lists(st.tuples(_BODY_LINES, _LINE_BREAKS), max_size=6))
    text = "".join(line + brk for line, brk in lines)
    if lines and draw(st.booleans()):
        text = text[:-len(lines[-1][1])]  # no line break at the end
    return text.encode("latin-1")


_BOUNDARY_LINES = st.sampled_from(["--b", "--b--", "--c", "--c--", "--b ", "--b\t", "--b--  ", "--bx", "--b-",
                                   "---b", "--", "-- b", " --b"])


@st.composite
def _multipart_messages(draw) -> bytes:  # type: ignore[no-untyped-def]
    """Multiparts (boundary b; parts of any type, among them multipart/alternative with boundary c)
    whose lines are any of the above and near-boundaries, with any line breaks."""
    brk = _LINE_BREAKS
    body = st.lists(st.tuples(st.one_of(_BODY_LINES, _BOUNDARY_LINES, _HEADER_LINES), brk), max_size=8)
    lines = [("Content-Type: multipart/mixed; boundary=b", draw(brk))]
    lines += draw(st.lists(st.tuples(_HEADER_LINES.filter(bool), brk), max_size=3))
    lines += [("", draw(brk))] + draw(body)  # preamble
    for _ in range(draw(st.integers(0, 4))):
        lines += [(draw(st.sampled_from(["--b", "--b ", "--c"])), draw(brk))]
        lines += draw(st.lists(st.tuples(st.one_of(st.sampled_from(
            ["Content-Type: multipart/alternative; boundary=c", "Content-Type: text/html",
             "Content-Type: message/rfc822", "X-Long: " + "long " * 12, "\t" + "folded " * 8]),
            _HEADER_LINES.filter(bool)), brk), max_size=7))
        lines += draw(st.sampled_from([[], [("", "\r\n")], [("", "\n")], [("", "\r")]])) + draw(body)
    if draw(st.booleans()):
        lines += [("--b--", draw(brk))] + draw(body)  # epilogue
    text = "".join(line + brk for line, brk in lines)
    if draw(st.booleans()):
        text = text[:-len(lines[-1][1])]
    return text.encode("latin-1")


def _read_whole(data: bytes, depth: int = 0) -> tuple[Message, mime_reader._Reading]:
    """What the bounded feed parser gives when fed the whole of *data* (the plain, slower way)."""
    reading = mime_reader._Reading()
    parser = mime_reader._BoundedFeedParser(reading, depth)
    parser._join_leaf_body = lambda: None  # type: ignore[method-assign]
    parser._cut_header_block = lambda: None  # type: ignore[method-assign]
    try:
        BytesFeedParser.feed(parser, data)
        return parser.close(), reading
    except mime_reader._PartLimitReached:
        return parser._msgstack[0], reading


def _read_fast(data: bytes, depth: int = 0) -> tuple[Message, mime_reader._Reading]:
    reading = mime_reader._Reading()
    return mime_reader._BoundedFeedParser(reading, depth).parse(data), reading


def _entity(part: Message) -> object:
    payload = part._payload  # raw: get_payload decodes 8-bit bytes
    return (part.get_unixfrom(), part._headers, [(type(d), str(d)) for d in part.defects],
            [_entity(child) for child in payload] if isinstance(payload, list) else payload,
            part.preamble, part.epilogue, part.get_default_type(), getattr(part, "opaque", None))


def _as_bytes(part: Message) -> object:
    random.seed(0)  # a multipart without a boundary gets a random one
    try:
        return part.as_bytes()
    except Exception as exc:  # noqa: BLE001 - then both must fail alike
        return type(exc)


def _assert_read_alike(data: bytes, depth: int = 0) -> None:
    try:
        whole, whole_reading = _read_whole(data, depth)
    except AssertionError:  # the stdlib's, on a field cut before its colon (limits patched tiny)
        with pytest.raises(AssertionError):
            _read_fast(data, depth)
        return
    fast, fast_reading = _read_fast(data, depth)
    assert _entity(fast) == _entity(whole)
    assert _as_bytes(fast) == _as_bytes(whole)
    assert (fast_reading.warnings, fast_reading.header_count, fast_reading.part_count) \
        == (whole_reading.warnings, whole_reading.header_count, whole_reading.part_count)


@given(_messages(), st.sampled_from([0, 1, MAX_MIME_DEPTH]))
@settings(max_examples=400, deadline=None)
def test_reading_fast_gives_the_message_feeding_it_whole_gives(data: bytes, depth: int):
    _assert_read_alike(data, depth)


@given(_multipart_messages(), st.sampled_from([0, 1, MAX_MIME_DEPTH - 1]))
@settings(max_examples=400, deadline=None)
def test_reading_fast_gives_the_multipart_feeding_it_whole_gives(data: bytes, depth: int):
    _assert_read_alike(data, depth)


@given(_messages(), st.integers(1, 4), st.integers(4, 40))
@settings(max_examples=400, deadline=None)
def test_a_header_block_cut_at_the_limits_reads_as_the_whole_block(data: bytes, fields: int, length: int):
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(mime_reader, "MAX_HEADER_FIELDS", fields)
        patch.setattr(mime_reader, "MAX_HEADER_LENGTH", length)
        _assert_read_alike(data)


@given(_multipart_messages(), st.integers(1, 4), st.integers(42, 80))  # the top's boundary kept
@settings(max_examples=400, deadline=None)
def test_a_part_header_block_cut_at_the_limits_reads_as_the_whole_block(data: bytes, fields: int, length: int):
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(mime_reader, "MAX_HEADER_FIELDS", fields)
        patch.setattr(mime_reader, "MAX_HEADER_LENGTH", length)
        _assert_read_alike(data)


@given(st.binary(max_size=300))
@settings(max_examples=300, deadline=None)
def test_reading_fast_gives_the_message_feeding_it_whole_gives_for_any_bytes(data: bytes):
    _assert_read_alike(data)


@pytest.mark.parametrize("case", ["command-lines", "many-headers", "folded-subject"])
def test_floods_read_fast_alike(case: str):
    import adversarial

    _assert_read_alike(adversarial.build(case, 256 * 1024))


@pytest.mark.skipif(not SAMPLES, reason=f"no corpus at {CORPUS}")
def test_every_corpus_message_reads_as_fed_whole(monkeypatch: pytest.MonkeyPatch):
    for path in SAMPLES:
        for raw in {path.read_bytes(), re.sub(rb"\r?\n", b"\r\n", path.read_bytes())}:
            _assert_read_alike(raw)
            fast = parse(raw)
            with monkeypatch.context() as patch:
                patch.setattr(mime_reader._BoundedFeedParser, "parse",
                              lambda self, data: _read_whole_with(self, data))
                patch.setattr(mime_reader._BoundedFeedParser, "_join_leaf_body", lambda self: None)
                patch.setattr(mime_reader._BoundedFeedParser, "_cut_header_block", lambda self: None)
                whole = parse(raw)
            assert fast == whole, path


def _read_whole_with(parser: mime_reader._BoundedFeedParser, data: bytes) -> Message:
    try:
        BytesFeedParser.feed(parser, data)
        return parser.close()
    except mime_reader._PartLimitReached:
        return parser._msgstack[0]
