"""How reporters want to be credited, and who to thank in release notes.

A preference is recognised in the report when the reporter states it on a line of its own text
("please credit me as Jane Doe (@janed, https://jane.example)", "Credit: Jane Doe", "I'd like to be
credited as …", "please keep me anonymous", "no credit"), and later in a reply of theirs that states
it; a maintainer sets or corrects it with ``intake credit``. It is stored on the ticket (``credit``)
and each change is a ``credit-set`` event.

``intake credits`` lists the credits of tickets that went out since a date: a ticket counts from
its first *released*, *disclosed* or *resolved* milestone (the time the milestone happened, as
recorded with ``--at``). Anonymous reporters are listed as "anonymous reporter", so the notes
still count every report; tickets with no preference are named separately so someone asks.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, select
from sqlmodel import Session

from intake import patterns
from intake.store import audit
from intake.store.db import read_session
from intake.store.models import Event, Ticket
from intake.vocabulary import MILESTONE_SPECS, EventKind, Milestone

ANONYMOUS_LABEL = "anonymous reporter"
# The milestones after which a report's credit belongs in release notes.
OUT_MILESTONES = tuple(spec.name for spec in MILESTONE_SPECS if spec.credit_out)

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
_MARKDOWN_SPECIAL = patterns.compile(r"([\\`*_{}\[\]()<>#+!|~])")
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


def event_detail(credit: Credit | None) -> dict[str, Any]:
    """The detail of a ``credit-set`` event (``{"cleared": True}`` when the preference is removed)."""
    return credit.as_dict() if credit else {"cleared": True}


def set_credit(session: Session, ticket: Ticket, credit: Credit | None, now: datetime, actor: str) -> bool:
    """Record *credit* (None: forget it) on *ticket*, with an event; False if it was already so."""
    stored = credit.as_dict() if credit else None
    if _same_preference(ticket.credit, stored):
        return False
    ticket.credit = stored
    ticket.updated_at = now
    # Not records.add_event: records imports this module to set the credit a reply states.
    audit.add_events(session, [dict(ticket_id=ticket.id, at=now, actor=actor, kind=EventKind.CREDIT_SET,
                                    detail=event_detail(credit))])
    return True


def _same_preference(a: dict[str, Any] | None, b: dict[str, Any] | None) -> bool:
    """Equal in what is credited (not in where it was learnt)."""
    keys = ("anonymous", "name", "handle", "url")
    return (a is None) == (b is None) and (a is None or all(a.get(k) == b.get(k) for k in keys))


def credit_of(ticket: Ticket) -> Credit | None:
    return Credit.from_dict(ticket.credit) if ticket.credit else None


# -- release notes ------------------------------------------------------------------------------


@dataclass(frozen=True)
class CreditLine:
    """A ticket that went out, and whom to thank for it."""

    reference: str
    subject: str
    milestone: str  # the first of OUT_MILESTONES it reached
    at: datetime  # when that happened
    version: str | None  # the release that carries the fix, if recorded
    credit: Credit | None  # None: no preference recorded

    def as_dict(self) -> dict[str, Any]:
        credit = self.credit
        return {"reference": self.reference, "subject": self.subject, "milestone": self.milestone,
                "at": self.at.isoformat(), "version": self.version,
                "anonymous": bool(credit and credit.anonymous),
                "name": credit.name if credit else None, "handle": credit.handle if credit else None,
                "url": credit.url if credit else None, "credited_as": credit.display if credit else None}


def went_out(engine: Engine, since: datetime | None) -> list[CreditLine]:
    """Tickets whose first released/disclosed/resolved milestone happened at or after *since*
    (all such tickets when None), in the order they went out."""
    with read_session(engine) as session:
        rows = session.execute(
            select(Event.ticket_id, Event.detail).where(Event.kind == EventKind.MILESTONE).order_by(Event.at, Event.id)
        ).all()
        reached: dict[int, dict[str, tuple[datetime, dict[str, Any]]]] = {}
        for ticket_id, detail in rows:
            if detail.get("milestone") in OUT_MILESTONES:
                # The latest recording of a milestone is the one in force (as for the deadlines).
                reached.setdefault(ticket_id, {})[detail["milestone"]] = (datetime.fromisoformat(detail["at"]), detail)
        if not reached:
            return []
        found = {t.id: t for t in session.scalars(select(Ticket).where(Ticket.id.in_(reached)))}
    lines = []
    for ticket_id, milestones in reached.items():
        milestone, (at, _) = min(milestones.items(), key=lambda item: item[1][0])
        if since is not None and at < since:
            continue
        ticket = found[ticket_id]
        version = milestones[Milestone.RELEASED][1].get("version") if Milestone.RELEASED in milestones else None
        lines.append(CreditLine(ticket.reference, ticket.subject, milestone, at, version, credit_of(ticket)))
    return sorted(lines, key=lambda line: (line.at, line.reference))


def render(lines: list[CreditLine], fmt: str, since: datetime | None) -> str:
    """The credits of *lines* as ``text``, ``markdown`` or ``json`` (tickets without a preference
    appear only in JSON, under ``without_preference``)."""
    known = [line for line in lines if line.credit is not None]
    if fmt == "json":
        return json.dumps({"since": since.isoformat() if since else None,
                           "credits": [line.as_dict() for line in known],
                           "without_preference": [line.reference for line in lines if line.credit is None]},
                          indent=2, ensure_ascii=False)
    if fmt == "markdown":
        return "\n".join(f"- {_markdown_credit(line.credit)} ({line.reference})" for line in known)
    return "\n".join(f"{line.reference}  {line.milestone} {line.at:%Y-%m-%d}  {line.credit.display}"
                     f"{'  ' + line.credit.url if line.credit.url else ''}" for line in known)


def _markdown_credit(credit: Credit) -> str:
    if credit.anonymous:
        return ANONYMOUS_LABEL.capitalize()
    shown = _markdown_escape(credit.display)
    return f"[{shown}]({credit.url.replace(')', '%29')})" if credit.url else shown


def _markdown_escape(text: str) -> str:
    """Reporter-chosen text, literal in Markdown (no links, emphasis or HTML of theirs)."""
    return _MARKDOWN_SPECIAL.sub(r"\\\1", text)
