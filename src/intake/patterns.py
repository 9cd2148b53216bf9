"""Regular expressions for untrusted text, compiled on RE2: time linear in the text, whatever the pattern.

Python's ``re`` backtracks: ``^\\s*(?:On\\b.*\\bwrote:|…)`` with MULTILINE took 39 s on a reply of
60,000 blank lines. Every pattern that meets sender-controlled text (bodies, subjects,
header values, addresses, operator-written low-quality rules applied to them) is compiled here,
on google-re2, which runs in time linear in the input for any pattern. RE2 has no backreferences
and no look-around: :func:`compile` refuses them with :class:`UnsupportedPattern` (at load time, so
a rules file or a config pattern re2 cannot run fails ``check-config``), and the callers that
used them do the same work with a linear rewrite.

Differences from ``re`` to keep in mind when writing a pattern: ``\\d``, ``\\s``, ``\\w`` and
``\\b`` are ASCII-only (write ``\\pL``, ``\\pN`` or ``\\p{Z}`` for Unicode letters, digits or
spaces); ``\\Z`` is ``\\z``; flags are given inline (``(?i)``, ``(?m)``, ``(?s)``).

Patterns that only ever see our own or the operator's text (config values, CLI arguments, log
templates) stay on ``re``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import lru_cache
from typing import Any

import re2

_OPTIONS = re2.Options()
_OPTIONS.log_errors = False  # a refused pattern raises UnsupportedPattern; nothing on stderr


class UnsupportedPattern(ValueError):
    """A pattern RE2 cannot compile (a backreference, a look-around, ``\\Z``, a syntax error)."""

    def __init__(self, pattern: str, why: str) -> None:
        super().__init__(f"{pattern!r} cannot run on the linear-time engine (RE2): {why}")
        self.pattern = pattern
        self.why = why


class Pattern:
    """A compiled RE2 pattern with the ``re.Pattern`` methods intake uses. Equal (and pickled)
    by its text, so rules loaded twice compare equal and travel to the parse helper."""

    __slots__ = ("pattern", "_compiled")

    def __init__(self, pattern: str) -> None:
        self.pattern = pattern
        try:
            self._compiled = re2.compile(pattern, _OPTIONS)
        except re2.error as exc:
            why = exc.args[0].decode(errors="replace") if exc.args and isinstance(exc.args[0], bytes) else str(exc)
            raise UnsupportedPattern(pattern, why) from None

    def search(self, text: str) -> Any:
        return self._compiled.search(text)

    def match(self, text: str) -> Any:
        return self._compiled.match(text)

    def fullmatch(self, text: str) -> Any:
        return self._compiled.fullmatch(text)

    def finditer(self, text: str) -> Iterator[Any]:
        return self._compiled.finditer(text)

    def findall(self, text: str) -> list[Any]:
        return self._compiled.findall(text)

    def split(self, text: str, maxsplit: int = 0) -> list[str]:
        return self._compiled.split(text, maxsplit)

    def sub(self, repl: str | Callable[[Any], str], text: str, count: int = 0) -> str:
        return self._compiled.sub(repl, text, count)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Pattern) and other.pattern == self.pattern

    def __hash__(self) -> int:
        return hash(self.pattern)

    def __reduce__(self) -> tuple[type[Pattern], tuple[str]]:
        return Pattern, (self.pattern,)

    def __repr__(self) -> str:
        return f"patterns.compile({self.pattern!r})"


@lru_cache(maxsize=512)  # as re.compile's cache: patterns built per use (routing's) compile once
def compile(pattern: str, *, ignorecase: bool = False, multiline: bool = False,  # noqa: A001 - as re.compile
            dotall: bool = False) -> Pattern:
    """*pattern* on RE2, with the flags given; raises :class:`UnsupportedPattern` if RE2 cannot run it."""
    flags = "i" * ignorecase + "m" * multiline + "s" * dotall
    try:
        return Pattern(f"(?{flags}){pattern}" if flags else pattern)
    except UnsupportedPattern as exc:
        raise UnsupportedPattern(pattern, exc.why) from None


def escape(text: str) -> str:
    """*text* as a literal in an RE2 pattern."""
    return re2.escape(text)
