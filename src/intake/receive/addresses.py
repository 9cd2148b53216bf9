"""MAIL FROM and RCPT TO addresses read as aiosmtpd reads them, the common form without its parser.

aiosmtpd (1.4.x, ``SMTP._getaddr``) reads each address with the email package's header parser
(``get_angle_addr``), and defines a class each time it does: 80 µs an address, two per message,
about a tenth of what the listener spends on one. For the form nearly all mail uses,
``<local@domain>`` with both parts dot-atoms of printable ASCII, that parser's answer is the text
between the brackets, and what follows ``>`` without the white space before it: :func:`simple`
gives that answer directly. Anything else (quoted or non-ASCII local parts, source routes,
address literals, comments, white space inside, ``=?`` that could start an encoded word, no
brackets) it leaves to aiosmtpd, so what is accepted or refused, and how, stays aiosmtpd's.
tests/test_as_aiosmtpd.py holds the two to the same answers over a table of addresses.
"""

from __future__ import annotations

import re

# RFC 5322 atext: the printable ASCII the header parser takes in an atom (all but its specials).
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_DOT_ATOM = rf"{_ATEXT}+(?:\.{_ATEXT}+)*"
_SIMPLE = re.compile(rf"<({_DOT_ATOM})@{_DOT_ATOM}>")


def simple(arg: str, local_part_limit: int) -> tuple[str | None, str | None] | None:
    """aiosmtpd's ``_getaddr(arg)`` (address, the rest) when *arg* is a simple ``<local@domain>``
    (the address None when its local part is over *local_part_limit*, 0: no limit); None when
    *arg* is anything else, for aiosmtpd's parser to read."""
    match = _SIMPLE.match(arg)
    if match is None or "=?" in arg:
        return None
    rest = arg[match.end():]
    if rest[:1] in (" ", "\t"):
        rest = rest.lstrip()  # the parser's folding white space: every kind of space (str.lstrip)
    if rest[:1] == "(":  # a comment, which the parser would take out
        return None
    if local_part_limit and len(match.group(1)) > local_part_limit:
        return None, None  # as aiosmtpd answers it
    return match.group(0)[1:-1], rest
