"""Hostile mail made by code, for the tests and for ``benchmarks/adversarial.py``.

Each case is the kind of input that makes a backtracking regex or a careless loop super-linear:
blank-line floods (issue 12's reply of 60,000 blank lines), quote-marker floods ("On … wrote:",
">"), long whitespace runs, prefixes repeated without their suffix ("credit me as …", "-----Original
Message" without its dashes, "On" without "wrote:"), deep HTML nesting, huge header counts, long
lines, command-line and credit-line floods, bounces full of status codes. ``build(case, size)``
gives a message of about *size* bytes whose body (or headers) is that flood, so a test can make
it small and fast, and the benchmark as large as the listener accepts.
"""

from __future__ import annotations

from collections.abc import Callable
from email import quoprimime
from email.header import Header

# Body text of about `size` characters, by case; each repeats its unit to fill the size.
_BODIES: dict[str, Callable[[int], str]] = {
    "blank-lines": lambda size: "Thanks.\n" + "\n" * size,
    "blank-lines-crlf-spaces": lambda size: "Thanks.\n" + " \t\n" * (size // 3),
    "quote-headers": lambda size: "On Mon, 1 Jan 2026, Alice wrote:\n" * (size // 33),
    "on-without-wrote": lambda size: "On " * (size // 3) + "\n",
    "quote-marks": lambda size: ">" * size + "\n",
    "quoted-lines": lambda size: "> \n" * (size // 3),
    "whitespace-run": lambda size: "x" + " " * size + "x\n",
    "tab-newline-run": lambda size: "x" + "\t \r\n" * (size // 4) + "x\n",
    "credit-prefix": lambda size: "credit me as " * (size // 13) + "\n",
    "credit-trailing-words": lambda size: "Please credit me as Jane" + " and" * (size // 4) + " x\n",
    "credit-lines": lambda size: "credit\n" * (size // 7),
    "credits-colon": lambda size: "credits:" + " " * size + "\n",
    "original-message-partial": lambda size: "-----Original Message" * (size // 21) + "\n",
    "dash-runs": lambda size: "-" * size + "\n",
    "from-lines": lambda size: "From: " * (size // 6) + "\n",
    "command-lines": lambda size: "#a\n" * (size // 3),
    "long-line": lambda size: "a" * size + "\n",
    "handles": lambda size: "credit me as " + "@a" * (size // 2) + "\n",
    "urls": lambda size: "credit me as " + "http://a/" * (size // 9) + "\n",
    "apostrophes": lambda size: "credit me as " + "'" * size + "\n",
    "sentence-dots": lambda size: "credit me as " + "a." * (size // 2) + "\n",
}
# HTML bodies (text/html, no plain part): converted to text first.
_HTML: dict[str, Callable[[int], str]] = {
    "deep-html": lambda size: "<div>" * (size // 10) + "x" + "</div>" * (size // 12),
    "deep-lists": lambda size: "<ul><li>" * (size // 8) + "x",
    "unclosed-script": lambda size: "<p>x</p>" + "<script>" * (size // 8),
    "open-tags": lambda size: "<" * size,
    "entities": lambda size: "&lt;" * (size // 4),
}
# Bounces from a mailer daemon: their text is searched for status codes and returned headers.
_BOUNCES: dict[str, Callable[[int], str]] = {
    "bounce-blank-lines": lambda size: "This message was created automatically by mail delivery software.\n"
                                       + "\n>\n" * (size // 3),
    "bounce-status-codes": lambda size: "This message was created automatically by mail delivery software.\n"
                                        + "5.1.1 " * (size // 6),
    "bounce-reply-lines": lambda size: "This message was created automatically by mail delivery software.\n"
                                       + "4" * size + "\n",
    "bounce-quoted-fields": lambda size: "This message was created automatically by mail delivery software.\n"
                                         + "Message-ID: <x@y>\n" * (size // 18),
}
# Header blocks: many fields, or one field folded or spread over many lines.
_HEADERS: dict[str, Callable[[int], str]] = {
    "many-headers": lambda size: "".join(f"X-H{n}: v\r\n" for n in range(size // 10)),
    "folded-subject": lambda size: "Subject: x" + "\r\n x" * (size // 4) + "\r\n",
    "long-subject": lambda size: "Subject: " + "a" * size + "\r\n",
    "semicolon-parameters": lambda size: "Content-Type: text/plain" + "; a=b" * (size // 5) + "\r\n",
    "many-recipients": lambda size: "To: " + ", ".join(f"a{n}@x.test" for n in range(size // 12)) + "\r\n",
}

CASES = (*_BODIES, *_HTML, *_BOUNCES, *_HEADERS)


def build(case: str, size: int, *, sender: str = "mallory@attacker.test", message_id: str | None = None,
          in_reply_to: str | None = None) -> bytes:
    """The message of *case* with about *size* bytes of its flood, CRLF line endings as on the
    wire, no line over 998 octets (SMTP refuses longer ones: a long body line travels
    quoted-printable, a long header folded or as encoded words, and arrives whole after decoding).
    *in_reply_to* makes it a reply (to thread it into a ticket)."""
    message_id = message_id or f"<{case}.{size}@attacker.test>"
    headers = [f"From: Mallory <{sender}>", "To: security@example.com", f"Message-ID: {message_id}",
               "Date: Thu, 03 Dec 2026 05:00:00 +0000", "MIME-Version: 1.0"]
    if in_reply_to:
        headers += [f"In-Reply-To: {in_reply_to}", f"References: {in_reply_to}"]
    if case in _HEADERS:
        block = _HEADERS[case](size)
        if not block.startswith("Subject:"):
            headers.append(f"Subject: {case}")
        if not block.startswith("Content-Type:"):
            headers.append("Content-Type: text/plain; charset=utf-8")
        return _wire("\r\n".join(headers) + "\r\n" + _folded(block) + "\r\nbody\r\n")
    if case in _BOUNCES:
        headers[0] = "From: Mail Delivery System <MAILER-DAEMON@mx.attacker.test>"
        headers += ["Subject: Undelivered Mail Returned to Sender", "Content-Type: text/plain; charset=utf-8"]
        body = _BOUNCES[case](size)
    else:
        html = case in _HTML
        headers += [f"Subject: {case}", f"Content-Type: text/{'html' if html else 'plain'}; charset=utf-8"]
        body = (_HTML if html else _BODIES)[case](size)
    if max(map(len, body.splitlines() or [""])) > 998:
        headers.append("Content-Transfer-Encoding: quoted-printable")
        body = quoprimime.body_encode(body, eol="\n")
    return _wire("\r\n".join(headers) + "\r\n\r\n" + body)


def _folded(block: str) -> str:
    """Header fields of *block* with no line over 998 octets."""
    fields = []
    for field in block.split("\r\n"):
        name, _, value = field.partition(": ")
        if len(field) <= 998:
            fields.append(field)
        elif " " not in value:  # one long word: encoded words, which decode to it whole
            fields.append(f"{name}: {Header(value, 'utf-8', header_name=name).encode(linesep=chr(13) + chr(10))}")
        else:  # fold at the spaces (RFC 5322 folding)
            fields.append(f"{name}: " + value.replace(" ", "\r\n "))
    return "\r\n".join(fields)


def _wire(text: str) -> bytes:
    """CRLF line endings throughout (a bare CR or LF of a flood becomes a line break, as an MTA sends it)."""
    return "\r\n".join(text.replace("\r\n", "\n").replace("\r", "\n").split("\n")).encode()
