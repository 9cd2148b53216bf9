"""A disclosure date a reporter proposes in a mail: ``#disclose 2027-03-01``, or plain words.

Recognised conservatively, in the mail's own words only (quoted ``>`` lines and everything after
an "On … wrote:" header are someone else's, perhaps ours). The command line wins: a line that is
``#disclose`` and an ISO date. Otherwise a line must say that the sender will or wants to
disclose or publish (or name the "disclosure date") *and* give one explicit date: ISO
(``2027-03-01``), day-month-year (``1 March 2027``) or month-day-year (``March 1, 2027``). Never
guessed: relative words ("in 90 days", "next month") give none; a line naming a CVE is left alone
(its dates are the CVE's); digits glued to a version (``v2027-03-01``, ``2027.03.01``) are no
date; two different dates in the mail make it ambiguous, so none is taken. A date that does not
exist (``2027-02-30``) is none. Every pattern sees senders' text: RE2 (:mod:`intake.patterns`).
"""

from __future__ import annotations

from datetime import date

from intake import patterns
from intake.understand import credit_words

COMMAND = "disclose"
_COMMAND_LINE = patterns.compile(r"^\s*#disclose\s+(\d{4})-(\d{2})-(\d{2})\s*$", ignorecase=True)
# Lines longer than this are not read: a proposal is a sentence, not a flood.
_MAX_LINE = 400
# Lines read per mail at most (the prepare stage bounds the text too).
_MAX_LINES = 2000

_MONTHS = {name: number for number, names in enumerate((
    ("january", "jan"), ("february", "feb"), ("march", "mar"), ("april", "apr"), ("may",), ("june", "jun"),
    ("july", "jul"), ("august", "aug"), ("september", "sep", "sept"), ("october", "oct"),
    ("november", "nov"), ("december", "dec")), start=1) for name in names}
_MONTH = "(" + "|".join(sorted(_MONTHS, key=len, reverse=True)) + r")\.?"
_DAY = r"(\d{1,2})(?:st|nd|rd|th)?"
# Not part of a longer token: no letter, digit, dot or hyphen glued before or after (a version).
_BEFORE = r"(?:^|[^\w.-])"
_AFTER = r"(?:$|[^\w-]|\.(?:\s|$))"
_ISO = patterns.compile(_BEFORE + r"(\d{4})-(\d{2})-(\d{2})" + _AFTER)
_DAY_MONTH_YEAR = patterns.compile(_BEFORE + _DAY + r"\s+(?:of\s+)?" + _MONTH + r",?\s+(\d{4})" + _AFTER,
                                   ignorecase=True)
_MONTH_DAY_YEAR = patterns.compile(_BEFORE + _MONTH + r"\s+" + _DAY + r",?\s+(\d{4})" + _AFTER, ignorecase=True)
# What makes a line a proposal: an intent to disclose or publish, or the words "disclosure date".
_INTENT = patterns.compile(
    r"\b(?:(?:plan|planning|intend|intending|propose|proposing|want|would like|'d like|will|shall|going|aim|"
    r"hope|expect|suggest|suggesting)\s+(?:to\s+)?(?:\w+\s+){0,2}?(?:publicly\s+)?(?:disclose|publish|go public|"
    r"release (?:the |my |our )?(?:details|advisory|write-?up|blog post|report))"
    r"|(?:disclosure|publication|embargo end|embargo)\s+date)\b",
    ignorecase=True)
# Every line _COMMAND_LINE or _INTENT matches holds one of these (lowercased).
_KEYWORDS = ("disclos", "publish", "go public", "release", "publication", "embargo")
_CVE = patterns.compile(r"\bCVE-\d{4}-\d+", ignorecase=True)


def _valid(year: str, month: int, day: str) -> date | None:
    try:
        return date(int(year), month, int(day))
    except ValueError:
        return None


def _dates_in(line: str) -> set[date | None]:
    found: set[date | None] = set()
    for match in _ISO.finditer(line):
        found.add(_valid(match.group(1), int(match.group(2)), match.group(3)))
    for match in _DAY_MONTH_YEAR.finditer(line):
        found.add(_valid(match.group(3), _MONTHS[match.group(2).lower()], match.group(1)))
    for match in _MONTH_DAY_YEAR.finditer(line):
        found.add(_valid(match.group(3), _MONTHS[match.group(1).lower()], match.group(2)))
    return found


def _own_lines(text: str) -> list[str]:
    """The sender's own lines: up to a quote header, without ``>`` lines, bounded."""
    return [line for line in credit_words.own_words(text).splitlines()[:_MAX_LINES]
            if not line.lstrip().startswith(">") and len(line) <= _MAX_LINE]


def proposed_date(text: str) -> date | None:
    """The disclosure date *text* (a mail's body) proposes, or None when it proposes none or is
    ambiguous (see the module's rules)."""
    lowered = text.lower()
    if not any(word in lowered for word in _KEYWORDS):
        return None  # most mail: no line can match, none is scanned
    lines = _own_lines(text)
    commanded = {_valid(m.group(1), int(m.group(2)), m.group(3))
                 for line in lines if (m := _COMMAND_LINE.match(line))}
    if commanded:
        return _single(commanded)
    found: set[date | None] = set()
    for line in lines:
        if _CVE.search(line) or not _INTENT.search(line):
            continue
        found |= _dates_in(line)
    return _single(found)


def _single(found: set[date | None]) -> date | None:
    """The one date found; None when there is none, several, or one that does not exist."""
    return next(iter(found)) if len(found) == 1 else None
