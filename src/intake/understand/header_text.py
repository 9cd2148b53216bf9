"""Header values as display-safe text: clean_text, safe file names, encoded words, Message-IDs, a cheap header scan.

Every string that leaves the parser is *display-safe*: no CR, LF, NUL or other control
character, nothing ``str.splitlines()`` would split on, no lone surrogates, bounded length. That
is what lets later stages put a researcher's subject into a header of mail we send without
opening a header-injection hole. Header bytes that are not ASCII are read as UTF-8, invalid
sequences becoming U+FFFD, exactly as the stdlib's modern policy does (the subject must match it).
"""

from __future__ import annotations

import email.policy
import unicodedata
from collections.abc import Callable
from email.header import decode_header, make_header
from email.message import Message
from typing import TypeVar

from intake import patterns

T = TypeVar("T")

# Characters of a header value decoded for display (names, file names, loop headers; the subject
# is decoded whole, as the stdlib does). The stdlib decodes encoded words in quadratic time.
MAX_DECODED_HEADER = 4 * 1024

MAX_HEADER_TEXT = 998  # RFC 5322 line limit; longer display values are cut
MAX_FILENAME = 120
MAX_SCANNED_HEADER_BYTES = 256 * 1024  # of a header block read by the cheap scan

# Every pattern here reads sender-controlled text: RE2 (intake.patterns), linear in it. RE2's \s
# is ASCII; _SPACE is what str.isspace() knows.
_SPACE = r"[\t-\r\x1c-\x20\x85\p{Z}]"
# C0 and C1 controls, TAB kept: deleted by str.translate, which costs no match object per character.
_CONTROLS = dict.fromkeys([*range(0x00, 0x09), 0x0B, 0x0C, *range(0x0E, 0x20), *range(0x7F, 0xA0)])
# Every line boundary str.splitlines() knows: the email package splits header values with it.
_NEWLINES = patterns.compile(rf"{_SPACE}*[\r\n\x0b\x0c\x1c-\x1e\x85\x{{2028}}\x{{2029}}]+{_SPACE}*")
_MESSAGE_ID = patterns.compile(r"<[^<>\t-\r\x1c-\x20\x85\p{Z}]+>")
_LINE_BREAKS = dict.fromkeys(map(ord, "\r\n"))
_ASCII_LINE_BREAKS = frozenset("\r\n\x0b\x0c\x1c\x1d\x1e")  # the ASCII ones _NEWLINES knows


# -- display-safe text -------------------------------------------------------------------------


def clean_text(value: object, limit: int = MAX_HEADER_TEXT) -> str:
    """A single display-safe line: folded whitespace, no control characters, bounded."""
    text = value if isinstance(value, str) else ("" if value is None else str(value))
    if text.isascii() and _ASCII_LINE_BREAKS.isdisjoint(text):
        # Nothing to unfold or join (most values): what the general path below gives, without its
        # encoding round trip and its regex.
        return text[:4 * limit + 64].translate(_CONTROLS).strip()[:limit]
    return _one_line(text, limit)


def _one_line(text: str, limit: int) -> str:
    """:func:`clean_text` of any *text*."""
    text = text.encode("utf-8", "replace").decode("utf-8")  # lone surrogates -> '?'
    # Folding only shortens text: past this, only a flood of blank runs could still be shown.
    text = text[:4 * limit + 64]
    text = _NEWLINES.sub(" ", _unfold(text)).translate(_CONTROLS).strip()
    return text[:limit]


def _unfold(text: str) -> str:
    """RFC 5322 unfolding: a line break followed by a space or tab is dropped, the WSP kept."""
    for fold, kept in (("\r\n ", " "), ("\r\n\t", "\t"), ("\n ", " "), ("\n\t", "\t")):
        text = text.replace(fold, kept)
    return text


_UNSAFE_IN_FILENAME = patterns.compile(r"[^\pL\pN_.\- ()+,=@]")
_DOTS = patterns.compile(r"\.{2,}")


def safe_filename(name: str, index: int) -> str:
    """A file name with no path, no '..', no control characters, bounded length."""
    name = unicodedata.normalize("NFC", clean_text(name, len(name)))  # uncut: the extension is at the end
    name = name.replace("\\", "/").rsplit("/", 1)[-1]
    name = _UNSAFE_IN_FILENAME.sub("_", name).strip(" .")
    name = _DOTS.sub(".", name)
    if not name:
        return f"attachment-{index}"
    if len(name) > MAX_FILENAME:
        stem, dot, ext = name.rpartition(".")
        if dot and len(ext) <= 16:
            name = stem[: MAX_FILENAME - len(ext) - 1] + "." + ext
        else:
            name = name[:MAX_FILENAME]
    return name


def decode_8bit(value: str) -> str:
    """Raw header bytes (surrogate-escaped by the parser) read as UTF-8, invalid ones as U+FFFD."""
    return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def decode_words(value: str) -> str:
    """Unstructured header text as the stdlib's modern policy reads it (the subject must match it):
    RFC 2047 encoded words decoded, unknown charsets and raw 8-bit bytes as UTF-8 with U+FFFD."""
    text = value.translate(_LINE_BREAKS)
    if text.isascii() and "=?" not in text:
        # No encoded word and no 8-bit byte: the modern parser gives the text back as it is, at
        # ~50x the cost (most headers of most mail).
        return text
    try:
        return str(email.policy.default.header_factory("unstructured", text))
    except Exception:  # noqa: BLE001 - the modern header parser has raised on hostile input before
        try:
            return str(make_header(decode_header(decode_8bit(value))))
        except (LookupError, UnicodeError, ValueError, TypeError, AssertionError):
            return decode_8bit(value)


def display_value(value: str, limit: int = MAX_HEADER_TEXT) -> str:
    """A header value decoded for display: its start only, which is all a display line shows."""
    return clean_text(decode_words(value[:MAX_DECODED_HEADER]), limit)


def message_ids(value: str | None) -> list[str]:
    return _MESSAGE_ID.findall(value or "")


def first_message_id(value: str | None) -> str | None:
    ids = message_ids(value)
    if ids:
        return clean_text(ids[0], 500)
    text = clean_text(value or "", 500)
    return f"<{text.strip('<>')}>" if text and " " not in text else None


def guarded(read: Callable[[], T], default: T, what: str, warnings: list[str]) -> T:
    """Read one value the stdlib derives from hostile text; a failure costs that value, not the parse."""
    try:
        return read()
    except Exception as exc:  # noqa: BLE001 - compat32 parameter parsing has raised many kinds of error
        warn(warnings, f"{what} could not be read ({type(exc).__name__})")
        return default


def header_values(part: Message) -> dict[str, list[str]]:
    """Every header value exactly as received, by lowercased name (compat32's get() would wrap
    8-bit values in Header objects)."""
    headers: dict[str, list[str]] = {}
    for name, value in part.raw_items():
        headers.setdefault(name.lower(), []).append(value)
    return headers


def warn(warnings: list[str], message: str) -> None:
    if message not in warnings:
        warnings.append(message)


# -- the cheap header scan ---------------------------------------------------------------------


def scan_header_block(data: bytes) -> dict[str, list[str]]:
    """The fields of a header block (up to its first empty line) by lowercased name, folded lines
    joined for clean_text to unfold. A linear pass with no MIME or header parsing: it cannot hang."""
    fields: dict[str, list[str]] = {}
    current: list[bytes] = []
    for line in data[:MAX_SCANNED_HEADER_BYTES].splitlines() + [b""]:
        if line[:1] in (b" ", b"\t"):  # a folded continuation, as the stdlib parser reads it
            if current:
                current.append(line)
            continue
        if current:
            name, _, value = b"\n".join(current).partition(b":")
            fields.setdefault(name.strip().lower().decode("ascii", "replace"), []).append(
                value.decode("utf-8", "replace"))
        if not line.strip():
            break
        current = [line] if b":" in line else []
    return fields


def first_values(fields: dict[str, list[str]]) -> dict[str, str]:
    return {name: values[0] for name, values in fields.items()}
