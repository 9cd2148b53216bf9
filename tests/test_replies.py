"""intake.replies: the bytes of composed mail."""

from __future__ import annotations

import email.policy
import string
from email.mime.text import MIMEText

from hypothesis import assume, given, settings
from hypothesis import strategies as st

from intake import replies

_STDLIB = email.policy.compat32.clone(linesep="\r\n")


@settings(max_examples=300, deadline=None)
@given(name=st.sampled_from(["Subject", "To", "Message-ID", "References", "X-Intake-Ticket"]),
       value=st.text(alphabet=string.printable + "é✓", max_size=120))
def test_header_lines_are_the_bytes_the_stdlib_writes(name, value):
    """The fast path for short ASCII headers changes the cost of composing, never the bytes."""
    if "\r" in value or "\n" in value:
        return  # compose refuses line breaks in headers before they get here
    message = MIMEText("body\n", "plain", "us-ascii")
    message[name] = value
    assert _outcome(message, replies._COMPAT32_CRLF) == _outcome(message, _STDLIB)


def _outcome(message: MIMEText, policy: email.policy.Policy) -> bytes | str:
    """The bytes, or the kind of error (the stdlib refuses values that would start a new header)."""
    try:
        return message.as_bytes(policy=policy)
    except Exception as exc:  # noqa: BLE001 - compared, not hidden
        return type(exc).__name__


_HEADER_NAMES = st.sampled_from(["To", "Subject", "Date", "Message-ID", "In-Reply-To", "References", "Reply-To",
                                 "Auto-Submitted", "X-Intake-Ticket"])
_HEADER_VALUES = st.text(alphabet=string.printable.replace("\r", "").replace("\n", "") + "é✓€", max_size=200)


@settings(max_examples=300, deadline=None)
@given(sender_name=st.text(alphabet=string.printable + "é", max_size=60),
       headers=st.lists(st.tuples(_HEADER_NAMES, _HEADER_VALUES), max_size=12),
       body=st.text(alphabet=string.printable + "\r", max_size=3000))
def test_an_ascii_text_mail_is_the_bytes_mimetext_writes(sender_name, headers, body):
    """compose writes ASCII text mail itself: the bytes must be the stdlib's, header for header."""
    from email.header import Header
    from email.utils import formataddr

    assume(all(value.isascii() for name, value in headers if name == "To"))  # else: the SMTPUTF8 path
    try:
        composed: bytes | str = replies.compose((sender_name, "security@example.com"), headers, body)
    except Exception as exc:  # noqa: BLE001 - compared, not hidden
        composed = type(exc).__name__
    stdlib = MIMEText(body, "plain", "us-ascii")
    stdlib["From"] = formataddr((sender_name, "security@example.com"), charset="utf-8")
    for name, value in headers:
        stdlib[name] = value if value.isascii() else Header(value, "utf-8")
    assert composed == _outcome(stdlib, _STDLIB)
