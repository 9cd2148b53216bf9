"""Score a new report for known low-value patterns ("beg bounty" mail, scanner boilerplate).

Pure: no database, no clock, no network. A :class:`RuleSet` is loaded once from a TOML rules
file (here) and then scores :class:`~intake.understand.parsed_mail.ParsedMail` objects. The score never drops or hides
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

import tomllib
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from intake.patterns import Pattern as Regex, UnsupportedPattern, compile as compile_pattern
from intake.understand.quality_score import DEFAULT_SCAN_CHARS, Rule, RuleSet, SpamScore

# Rule, RuleSet and SpamScore are intake.understand.quality_score's, named here too: what loading gives.
__all__ = ["RulesError", "Rule", "RuleSet", "SpamScore", "load_rules", "parse_rules"]

_NAME = r"^[a-z0-9]+(?:-[a-z0-9]+)*$"
_PATTERN_KEYS = ("subject", "body", "subject_or_body", "body_absent")
_MATCHER_KEYS = (*_PATTERN_KEYS, "max_body_chars", "min_recipients", "undisclosed_recipients",
                 "attachment_types", "requires")


# The rules that ship with intake; `[intake] quality_rules` points at a file of one's own instead.
SHIPPED_RULES = Path(__file__).parent / "rules" / "low-quality.toml"


class RulesError(Exception):
    """The rules file cannot be used; the message names the file, the rule and the problem."""


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


# -- the rules compiled -----------------------------------------------------------------------


def _compile_one(pattern: str) -> Regex:
    return compile_pattern(pattern, ignorecase=True, multiline=True)


def _compile(patterns: list[str] | None) -> tuple[Regex, ...] | None:
    return None if patterns is None else tuple(_compile_one(p) for p in patterns)


def _rule(spec: _RuleSpec) -> Rule:
    return Rule(
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
    rules = tuple(_rule(rule) for rule in spec.rule)
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
