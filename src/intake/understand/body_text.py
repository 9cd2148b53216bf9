"""The body text of a message: its plain text, else its HTML converted to text within limits.

HTML-only mail becomes text through html2text, within limits of its own (its output grows with
the square of list nesting).
"""

from __future__ import annotations

import html
from typing import Any

import html2text

from intake import patterns
from intake.understand.content import Content
from intake.understand.header_text import warn

MAX_BODY_TEXT = 1024 * 1024  # characters of body_text kept
MAX_HTML_INPUT = 1024 * 1024  # characters of HTML converted to text (html2text reads 0.5-2 MB/s)
# Lists and block quotes nested deeper are flattened before conversion: html2text indents each
# level, so its output (and time) grows with the square of the depth (200 KB of nested <ul><li>
# took 4 minutes and 500 MB).
MAX_HTML_NESTING = 16
# Tags and character references ('<' and '&') of HTML converted: html2text's cost is per such
# event (~8 us each here: a megabyte of lone '<' took 9 s), so HTML past the 100,000th is cut.
MAX_HTML_EVENTS = 100_000

_NESTING_TAG = patterns.compile(r"<(/?)(?:ul|ol|dl|menu|blockquote)\b[^>]*>", ignorecase=True)
# Script and style content, to the closing tag or the end (RE2 has no backreference to say "the same tag").
_CODE = patterns.compile(r"<script\b.*?(?:</script\s*>|\z)|<style\b.*?(?:</style\s*>|\z)", ignorecase=True, dotall=True)
_TAG = patterns.compile(r"<[^>]*>")


def body_text(content: Content, ciphertexts: list[str], warnings: list[str]) -> str:
    """Plain text if there is any, else the HTML as text; PGP/MIME ciphertext after it."""
    if any(text.strip() for text in content.plain):
        body = "\n".join(content.plain)
    elif any(text.strip() for text in content.html):
        body = _html_to_text("\n".join(content.html), warnings)
    else:
        body = ""
    body = "\n".join(filter(None, [body, *ciphertexts]))
    if len(body) > MAX_BODY_TEXT:
        warn(warnings, f"limit MAX_BODY_TEXT ({MAX_BODY_TEXT}): body text was cut")
        body = body[:MAX_BODY_TEXT]
    return _clean_body(body)


def _html_to_text(markup: str, warnings: list[str]) -> str:
    """Readable text (links kept as text); script and style content dropped, never active HTML."""
    if len(markup) > MAX_HTML_INPUT:
        warn(warnings, f"limit MAX_HTML_INPUT ({MAX_HTML_INPUT}): only the start of the HTML was converted")
        markup = markup[:MAX_HTML_INPUT]
    if (end := _nth_event(markup, MAX_HTML_EVENTS)) is not None:
        warn(warnings, f"limit MAX_HTML_EVENTS ({MAX_HTML_EVENTS}): only the start of the HTML was converted")
        markup = markup[:end]
    markup = _flatten_deep_nesting(markup, warnings)
    converter = html2text.HTML2Text()
    converter.ignore_images = True
    converter.body_width = 0
    try:
        return converter.handle(markup)
    except Exception as exc:  # noqa: BLE001 - an HTML parser failure must not lose the message
        warn(warnings, f"HTML could not be converted ({type(exc).__name__}); tags were stripped instead")
        return html.unescape(_TAG.sub(" ", _CODE.sub(" ", markup)))


def _nth_event(markup: str, most: int) -> int | None:
    """Where the *most*-th '<' or '&' of *markup* is, or None if it has no more than that: each
    character's positions found with str.find, at most *most* of each, so linear in *markup*."""
    if markup.count("<") + markup.count("&") <= most:
        return None

    def positions(char: str) -> list[int]:
        found: list[int] = []
        at = markup.find(char)
        while at >= 0 and len(found) < most:
            found.append(at)
            at = markup.find(char, at + 1)
        return found

    return sorted(positions("<") + positions("&"))[most - 1]


def _flatten_deep_nesting(markup: str, warnings: list[str]) -> str:
    """Drop list and block-quote tags nested deeper than MAX_HTML_NESTING (their text stays).
    A tag-level pass is enough: a mismatch only costs indentation, never text."""
    depth = 0

    def keep(tag: Any) -> str:
        nonlocal depth
        if tag.group(1):  # a closing tag: kept if its opening tag was
            kept = depth <= MAX_HTML_NESTING
            depth = max(depth - 1, 0)
        else:
            depth += 1
            kept = depth <= MAX_HTML_NESTING
        if not kept:
            warn(warnings, f"limit MAX_HTML_NESTING ({MAX_HTML_NESTING}): deeper lists and quotes were flattened")
        return tag.group() if kept else ""

    return _NESTING_TAG.sub(keep, markup)


def _clean_body(text: str) -> str:
    text = text.encode("utf-8", "replace").decode("utf-8").replace("\x00", "")
    return text.replace("\r\n", "\n")
