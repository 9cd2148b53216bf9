"""Sender-controlled text made safe for a terminal: what every line the CLI prints goes through.

A report's body, subject, names and file names are written by strangers. Printed raw, an ESC or a
C1 control drives the maintainer's terminal (OSC 52 writes the clipboard, ``ESC[1A ESC[2K`` erases
a line and prints a fake one) and bidi overrides reorder what is shown. So the CLI never calls
``click.echo`` itself (a test checks): human output goes through :func:`echo`, which shows each
such character as a visible escape; JSON goes through :func:`echo_json`, which keeps the exact
text, escaped by JSON. Both hold on a terminal and piped alike (a pipe often ends in one).

Notation (human output): ``\\xHH`` for a code point below U+0100, ``\\uHHHH`` above, as in Python
literals. What is escaped: C0 controls except TAB and LF (a lone CR too: it rewinds the line),
DEL, C1 controls, the bidi marks, embeddings, overrides and isolates (U+061C, U+200E, U+200F,
U+202A-U+202E, U+2066-U+2069) and lone surrogates (they cannot be written as UTF-8).
The mapping is reversible: a backslash is doubled when it could be read as the start of an
escape (it comes before ``x``, ``u``, ``U``, another backslash or an escaped character), so a
report that quotes ``\\x1b`` literally shows ``\\\\x1b``; other backslashes (``C:\\Temp``,
``\\n`` in code) are shown as they are.
"""

from __future__ import annotations

import json
import re
import sys
from typing import Any

import click

# What a terminal could act on, or cannot print (see the module docstring).
DANGEROUS_CLASS = r"\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069\ud800-\udfff"
DANGEROUS = re.compile(f"[{DANGEROUS_CLASS}]")
# A dangerous character, or a backslash that would read as the start of an escape (see above).
_ESCAPED = re.compile(rf"[{DANGEROUS_CLASS}]|\\(?=[xuU\\{DANGEROUS_CLASS}])")


class TerminalRefused(Exception):
    """Bytes as received were to be written to a terminal."""


def _visible(match: re.Match[str]) -> str:
    char = match.group()
    if char == "\\":
        return "\\\\"
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def safe(text: str) -> str:
    """*text* with every character that could drive a terminal shown as a visible escape."""
    return _ESCAPED.sub(_visible, text)


def json_safe(text: str) -> str:
    """JSON text with the characters ``json.dumps`` leaves raw (DEL, C1, bidi, lone surrogates) as
    ``\\uHHHH`` escapes: ``json.loads`` gives back exactly the same strings (in JSON text they can
    only be inside one), and a terminal sees no control character, whatever the text."""
    return DANGEROUS.sub(lambda match: f"\\u{ord(match.group()):04x}", text)


def echo(message: str | bytes = "", *, err: bool = False, nl: bool = True) -> None:
    """Print one message of human output, control characters escaped.

    Bytes are written unchanged (an attachment asked for on standard output), never to a
    terminal: :class:`TerminalRefused` then."""
    if isinstance(message, bytes):
        if (sys.stderr if err else sys.stdout).isatty():
            raise TerminalRefused("standard output is a terminal")
        click.echo(message, err=err, nl=nl)
        return
    click.echo(safe(message), err=err, nl=nl)


def echo_json(text: str, *, nl: bool = True) -> None:
    """Print JSON text (e.g. ``json.dumps(..., ensure_ascii=False)``) as :func:`json_safe` makes it."""
    click.echo(json_safe(text), nl=nl)


def dumps(data: Any, **options: Any) -> str:
    """``json.dumps`` keeping non-ASCII text readable, with no raw control or bidi character."""
    return json_safe(json.dumps(data, ensure_ascii=False, **options))
