"""intake.replies: the bytes of composed mail."""

from __future__ import annotations

import email.policy
import string
from email.mime.text import MIMEText

from hypothesis import given, settings
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
