"""Score a new report for known low-value patterns ("beg bounty" mail, scanner boilerplate).

Pure: no database, no clock, no network. A :class:`RuleSet` is loaded once from a TOML rules
file and then scores :class:`~intake.understand.parsed_mail.ParsedMail` objects. The score never drops or hides
anything: the caller stores :meth:`SpamScore.as_dict` on the ticket, labels it ``low-quality``
when the score reaches the threshold, and the ticket's policy decides which reply it gets.

Rules file
----------
Top-level keys::

    threshold  = 5.0      # required, > 0: a total score at or above it is low-quality
    scan_chars = 100000   # optional (1000..1000000): only this many leading characters of the
                          # body are searched, so a 10 MB body costs no more than a 100 kB one

    [[rule]]              # one or more
    name        = "missing-email-auth"   # required, unique, kebab-case (a-z, 0-9, '-')
    description = "..."                  # required: shown to whoever reads the ticket
    score       = 3.0                    # required: added when the rule matches (may be 0 or
                                         # negative; the total is rounded to 6 decimals)

and at least one matcher. **All matchers a rule gives must hold** (AND); inside one list of
patterns **any pattern** is enough (OR):

``subject = [regex, ...]``
    a pattern occurs in the subject.
``body = [regex, ...]``
    a pattern occurs in the body (its first ``scan_chars`` characters).
``body_min_matches = N``
    with ``body``: at least N *different* ``body`` patterns occur (default 1); for "this text
    is mostly a scanner report" (several distinct scanner markers).
``subject_or_body = [regex, ...]``
    a pattern occurs in the subject or in the body.
``body_absent = [regex, ...]``
    *none* of the patterns occurs in the body (e.g. no reproduction steps). An empty body has
    none of them.
``body_ignore = [regex, ...]``
    not a matcher: text of the body these patterns match is left out before this rule's
    other patterns look at the body (links to public checker sites are no reproduction
    detail). RE2 has no look-ahead to say "a URL, but not these" inside one pattern.
``triggers = ["word", ...]``
    a pre-check, not a matcher: the rule's ``subject``/``body``/``subject_or_body`` patterns
    are only tried when one of these words occurs (case-insensitive substring) in the subject
    or the scanned body. Every such pattern of the rule must need one of them; the tests of
    the shipped rules hold each rule to its examples. It makes scoring a genuine report,
    which fails nearly every pattern, cheap.
``max_body_chars = N``
    the body, stripped of surrounding whitespace, has at most N characters (a short mail).
``min_recipients = N``
    the mail was addressed to at least N recipients (``ParsedMail.recipient_count``: To + Cc).
``undisclosed_recipients = true|false``
    ``ParsedMail.undisclosed_recipients`` has this value (true: "To: undisclosed-recipients:;"
    or an empty To, i.e. we were Bcc'd on a mass mailing).
``attachment_types = ["application/pdf", "text/*", ...]``
    an attachment's content type matches one of these shell-style globs (case-insensitive).
``requires = ["rule-name", ...]``
    each of these rules, defined *earlier* in the file, matched this mail (for a bonus on top
    of another rule, e.g. "asks for a bounty" *and* the mail is short).

Regular expressions run on RE2 (:mod:`intake.patterns`): time linear in the mail, whatever the
pattern, so an operator's rule cannot make scoring a hostile mail slow. They are compiled once at
load time, case-insensitive and multi-line (turn case-sensitivity back on inside a pattern with
``(?-i:...)``). RE2 has no look-around and no backreferences, and its ``\\b``, ``\\d``, ``\\s``,
``\\w`` are ASCII (``\\pL`` is any letter): a pattern RE2 cannot compile is a load error naming
the rule, so ``intake check-config`` refuses the file. TOML literal strings ('...') need no
backslash escaping; a single quote inside one is written ``\\x27``.
"""

from __future__ import annotations

import fnmatch
import math
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from intake.patterns import Pattern as Regex, UnsupportedPattern, compile as compile_pattern
from intake.vocabulary import LOW_QUALITY_LABEL

__all__ = ["RulesError", "Rule", "RuleSet", "SpamScore", "load_rules", "parse_rules"]

DEFAULT_SCAN_CHARS = 100_000
MAX_SUBJECT_CHARS = 1_000
_NAME = r"^[a-z0-9]+(?:-[a-z0-9]+)*$"
_PATTERN_KEYS = ("subject", "body", "subject_or_body", "body_absent")
_MATCHER_KEYS = (*_PATTERN_KEYS, "max_body_chars", "min_recipients", "undisclosed_recipients",
                 "attachment_types", "requires")


# The rules that ship with intake; `[intake] quality_rules` points at a file of one's own instead.
SHIPPED_RULES = Path(__file__).parent / "rules" / "low-quality.toml"


class RulesError(Exception):
    """The rules file cannot be used; the message names the file, the rule and the problem."""


class MailLike(Protocol):
    """What :meth:`RuleSet.score` reads (``ParsedMail`` has it all)."""

    subject: str
    body_text: str
    recipient_count: int
    undisclosed_recipients: bool
    attachments: Sequence[Any]  # each with .content_type


# -- the file's schema ------------------------------------------------------------------------

Pattern = Annotated[str, Field(min_length=1)]
Patterns = Annotated[list[Pattern], Field(min_length=1)]


class _RuleSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    name: str = Field(pattern=_NAME, max_length=64)
    description: str = Field(min_length=1)
    score: float = Field(allow_inf_nan=False)
    subject: Patterns | None = None
    body: Patterns | None = None
    body_min_matches: int | None = Field(default=None, ge=1)
    subject_or_body: Patterns | None = None
    body_absent: Patterns | None = None
    body_ignore: Patterns | None = None
    max_body_chars: int | None = Field(default=None, ge=0)
    min_recipients: int | None = Field(default=None, ge=1)
    undisclosed_recipients: bool | None = None
    attachment_types: Annotated[list[Pattern], Field(min_length=1)] | None = None
    requires: Annotated[list[Annotated[str, Field(pattern=_NAME)]], Field(min_length=1)] | None = None
    triggers: Annotated[list[Annotated[str, Field(min_length=2)]], Field(min_length=1)] | None = None

    @field_validator(*_PATTERN_KEYS, "body_ignore")
    @classmethod
    def _compiles(cls, patterns: list[str] | None) -> list[str] | None:
        for number, pattern in enumerate(patterns or [], start=1):
            try:
                _compile_one(pattern)
            except UnsupportedPattern as exc:
                raise ValueError(f"pattern {number} {pattern!r} is not a valid regular expression "
                                 f"(RE2, the linear-time engine): {exc.why}") from None
        return patterns

    @model_validator(mode="after")
    def _shape(self) -> _RuleSpec:
        if all(getattr(self, key) is None for key in _MATCHER_KEYS):
            raise ValueError(f"has no matcher (give at least one of: {', '.join(_MATCHER_KEYS)})")
        if self.triggers is not None and all(getattr(self, k) is None for k in ("subject", "body", "subject_or_body")):
            raise ValueError("triggers need a subject, body or subject_or_body list to guard")
        if self.body_min_matches is not None:
            if self.body is None:
                raise ValueError("body_min_matches needs a body list")
            if self.body_min_matches > len(self.body):
                raise ValueError(f"body_min_matches = {self.body_min_matches} but body has only "
                                 f"{len(self.body)} pattern(s)")
        return self


class _RulesFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    threshold: float = Field(gt=0, allow_inf_nan=False)
    scan_chars: int = Field(default=DEFAULT_SCAN_CHARS, ge=1_000, le=1_000_000)
    rule: list[_RuleSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _names(self) -> _RulesFile:
        seen: dict[str, int] = {}
        for number, spec in enumerate(self.rule, start=1):
            if spec.name in seen:
                raise ValueError(f"rule {spec.name!r} is defined twice (rules #{seen[spec.name]} and #{number})")
            for required in spec.requires or []:
                if required not in seen:
                    where = "is defined later" if any(r.name == required for r in self.rule) else "does not exist"
                    raise ValueError(f"rule {spec.name!r} (#{number}): requires {required!r}, which {where} "
                                     "(a rule may only require rules above it)")
            seen[spec.name] = number
        return self


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


def _compile_one(pattern: str) -> Regex:
    return compile_pattern(pattern, ignorecase=True, multiline=True)


def _compile(patterns: list[str] | None) -> tuple[Regex, ...] | None:
    return None if patterns is None else tuple(_compile_one(p) for p in patterns)


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

    @classmethod
    def _from_spec(cls, spec: _RuleSpec) -> Rule:
        return cls(
            name=spec.name,
            description=spec.description,
            score=spec.score,
            subject=_compile(spec.subject),
            body=_compile(spec.body),
            body_min_matches=spec.body_min_matches or 1,
            subject_or_body=_compile(spec.subject_or_body),
            body_absent=_compile(spec.body_absent),
            body_ignore=_compile(spec.body_ignore),
            max_body_chars=spec.max_body_chars,
            min_recipients=spec.min_recipients,
            undisclosed_recipients=spec.undisclosed_recipients,
            attachment_types=None if spec.attachment_types is None else tuple(t.lower() for t in spec.attachment_types),
            requires=tuple(spec.requires or ()),
            triggers=tuple(t.lower() for t in spec.triggers or ()),
        )

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


# -- loading ---------------------------------------------------------------------------------


def load_rules(path: Path) -> RuleSet:
    """Read and validate the rules file at *path*, or raise :class:`RulesError`."""
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise RulesError(f"{path}: no such rules file") from None
    except UnicodeDecodeError as exc:
        raise RulesError(f"{path}: not UTF-8 text: {exc}") from None
    except OSError as exc:
        raise RulesError(f"{path}: cannot read: {exc.strerror}") from None
    return parse_rules(text, source=str(path))


def parse_rules(text: str, source: str = "<rules>") -> RuleSet:
    """Validate the rules in TOML *text*; *source* names it in error messages."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RulesError(f"{source}: not valid TOML: {exc}") from None
    try:
        spec = _RulesFile.model_validate(data)
    except ValidationError as exc:
        problems = [_describe(error, data) for error in exc.errors()]
        raise RulesError("\n".join(f"{source}: {problem}" for problem in problems)) from None
    rules = tuple(Rule._from_spec(rule) for rule in spec.rule)
    return RuleSet(threshold=spec.threshold, rules=rules, scan_chars=spec.scan_chars, source=source)


def _describe(error: dict[str, Any], data: dict[str, Any]) -> str:
    """One pydantic error as 'rule 'name' (#3): key: problem'."""
    location = list(error["loc"])
    where: list[str] = []
    in_rule = len(location) >= 2 and location[0] == "rule" and isinstance(location[1], int)
    if in_rule:
        number = location[1] + 1
        raw = data.get("rule")
        entry = raw[location[1]] if isinstance(raw, list) and location[1] < len(raw) else None
        name = entry.get("name") if isinstance(entry, dict) else None
        where.append(f"rule {name!r} (#{number})" if isinstance(name, str) and name else f"rule #{number}")
        location = location[2:]
    if location:
        key = str(location[0]) + "".join(f"[{part + 1}]" if isinstance(part, int) else f".{part}"
                                         for part in location[1:])
        where.append(key)
    if error["type"] == "extra_forbidden":
        known = (("name", "description", "score", *_MATCHER_KEYS, "body_min_matches") if in_rule
                 else ("threshold", "scan_chars", "rule"))
        message = f"unknown key (known keys: {', '.join(known)})"
    elif error["type"] == "missing":
        message = "required key is missing"
    else:
        message = error["msg"].removeprefix("Value error, ")
    return ": ".join([*where, message]) if where else message
