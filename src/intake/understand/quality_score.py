"""Low-quality scoring: the loaded rules (:class:`RuleSet`, :class:`Rule`) and their verdict on a
mail (:class:`SpamScore`). Pure: no database, no clock, no network.

The rules file's format, its checks and its loading are :mod:`intake.understand.quality`'s; this
module holds only what scoring needs, without the file's models (pydantic), so that the parse
helper, which scores every message, imports none of them.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from intake.patterns import Pattern as Regex
from intake.vocabulary import LOW_QUALITY_LABEL

DEFAULT_SCAN_CHARS = 100_000
MAX_SUBJECT_CHARS = 1_000


class MailLike(Protocol):
    """What :meth:`RuleSet.score` reads (``ParsedMail`` has it all)."""

    subject: str
    body_text: str
    recipient_count: int
    undisclosed_recipients: bool
    attachments: Sequence[Any]  # each with .content_type


# -- the loaded rules ------------------------------------------------------------------------


@dataclass(frozen=True)
class _Mail:
    """The parts of a mail the matchers look at, computed once per score()."""

    subject: str
    body: str  # the first scan_chars characters
    body_chars: int  # length of the whole body without surrounding whitespace
    folded: str  # subject and body, lowercased: what triggers are looked up in
    recipient_count: int
    undisclosed_recipients: bool
    attachment_types: tuple[str, ...]


@dataclass(frozen=True)
class Rule:
    """One named rule; :meth:`matches` is true when every matcher it has holds."""

    name: str
    description: str
    score: float
    subject: tuple[Regex, ...] | None = None
    body: tuple[Regex, ...] | None = None
    body_min_matches: int = 1
    subject_or_body: tuple[Regex, ...] | None = None
    body_absent: tuple[Regex, ...] | None = None
    body_ignore: tuple[Regex, ...] | None = None
    max_body_chars: int | None = None
    min_recipients: int | None = None
    undisclosed_recipients: bool | None = None
    attachment_types: tuple[str, ...] | None = None
    requires: tuple[str, ...] = ()
    triggers: tuple[str, ...] = ()

    def _matches(self, mail: _Mail, matched: set[str]) -> bool:
        # Cheap checks first; each regex list is searched only if everything before it held.
        if any(name not in matched for name in self.requires):
            return False
        if self.max_body_chars is not None and mail.body_chars > self.max_body_chars:
            return False
        if self.min_recipients is not None and mail.recipient_count < self.min_recipients:
            return False
        if self.undisclosed_recipients is not None and mail.undisclosed_recipients != self.undisclosed_recipients:
            return False
        if self.attachment_types is not None and not any(
            fnmatch.fnmatchcase(kind, glob) for kind in mail.attachment_types for glob in self.attachment_types
        ):
            return False
        # A substring search is ~100x cheaper than a case-insensitive regex over the same text.
        if self.triggers and not any(trigger in mail.folded for trigger in self.triggers):
            return False
        if self.body_ignore is not None:
            mail = replace(mail, body=_blank(self.body_ignore, mail.body))
        if self.subject is not None and not _any(self.subject, mail.subject):
            return False
        if self.subject_or_body is not None and not (
            _any(self.subject_or_body, mail.subject) or _any(self.subject_or_body, mail.body)
        ):
            return False
        if self.body is not None and not _at_least(self.body, mail.body, self.body_min_matches):
            return False
        if self.body_absent is not None and _any(self.body_absent, mail.body):
            return False
        return True


def _any(patterns: tuple[Regex, ...], text: str) -> bool:
    return any(p.search(text) for p in patterns)


def _blank(patterns: tuple[Regex, ...], text: str) -> str:
    for pattern in patterns:
        text = pattern.sub(" ", text)
    return text


def _at_least(patterns: tuple[Regex, ...], text: str, wanted: int) -> bool:
    found = 0
    for index, pattern in enumerate(patterns):
        if found + (len(patterns) - index) < wanted:
            return False  # not enough patterns left to get there
        if pattern.search(text):
            found += 1
            if found >= wanted:
                return True
    return False


@dataclass(frozen=True)
class SpamScore:
    """The verdict on one report: total score, the rules that matched (file order), and whether
    the total reached the threshold. ``as_dict()`` is what gets stored on the ticket."""

    score: float
    matched: list[str]
    threshold: float
    low_quality: bool

    def as_dict(self) -> dict[str, Any]:
        return {"score": self.score, "matched": list(self.matched), "threshold": self.threshold,
                "low_quality": self.low_quality}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SpamScore:
        return cls(score=float(data["score"]), matched=[str(m) for m in data["matched"]],
                   threshold=float(data["threshold"]), low_quality=bool(data["low_quality"]))

    def summary(self) -> str:
        """One line for people: 'low-quality: score 10 >= 5 (missing-email-auth, bounty-ask)'."""
        verdict = LOW_QUALITY_LABEL if self.low_quality else "not low-quality"
        relation = ">=" if self.low_quality else "<"
        rules = ", ".join(self.matched) or "no rule matched"
        return f"{verdict}: score {self.score:g} {relation} {self.threshold:g} ({rules})"


@dataclass(frozen=True)
class RuleSet:
    """Validated, compiled rules; :meth:`score` is pure and safe to call from many threads."""

    threshold: float
    rules: tuple[Rule, ...]
    scan_chars: int = DEFAULT_SCAN_CHARS
    source: str = "<rules>"
    _by_name: dict[str, Rule] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._by_name.update({rule.name: rule for rule in self.rules})

    def rule(self, name: str) -> Rule | None:
        """The rule called *name* (e.g. for its description in `intake show`), or None."""
        return self._by_name.get(name)

    def score(self, mail: MailLike) -> SpamScore:
        """Score *mail*: the sum of the scores of every matching rule."""
        body = mail.body_text or ""
        view = _Mail(
            subject=(mail.subject or "")[:MAX_SUBJECT_CHARS],
            body=body[: self.scan_chars],
            body_chars=len(body.strip()),
            folded=f"{(mail.subject or '')[:MAX_SUBJECT_CHARS]}\n{body[: self.scan_chars]}".lower(),
            recipient_count=mail.recipient_count,
            undisclosed_recipients=mail.undisclosed_recipients,
            attachment_types=tuple(
                (a.content_type or "").split(";", 1)[0].strip().lower() for a in mail.attachments
            ),
        )
        matched: list[str] = []
        matched_set: set[str] = set()
        for rule in self.rules:
            if rule._matches(view, matched_set):
                matched.append(rule.name)
                matched_set.add(rule.name)
        total = round(math.fsum(self._by_name[name].score for name in matched), 6) + 0.0  # no -0.0
        return SpamScore(score=total, matched=matched, threshold=self.threshold, low_quality=total >= self.threshold)
