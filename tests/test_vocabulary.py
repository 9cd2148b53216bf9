"""intake's words are spelled in intake.vocabulary only: a scan of every module's string constants.

A literal "state-changed" or "X-Intake-Ticket" in another module is a second definition that can
drift from the first (a ticket closed as invalid once counted as breached because "finished" was
spelled twice); this test fails on the first such literal, naming the name to import instead.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from intake import vocabulary
from intake.vocabulary import (
    FINISHED_STATES, MILESTONES, MILESTONE_SPECS, QUEUED_EVENT, RECEIVED_EVENT, EventKind, MailKind,
)

SOURCE = Path(vocabulary.__file__).parent
# Words of the vocabulary that are also ordinary English (or other fields' values: a dict key
# "milestone", the "#note" command, the "digest" command, "fixed" in an OSV draft) and so occur
# as text elsewhere; hyphenated words, milestones and header names are never in this list.
PLAIN = {
    "new", "waiting", "pending", "processed", "ignored", "failed", "sent", "dead", "critical", "high", "medium",
    "low", "none", "in", "out", "internal", "fixed", "invalid", "note", "report", "digest", "milestone",
    "reopened", "acknowledgement", "empty",
    # stage states that are also JSON field names ("breached": true, "met": ...) or a check's "ok"
    "ok", "met", "breached",
    # the system actor is intake's own name: the package, a config section, the SMTP ident
    "intake",
    # audiences (`intake reminders`) that are also a ticket column and a config section
    "reporter", "maintainers",
}
# Pieces of f-strings that build a word instead of looking it up (f"{kind}-queued").
BUILT_SUFFIXES = ("-queued", "-received")


def _words() -> dict[str, str]:
    """Every string value vocabulary defines -> the name to import for it."""
    found: dict[str, str] = {}

    def collect(value: object, name: str) -> None:
        if isinstance(value, str):
            found.setdefault(value, name)
        elif isinstance(value, (tuple, list, set, frozenset)):
            for item in value:
                collect(item, name)
        elif isinstance(value, dict):
            for key, item in value.items():
                collect(key, name)
                collect(item, name)
        elif isinstance(value, vocabulary.MilestoneSpec):
            collect(value.name, name)
        elif isinstance(value, type) and value.__module__ == vocabulary.__name__:
            for attribute, item in vars(value).items():
                if attribute.isupper():
                    collect(item, f"{value.__name__}.{attribute}")

    for name, value in vars(vocabulary).items():
        if not name.startswith("_") and name != "annotations":
            collect(value, name)
    return found


WORDS = {word: name for word, name in _words().items() if word not in PLAIN}
HEADERS = {word.lower(): name for word, name in WORDS.items() if word.lower().startswith("x-intake-")}


def _docstrings(tree: ast.AST) -> set[int]:
    return {id(node.body[0].value) for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}


def _literal_types(tree: ast.AST) -> set[int]:
    """Constants inside ``Literal[...]``: a type spells its values (pydantic checks config by them)."""
    return {id(constant) for node in ast.walk(tree)
            if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) and node.value.id == "Literal"
            for constant in ast.walk(node.slice)}


def offences(source: str) -> list[str]:
    """Where *source* spells a word of the vocabulary, as "line: 'word' (use NAME)"."""
    tree = ast.parse(source)
    skipped = _docstrings(tree) | _literal_types(tree)
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Constant) or not isinstance(node.value, str) or id(node) in skipped:
            continue
        text = node.value
        if text in WORDS:
            found.append(f"{node.lineno}: {text!r} (use {WORDS[text]})")
        elif header := next((h for h in HEADERS if h in text.lower()), None):
            found.append(f"{node.lineno}: {text!r} (use {HEADERS[header]})")
        elif text in BUILT_SUFFIXES:
            found.append(f"{node.lineno}: {text!r} built into a word (use QUEUED_EVENT or RECEIVED_EVENT)")
    return found


def test_no_module_but_vocabulary_spells_a_word():
    modules = sorted(path for path in SOURCE.rglob("*.py") if path.name != "vocabulary.py")
    assert len(modules) > 40  # the scan sees the whole package
    found = {str(path.relative_to(SOURCE)): hits for path in modules
             if (hits := offences(path.read_text(encoding="utf-8")))}
    assert found == {}


@pytest.mark.parametrize(("line", "expected"), [
    ('add_event(session, ticket.id, "state-changed", now)', "EventKind.STATE_CHANGED"),
    ('headers.append(("X-Intake-Ticket", reference))', "TICKET_HEADER"),
    ('marker = _header(incoming, "x-intake-loop")', "LOOP_HEADER"),
    ('labels = ["low-quality"]', "LOW_QUALITY_LABEL"),
    ('if decision == "third-party-reply": pass', "THIRD_PARTY_REPLY"),
    ('milestones.record(session, settings, ticket, "released", at=now)', "Milestone.RELEASED"),
    ('add_event(session, ticket_id, f"{kind}-queued", now)', "QUEUED_EVENT"),
    ('AUTOMATIC = ("acknowledgement-queued",)', "QUEUED_EVENT"),
    ('kind = "catch-up"', "MailKind.CATCH_UP"),
])
def test_a_literal_word_is_caught(line, expected):
    [found] = offences(f'"""A docstring may say "state-changed" and X-Intake-Loop."""\n{line}\n')
    assert found.startswith("2: ") and expected in found


def test_plain_text_docstrings_and_literal_types_pass():
    assert offences('"""Sets "state-changed" events."""\n'
                    'def f(x: Literal["acknowledge", "out-of-scope"]) -> str:\n'
                    '    """Returns "low-quality"."""\n'
                    '    return f"{x} is new, pending and high"\n') == []


def test_the_words_are_distinct_and_derived_once():
    kinds = [value for name, value in vars(EventKind).items() if name.isupper()]
    assert len(kinds) == len(set(kinds))
    assert not set(kinds) & set(QUEUED_EVENT.values()) and not set(kinds) & set(RECEIVED_EVENT.values())
    assert set(QUEUED_EVENT) <= {value for name, value in vars(MailKind).items() if name.isupper()}
    assert MILESTONES == tuple(spec.name for spec in MILESTONE_SPECS)
    assert len({spec.stage for spec in MILESTONE_SPECS}) == len(MILESTONE_SPECS)
    assert all(follows in MILESTONES for spec in MILESTONE_SPECS for follows in spec.follows)
    assert set(FINISHED_STATES) & set(MILESTONES) == {"resolved"}


def test_every_word_fits_the_column_it_is_stored_in():
    from intake.store.models import Event, Notification, Outbox, ThreadEntry, Ticket
    from intake.vocabulary import CLOSE_REASONS, DECISIONS, Direction, EntryKind, NotificationKind, TicketState

    def values(namespace: type) -> list[str]:
        return [value for name, value in vars(namespace).items() if name.isupper()]

    stored = {
        Event.__table__.c.kind: [*values(EventKind), *QUEUED_EVENT.values(), *RECEIVED_EVENT.values()],
        ThreadEntry.__table__.c.kind: [*values(EntryKind), *DECISIONS, *values(MailKind)],
        ThreadEntry.__table__.c.direction: values(Direction),
        Outbox.__table__.c.kind: values(MailKind),
        Notification.__table__.c.kind: values(NotificationKind),
        Ticket.__table__.c.state: [*values(TicketState), *MILESTONES],
        Ticket.__table__.c.close_reason: list(CLOSE_REASONS),
    }
    too_long = {f"{column.table.name}.{column.name}": word for column, words in stored.items() for word in words
                if len(word) > column.type.length}
    assert too_long == {}
