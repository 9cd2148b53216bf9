"""A reporter's credit preference as their own words state it: the :class:`Credit` value, its
checks (:func:`make`), and the statement recognised in a report or a reply (:func:`recognise`).

Pure text work on RE2 patterns (see :mod:`intake.patterns`): the parse helper reads every
message's credit (:mod:`intake.understand.text_work`) without the database's modules; storing a
preference and listing who to thank are :mod:`intake.tickets.credit`'s.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from intake import patterns

ANONYMOUS_LABEL = "anonymous reporter"

_MAX_NAME = 120
_MAX_STATEMENT = 200
# Lines naming credit or anonymity read for a statement: a real one is among the first few, and a
# flood of such lines must not cost a regex search each.
_MAX_CANDIDATE_LINES = 100
# A statement that names the credit; the value is the rest of the line. These patterns see the
# reporter's text: they run on RE2 (see intake.patterns), \b and \s there being ASCII.
_CREDIT_AS = patterns.compile(r"(?:\bcredit\s+me\s+as\b|\bcredited\s+as\b|^\s*credits?\s*:)\s*:?\s*(?P<value>.*)",
                              ignorecase=True)
# A statement asking for no credit. "No credit" counts only as the whole line, so that
# "no credit card numbers leak" is not a wish to stay anonymous.
_NO_CREDIT = patterns.compile(
    r"\b(?:keep\s+me|stay|remain|be\s+kept)\s+anonymous\b"
    r"|\b(?:do\s+not|don'?t)\s+(?:credit\s+me|(?:need|want)\s+(?:any\s+)?credit)\b"
    r"|^[^\pL\pN_]*(?:please[^\pL\pN_]+)?no\s+credit(?:[^\pL\pN_]+(?:please|needed|required|necessary))?[^\pL\pN_]*$",
    ignorecase=True)
_HTTP_URL = patterns.compile(r"https?://\S+", ignorecase=True)
_URL = patterns.compile(r"https?://[^\s<>()\"',;]+", ignorecase=True)
# A handle (group 2), not inside an address or a URL: what comes before it (group 1) is kept, as
# the look-behind of re would have it.
_HANDLE = patterns.compile(r"(^|[^\pL\pN_.@/])(@[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?)")
# Where a name ends: the end of its sentence (not an initial's dot: "J. Doe"), i.e. the mark
# after two characters that are neither space nor dot.
_SENTENCE_END = patterns.compile(r"[^\s.]{2}([.!?;])(?:\s|$)")
_BRACKETS = patterns.compile(r"[()\[\]<>{}\"“”*_`]")
_SPACE_BEFORE_MARK = patterns.compile(r"\s+([.!?;])")
_TRAILING_WORDS = patterns.compile(r"(?:\s+(?:and|with|or|at|on|via|from|of|-|–|—))+$", ignorecase=True)
_QUOTE_HEADER = patterns.compile(r"^\s*(?:On\b.*\bwrote:|-{2,}\s*Original Message\s*-{2,}|From:\s)",
                                 ignorecase=True, multiline=True)
_ANONYMOUS_VALUES = {"anonymous", "anon", "none", "nobody", "no one", "no credit", "n/a", "-"}


class CreditError(ValueError):
    """A preference that cannot be recorded as given; the message says why."""


@dataclass(frozen=True)
class Credit:
    """A reporter's credit preference."""

    anonymous: bool
    name: str | None = None
    handle: str | None = None
    url: str | None = None
    source: str = "cli"  # report | reply | cli | mail (a maintainer's #credit)
    statement: str | None = None  # the reporter's words it was recognised from

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Credit:
        return cls(**{key: data.get(key) for key in ("name", "handle", "url", "statement")},
                   anonymous=bool(data.get("anonymous")), source=data.get("source") or "cli")

    @property
    def display(self) -> str:
        """One line for people: "Jane Doe (@janed)", "@janed", or "anonymous reporter"."""
        if self.anonymous:
            return ANONYMOUS_LABEL
        if self.name and self.handle:
            return f"{self.name} ({self.handle})"
        return self.name or self.handle or ""


def make(*, name: str | None = None, handle: str | None = None, url: str | None = None, anonymous: bool = False,
         source: str = "cli", statement: str | None = None) -> Credit:
    """A checked preference: anonymous, or a name and/or handle with an optional http(s) URL."""
    name, handle, url = (_clean_field(v) for v in (name, handle, url))
    if anonymous:
        if name or handle or url:
            raise CreditError("an anonymous credit has no name, handle or URL")
        return Credit(True, source=source, statement=statement)
    if not name and not handle:
        raise CreditError("give a name or a handle (or anonymous)")
    if url and not _HTTP_URL.fullmatch(url):
        raise CreditError(f"{url!r} is not an http(s) URL")
    if name and len(name) > _MAX_NAME:
        raise CreditError(f"the name is longer than {_MAX_NAME} characters")
    return Credit(False, name, handle, url, source, statement)


def _clean_field(value: str | None) -> str | None:
    value = " ".join((value or "").split())  # no line breaks into release notes
    return value or None


def recognise(text: str, source: str = "report") -> Credit | None:
    """The credit preference the reporter states in *text*, if a line of it states one (quoted
    lines, "> …", are someone else's words); the first statement wins, among the first
    ``_MAX_CANDIDATE_LINES`` lines that name credit or anonymity."""
    candidates = 0
    for line in text.splitlines():
        folded = line.lower()
        # Every statement names credit or anonymity: the regular expressions only see such lines
        # (this runs on every report, and most say neither).
        if ("credit" not in folded and "anonymous" not in folded) or line.lstrip().startswith(">"):
            continue
        candidates += 1
        if candidates > _MAX_CANDIDATE_LINES:
            return None
        statement = line.strip()[:_MAX_STATEMENT]
        if _NO_CREDIT.search(line):
            return Credit(True, source=source, statement=statement)
        found = _CREDIT_AS.search(line)
        if found:
            credit = _parse_value(found.group("value"), source, statement)
            if credit is not None:
                return credit
    return None


def own_words(reply: str) -> str:
    """*reply* up to where it quotes earlier mail unmarked ("On … wrote:", "-----Original Message-----"):
    the quoted report must not undo a preference set since."""
    return _QUOTE_HEADER.split(reply, maxsplit=1)[0]


def _parse_value(value: str, source: str, statement: str) -> Credit | None:
    """'Jane Doe (@janed, https://jane.example). Thanks!' -> name, handle and URL."""
    urls = [u.rstrip(".!?:") for u in _URL.findall(value)]
    rest = _URL.sub(" ", value)
    handles = [found.group(2) for found in _HANDLE.finditer(rest)]
    rest = _HANDLE.sub(lambda found: found.group(1) + " ", rest)
    rest = _unquote(_BRACKETS.sub(" ", rest)).replace(",", " ")
    rest = _SPACE_BEFORE_MARK.sub(r"\1", " ".join(rest.split()))  # "Doe ( ). Thanks" -> "Doe. Thanks"
    end = _SENTENCE_END.search(rest)
    name = rest[:end.start(1)] if end else rest
    name = _TRAILING_WORDS.sub("", name).strip(" .:-")
    if name.lower() in _ANONYMOUS_VALUES and not handles and not urls:
        return Credit(True, source=source, statement=statement)
    try:
        return make(name=name[:_MAX_NAME] or None, handle=handles[0] if handles else None,
                    url=urls[0] if urls else None, source=source, statement=statement)
    except CreditError:
        return None  # nothing usable on the line: not a statement after all


def _unquote(text: str) -> str:
    """*text* with its quote marks blanked: every ``'`` but an apostrophe inside a word ("O'Brien")."""
    def word(at: int) -> bool:
        return 0 <= at < len(text) and (text[at].isalnum() or text[at] == "_")
    return "".join(" " if char == "'" and not (word(at - 1) and word(at + 1)) else char
                   for at, char in enumerate(text))
