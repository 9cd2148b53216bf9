"""Bytes -> :class:`ParsedMail`. Pure (no database, no clock) and it never raises.

Two stages. The MIME structure is read first, by the stdlib feed parser with the lenient
``compat32`` policy (it parses no structured header, so none of the header parser's quadratic or
recursive paths run), with the limits below applied *while* it reads: a hostile message still
parses into a ParsedMail holding what could be read, plus a warning naming the limit it hit.
mail-parser cannot do this part: it reads whatever it is given, unbounded.

mail-parser (:class:`mailparser.MailParser`) then extracts the content of that tree: the text of
the body parts (charset decoding), the attachments (which parts, their names, their decoded bytes)
and the MIME defects. What it does not do stays here: the limits, parts recovered after a premature
closing boundary, embedded messages (an inline forward is read as part of the message, an attached
one stays one attachment of its exact bytes), encryption, delivery reports, the loop headers, the
subject (decoded exactly as the stdlib's modern policy does), and the addresses, split by a small
linear parser of our own (the stdlib's recurses per group member and per nested comment, and
misattributes crafted addresses, CVE-2023-27043). HTML-only mail becomes text through html2text,
within limits of its own (its output grows with the square of list nesting). If anything
unexpected still fails, the result is built from a cheap scan of the header block and the raw
bytes stay stored.

Every string that leaves this module is *display-safe*: no CR, LF, NUL or other control
character, nothing ``str.splitlines()`` would split on, no lone surrogates, bounded length. That
is what lets later stages put a researcher's subject into a header of mail we send without
opening a header-injection hole. Header bytes that are not ASCII are read as UTF-8, invalid
sequences becoming U+FFFD, exactly as the stdlib's modern policy does (the subject must match it).

A wall-clock bound is not this module's job: :mod:`intake.understand.parse_guard` runs :func:`parse` in a
helper process it can kill.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import codecs
import dataclasses
import email.policy
import hashlib
import html
import collections
import io
import itertools
import logging
import operator
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email import feedparser
from email.feedparser import BytesFeedParser
from email.header import decode_header, make_header
from email.message import Message
from email.utils import collapse_rfc2231_value
from typing import Any, TypeVar

import html2text
from mailparser import MailParser
from mailparser.utils import decode_base64_payload, decode_header_part

from intake import patterns
from intake.vocabulary import LOOP_HEADER, TICKET_HEADER

T = TypeVar("T")

# mail-parser logs what it makes of each part, quoting raw header text (line breaks included) at
# ERROR: a sender could forge lines in our log. What matters reaches ParsedMail.warnings instead.
logging.getLogger("mailparser").setLevel(logging.CRITICAL)

# -- limits ------------------------------------------------------------------------------------
# Each is far above what legitimate mail needs; past one, parsing goes on with what was read and
# records a warning that starts with "limit <NAME>".

MAX_MIME_DEPTH = 20  # multipart containers nested deeper are kept as one opaque part
MAX_MIME_PARTS = 500  # MIME entities read; parsing stops at the next one (the rest stays in the raw bytes)
MAX_HEADER_FIELDS = 1000  # header fields read per entity; later ones are ignored
MAX_HEADER_LENGTH = 64 * 1024  # characters of one header field (folded lines included); the rest is cut
# ';'-separated parameters of Content-Type and Content-Disposition (the stdlib parses them in quadratic time)
MAX_MIME_PARAMETERS = 64
MAX_BODY_TEXT = 1024 * 1024  # characters of body_text kept
MAX_HTML_INPUT = 1024 * 1024  # characters of HTML converted to text (html2text reads 0.5-2 MB/s)
# Lists and block quotes nested deeper are flattened before conversion: html2text indents each
# level, so its output (and time) grows with the square of the depth (200 KB of nested <ul><li>
# took 4 minutes and 500 MB).
MAX_HTML_NESTING = 16
# Tags and character references ('<' and '&') of HTML converted: html2text's cost is per such
# event (~8 us each here: a megabyte of lone '<' took 9 s), so HTML past the 100,000th is cut.
MAX_HTML_EVENTS = 100_000
# Characters of a header value decoded for display (names, file names, loop headers; the subject
# is decoded whole, as the stdlib does). The stdlib decodes encoded words in quadratic time.
MAX_DECODED_HEADER = 4 * 1024

MAX_HEADER_TEXT = 998  # RFC 5322 line limit; longer display values are cut
MAX_FILENAME = 120
MAX_LISTED_ADDRESSES = 100  # addresses kept in ParsedMail.to / .cc (recipient_count counts them all)
MAX_SCANNED_HEADER_BYTES = 256 * 1024  # of a header block read by the cheap scan

# Loop- and automation-relevant headers the router reads (RFC 3834 and common practice).
LOOP_HEADERS = (
    "auto-submitted", "precedence", "list-id", "list-unsubscribe", "list-post", "x-auto-response-suppress",
    "x-autoreply", "x-autorespond", "x-autoresponder", "x-auto-reply", LOOP_HEADER.lower(), TICKET_HEADER.lower(),
    "x-mailer", "return-path", "x-spam-flag", "x-failed-recipients", "feedback-id", "content-type",
)

# Every pattern here reads sender-controlled text: RE2 (intake.patterns), linear in it. RE2's \s
# is ASCII; _SPACE is what str.isspace() knows.
_SPACE = r"[\t-\r\x1c-\x20\x85\p{Z}]"
# C0 and C1 controls, TAB kept: deleted by str.translate, which costs no match object per character.
_CONTROLS = dict.fromkeys([*range(0x00, 0x09), 0x0B, 0x0C, *range(0x0E, 0x20), *range(0x7F, 0xA0)])
# Every line boundary str.splitlines() knows: the email package splits header values with it.
_NEWLINES = patterns.compile(rf"{_SPACE}*[\r\n\x0b\x0c\x1c-\x1e\x85\x{{2028}}\x{{2029}}]+{_SPACE}*")
_MESSAGE_ID = patterns.compile(r"<[^<>\t-\r\x1c-\x20\x85\p{Z}]+>")
_LINE_BREAKS = dict.fromkeys(map(ord, "\r\n"))


@dataclass(frozen=True)
class Attachment:
    index: int
    filename: str  # safe to use as a file name
    original_filename: str  # for display only
    content_type: str
    size: int
    sha256: str

    def as_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class DeliveryReport:
    """What a bounce says about the mail it returns (RFC 3464 DSN, or a recognisable non-standard bounce)."""

    original_message_id: str | None  # from the returned message or headers, else our own In-Reply-To/References
    original_ticket: str | None  # X-Intake-Ticket of the returned headers
    recipient: str | None  # Final-Recipient / Original-Recipient address, without the 'rfc822;' type
    action: str | None  # failed | delayed | delivered | relayed | expanded
    status: str | None  # e.g. "5.1.1"
    diagnostic: str | None  # e.g. "smtp; 550 5.1.1 user unknown" (display-safe, bounded)


@dataclass(frozen=True)
class ParsedMail:
    message_id: str | None
    subject: str
    from_address: str
    from_name: str
    to: list[str]
    in_reply_to: str | None
    references: list[str]
    auto_submitted: str | None
    precedence: str | None
    content_type: str
    body_text: str
    attachments: list[Attachment] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    headers: dict[str, str] = field(default_factory=dict)  # LOOP_HEADERS present: lowercased name -> first value
    cc: list[str] = field(default_factory=list)
    recipient_count: int = 0  # distinct addresses in To + Cc
    undisclosed_recipients: bool = False  # To/Cc is an empty group ("undisclosed-recipients:;") or both are absent
    encrypted: str | None = None  # "pgp-mime" | "inline-pgp" | "smime"
    delivery_report: DeliveryReport | None = None  # DSNs and classic bounces; None for MDNs, feedback reports
    is_report: str | None = None  # report-type of a top-level multipart/report
    part_count: int = 0  # MIME entities read, those of inline embedded messages included
    header_count: int = 0  # header fields of the top-level header block, including any past the limit


# -- display-safe text -------------------------------------------------------------------------


def clean_text(value: object, limit: int = MAX_HEADER_TEXT) -> str:
    """A single display-safe line: folded whitespace, no control characters, bounded."""
    text = value if isinstance(value, str) else ("" if value is None else str(value))
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


def _clean_body(text: str) -> str:
    text = text.encode("utf-8", "replace").decode("utf-8").replace("\x00", "")
    return text.replace("\r\n", "\n")


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


def _decode_8bit(value: str) -> str:
    """Raw header bytes (surrogate-escaped by the parser) read as UTF-8, invalid ones as U+FFFD."""
    return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _decode_words(value: str) -> str:
    """Unstructured header text as the stdlib's modern policy reads it (the subject must match it):
    RFC 2047 encoded words decoded, unknown charsets and raw 8-bit bytes as UTF-8 with U+FFFD."""
    try:
        return str(email.policy.default.header_factory("unstructured", value.translate(_LINE_BREAKS)))
    except Exception:  # noqa: BLE001 - the modern header parser has raised on hostile input before
        try:
            return str(make_header(decode_header(_decode_8bit(value))))
        except (LookupError, UnicodeError, ValueError, TypeError, AssertionError):
            return _decode_8bit(value)


def _display(value: str, limit: int = MAX_HEADER_TEXT) -> str:
    """A header value decoded for display: its start only, which is all a display line shows."""
    return clean_text(_decode_words(value[:MAX_DECODED_HEADER]), limit)


def _message_ids(value: str | None) -> list[str]:
    return _MESSAGE_ID.findall(value or "")


def _first_message_id(value: str | None) -> str | None:
    ids = _message_ids(value)
    if ids:
        return clean_text(ids[0], 500)
    text = clean_text(value or "", 500)
    return f"<{text.strip('<>')}>" if text and " " not in text else None


def _guarded(read: Callable[[], T], default: T, what: str, warnings: list[str]) -> T:
    """Read one value the stdlib derives from hostile text; a failure costs that value, not the parse."""
    try:
        return read()
    except Exception as exc:  # noqa: BLE001 - compat32 parameter parsing has raised many kinds of error
        _warn(warnings, f"{what} could not be read ({type(exc).__name__})")
        return default


def _header_values(part: Message) -> dict[str, list[str]]:
    """Every header value exactly as received, by lowercased name (compat32's get() would wrap
    8-bit values in Header objects)."""
    headers: dict[str, list[str]] = {}
    for name, value in part.raw_items():
        headers.setdefault(name.lower(), []).append(value)
    return headers


def _warn(warnings: list[str], message: str) -> None:
    if message not in warnings:
        warnings.append(message)


# -- reading the MIME structure within the limits ----------------------------------------------


class _Part(Message):
    """A MIME entity. While ``opaque`` is set it reports application/octet-stream, so the feed
    parser reads its body as one leaf (its exact bytes) rather than parsing it; :func:`_read_mime`
    clears it once the structure is read, and the entity reports its declared type again."""

    opaque = False

    def get_content_type(self) -> str:
        return "application/octet-stream" if self.opaque else super().get_content_type()


class _PartLimitReached(Exception):
    pass


_PART_LIMIT_WARNING = (f"limit MAX_MIME_PARTS ({MAX_MIME_PARTS}): parsing stopped there; "
                       "later parts are only in the stored raw message")
_DEPTH_LIMIT_WARNING = (f"limit MAX_MIME_DEPTH ({MAX_MIME_DEPTH}): parts nested deeper were kept unparsed, "
                        "as one attachment")
_INLINE_MESSAGE_TYPES = ("message/rfc822", "message/global")


@dataclass
class _Reading:
    """What reading the MIME structure found, and the limits it hit (shared by every parser run
    over one message, so recovered parts count against the same limits)."""

    root: _Part = field(default_factory=_Part)
    warnings: list[str] = field(default_factory=list)
    part_count: int = 0
    header_count: int = 0  # of the top-level header block, including fields past the limit


class _BoundedFeedParser(BytesFeedParser):
    """The stdlib feed parser (compat32) with the limits applied as it reads.

    It overrides two hooks of ``email.feedparser.FeedParser``, unchanged since Python 3.3:
    ``_new_message`` (once per MIME entity) and ``_parse_headers`` (an entity's header lines,
    before its body is read; the parser picks how to read the body from the entity's content
    type right after). Embedded messages (message/*) are read as one opaque part, their exact
    bytes; :func:`_read_mime` parses those shown inline afterwards, within the same limits.
    :meth:`parse` also hands the header lines to its input (``BufferedSubFile.pushlines``) and
    runs it (``_call_parse``) itself, and :meth:`_join_leaf_body` joins lines in the input's
    ``_lines`` up to the first one its ``_eofstack`` ends a part at; tests check that every
    message reads as ``feed`` reads it.
    """

    def __init__(self, reading: _Reading, depth: int) -> None:
        super().__init__(_factory=_Part, policy=email.policy.compat32)
        self._reading = reading
        self._depth = depth  # of the entity this run's top entity is nested in (0: none)
        self._top_field_count: int | None = None  # the top entity's header fields, counted before any were cut
        self._top_headers_read = False
        self._field_count: int | None = None  # the next nested part's header fields, counted before any were cut

    def parse(self, data: bytes) -> _Part:
        """The entity in *data*; after the part limit, what was read of it.

        The same Message as feeding *data* whole, read faster (issue 12): the top entity's header
        block is handed over without the fields :meth:`_parse_headers` would ignore, and the body
        of a top entity the feed parser reads as one leaf (not multipart, not message/*) is not
        pushed through it line by line: its text is the lines the parser read plus the rest."""
        try:
            head, count, rest = _split_header_block(data)
            self._top_field_count = count
            self._input.pushlines(head)
            self._call_parse()
            top = self._msgstack[0] if self._msgstack else None
            if top is None or not self._top_headers_read or self._cur is not top \
                    or top.get_content_maintype() in ("multipart", "message"):
                self.feed(rest)
                return self.close()
            top = self.close()  # the body lines read so far become its payload
            # (its raw text: get_payload would decode the 8-bit bytes in it)
            top.set_payload(top._payload + rest.decode("ascii", "surrogateescape"))
            return top
        except _PartLimitReached:
            return self._msgstack[0]

    def _new_message(self) -> None:
        if self._reading.part_count >= MAX_MIME_PARTS:
            _warn(self._reading.warnings, _PART_LIMIT_WARNING)
            raise _PartLimitReached
        self._reading.part_count += 1
        nested = bool(self._msgstack)
        super()._new_message()
        if nested:
            self._cut_header_block()

    def _cut_header_block(self) -> None:
        """Before the parser reads the header block of a part inside a multipart: the lines of
        the fields past MAX_HEADER_FIELDS, and those of a field past its first MAX_HEADER_LENGTH
        characters and one line, leave the input (:meth:`_parse_headers` would ignore them);
        the fields are counted first, for the warning."""
        lines, ends = self._input._lines, self._input._eofstack
        header_line = feedparser.headerRE.match
        size = next(itertools.compress(itertools.count(), map(operator.not_, map(header_line, lines))), len(lines))
        for ends_here in reversed(ends):  # a boundary line ends the block too
            size = next(itertools.compress(itertools.count(), map(ends_here, itertools.islice(lines, size))), size)
        if size >= len(lines) or size <= MAX_HEADER_FIELDS:  # it may go on in data not pushed yet, or is small
            return
        folds = (" ", "\t")
        starts = [0, *itertools.islice(itertools.compress(itertools.count(1), map(
            operator.not_, map(str.startswith, itertools.islice(lines, 1, size), itertools.repeat(folds)))),
            MAX_HEADER_FIELDS)]
        fields = len(starts) if len(starts) <= MAX_HEADER_FIELDS else 1 + operator.countOf(
            map(str.startswith, itertools.islice(lines, 1, size), itertools.repeat(folds)), False)
        kept: list[str] = []
        for start, end in zip(starts[:MAX_HEADER_FIELDS], [*starts[1:MAX_HEADER_FIELDS + 1], size]):
            field_lines = list(itertools.starmap(lines.popleft, itertools.repeat((), end - start)))
            lengths = list(itertools.accumulate(map(len, field_lines[:MAX_HEADER_LENGTH + 1])))
            kept += field_lines[:bisect.bisect_right(lengths, MAX_HEADER_LENGTH) + 1]
        popped = min(len(starts), MAX_HEADER_FIELDS + 1)
        dropped = size - (starts[popped - 1] if popped > MAX_HEADER_FIELDS else size)
        collections.deque(itertools.starmap(lines.popleft, itertools.repeat((), dropped)), maxlen=0)
        lines.extendleft(reversed(kept))
        self._field_count = fields if fields > MAX_HEADER_FIELDS else None

    def _parse_headers(self, lines: list[str]) -> None:
        warnings = self._reading.warnings
        fields = _group_fields(lines)
        depth = self._depth + len(self._msgstack)
        count = len(fields)
        if not self._top_headers_read:  # the top entity's block, perhaps cut by _split_header_block
            self._top_headers_read = True
            count = self._top_field_count if self._top_field_count is not None else count
        elif self._field_count is not None:  # a nested part's, cut by _cut_header_block
            count, self._field_count = self._field_count, None
        if depth == 1:
            self._reading.header_count = count
        if count > MAX_HEADER_FIELDS:
            _warn(warnings, f"limit MAX_HEADER_FIELDS ({MAX_HEADER_FIELDS}): {count} header fields "
                            "in one part; the rest were ignored")
            fields = fields[:MAX_HEADER_FIELDS]
        super()._parse_headers([line for field_lines in fields for line in self._bounded(field_lines)])
        part = self._cur
        if part.get_content_maintype() == "message":
            part.opaque = True
        elif part.get_content_maintype() == "multipart" and depth > MAX_MIME_DEPTH:
            _warn(warnings, _DEPTH_LIMIT_WARNING)
            part.opaque = True
        if part.get_content_maintype() not in ("multipart", "message") and self._input._eofstack:
            self._join_leaf_body()

    def _join_leaf_body(self) -> None:
        """Before the parser reads a leaf part inside a multipart: its body lines, up to the first
        line that ends it (a boundary of an enclosing multipart), become one line in the input.
        The parser joins them all the same, and reads them in one step rather than one by one."""
        lines, ends = self._input._lines, self._input._eofstack
        count = len(lines)
        for ends_here in reversed(ends):  # the innermost first: the others are only looked for before it
            count = next(itertools.compress(itertools.count(), map(ends_here, itertools.islice(lines, count))),
                         count)
        if count < 2:
            return
        body = "".join(itertools.starmap(lines.popleft, itertools.repeat((), count)))
        lines.appendleft(body)
        if any(ends_here(body) for ends_here in ends):  # cannot be (each line was not): undo, to be safe
            lines.popleft()
            lines.extendleft(reversed(io.StringIO(body, newline="").readlines()))

    def _bounded(self, lines: list[str]) -> list[str]:
        """One header field's lines, cut to the length and parameter limits."""
        name = lines[0].split(":", 1)[0].strip()
        if sum(map(len, lines)) > MAX_HEADER_LENGTH:
            _warn(self._reading.warnings, f"limit MAX_HEADER_LENGTH ({MAX_HEADER_LENGTH}): a "
                                          f"{clean_text(name, 60)} header was cut")
            lines = ["".join(lines)[:MAX_HEADER_LENGTH]]
        if name.lower() in ("content-type", "content-disposition"):
            text = "".join(lines)
            cut = _nth_index(text, ";", MAX_MIME_PARAMETERS + 1)
            if cut >= 0:
                _warn(self._reading.warnings, f"limit MAX_MIME_PARAMETERS ({MAX_MIME_PARAMETERS}): "
                                              f"{clean_text(name, 60)} parameters past the limit were ignored")
                lines = [text[:cut]]
        return lines


# The feed parser's header lines (``email.feedparser.headerRE``: a field name and colon, a
# continuation, or "From "), each with its line break (a line is cut at CRLF, CR or LF), the last
# line of the data without one.
_HEADER_BLOCK = patterns.compile(r"(?:(?:From |[\x21-\x39\x3b-\x7e]*:|[\t ])[^\r\n]*(?:\r\n|\r|\n|$))*")
# One header field of a header block: its first line and its continuation lines.
_HEADER_FIELD = patterns.compile(r"(?:[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+$)(?:[\t ][^\r\n]*(?:\r\n|\r|\n|$))*")
# For the scans above: bytes 0x80-0xff as DEL, which no header line pattern takes either, so
# the text is ASCII (RE2 cannot take the lone surrogates 8-bit bytes decode to) and indexes as *data*.
_ASCII_VIEW = bytes(range(128)) + b"\x7f" * 128


def _line_end(data: bytes, start: int) -> int:
    """The end of the line at *start* (after its CRLF, CR or LF; the end of *data* if none)."""
    ends = [i for i in (data.find(b"\r", start), data.find(b"\n", start)) if i >= 0]
    if not ends:
        return len(data)
    end = min(ends)
    return end + 2 if data[end:end + 2] == b"\r\n" else end + 1


def _split_header_block(data: bytes) -> tuple[list[str], int | None, bytes]:
    """*data* as the feed parser would read its header block: the lines of the header block
    (without the fields past MAX_HEADER_FIELDS, and without the lines of a field past the ones
    that make it longer than MAX_HEADER_LENGTH: both ignored by _parse_headers), then the line
    that ends the block (a blank line, or the body's first line); the number of header fields
    in the block (None: all of them are in the lines); the bytes after that line.

    Every line ends at a break the parser finds in the whole (a CR is never parted from its LF),
    so the lines and the bytes after them read as the whole does."""
    view = data.translate(_ASCII_VIEW).decode("ascii")
    block_end = _HEADER_BLOCK.match(view).end()
    body_start = _line_end(data, block_end)
    kept: list[bytes] = []
    count: int | None = None
    fields = _HEADER_FIELD.finditer(view[:block_end]) if block_end else iter(())
    for number, found in enumerate(fields, 1):
        if number > MAX_HEADER_FIELDS:
            block = data[:block_end].replace(b"\r\n", b"\n").replace(b"\r", b"\n")
            count = block.count(b"\n") + (not block.endswith(b"\n")) - block.count(b"\n ") - block.count(b"\n\t")
            break
        start, end = found.span()
        if end - start > MAX_HEADER_LENGTH:
            end = _line_end(data, start + MAX_HEADER_LENGTH)
        kept.append(data[start:end])
    kept.append(data[block_end:body_start])
    # Each piece split apart: joined, a piece's last CR and the next one's LF would be one break.
    lines = [line for piece in kept for line in io.StringIO(piece.decode("ascii", "surrogateescape"),
                                                            newline="").readlines()]
    return lines, count, data[body_start:]


def _group_fields(lines: list[str]) -> list[list[str]]:
    """Header lines grouped per field (a field's first line and its folded continuation lines)."""
    fields: list[list[str]] = []
    for line in lines:
        if line[:1] in (" ", "\t") and fields:
            fields[-1].append(line)
        else:
            fields.append([line])
    return fields


def _nth_index(text: str, sub: str, n: int) -> int:
    position = -1
    for _ in range(n):
        position = text.find(sub, position + 1)
        if position < 0:
            return -1
    return position


def _read_mime(raw: bytes) -> _Reading:
    """The MIME tree of *raw* within the limits: embedded messages shown inline are parsed in
    place, parts that follow a premature closing delimiter are recovered."""
    reading = _Reading()
    # A leading UTF-8 byte-order mark (seen in the wild) would make the first header a body line.
    reading.root = _BoundedFeedParser(reading, depth=0).parse(raw.removeprefix(codecs.BOM_UTF8))
    for part, parent, depth in _walk(reading.root):
        part.opaque = False  # read: from here on every entity reports the type it declared
        if part.is_multipart():
            _recover_parts_after_close(part, depth, reading)
        elif part.get_content_type() in _INLINE_MESSAGE_TYPES and _shown_inline(part, bool(part.get_filename())) \
                and (parent is None or parent.get_content_type() != "multipart/report"):
            _parse_embedded_message(part, depth, reading)
    return reading


def _shown_inline(part: Message, named: bool) -> bool:
    """Displayed as part of the message by mail clients, rather than offered as a file (RFC 2183:
    an explicit disposition decides; without one, a part with a file name is a file)."""
    disposition = part.get_content_disposition()
    return disposition != "attachment" and (disposition == "inline" or not named)


def _parse_embedded_message(part: Message, depth: int, reading: _Reading) -> None:
    """Parse an inline embedded message (a forward, a digest entry) in place, so its text and
    attachments count as the message's own; a report's returned message stays one attachment."""
    if depth >= MAX_MIME_DEPTH:
        _warn(reading.warnings, _DEPTH_LIMIT_WARNING)
        return
    if reading.part_count >= MAX_MIME_PARTS:
        _warn(reading.warnings, _PART_LIMIT_WARNING)
        return
    data = part.get_payload(decode=True) or b""
    part.set_payload([_BoundedFeedParser(reading, depth).parse(data)])


def _recover_parts_after_close(multipart: Message, depth: int, reading: _Reading) -> None:
    """A nested multipart that reuses its parent's boundary closes the parent early (the stdlib
    reads the rest as epilogue), which would hide the parts after it: read each delimited chunk
    of the epilogue as one more part, as mail clients show them."""
    boundary = multipart.get_boundary()
    if not boundary or not multipart.epilogue:
        return
    delimiter = patterns.compile(rf"^--{patterns.escape(boundary)}(?:--)?[ \t]*\r?$", multiline=True)
    chunks = delimiter.split(multipart.epilogue)
    if len(chunks) < 2:
        return
    multipart.epilogue = chunks[0]
    for chunk in chunks[1:]:
        chunk = chunk[2:] if chunk.startswith("\r\n") else chunk.removeprefix("\n")  # the delimiter line's break
        if not chunk.strip():
            continue
        if reading.part_count >= MAX_MIME_PARTS:
            _warn(reading.warnings, _PART_LIMIT_WARNING)
            return
        multipart.attach(_BoundedFeedParser(reading, depth).parse(chunk.encode("ascii", "surrogateescape")))
        _warn(reading.warnings, "parts after a premature closing MIME boundary were recovered")


def _walk(root: _Part) -> Iterator[tuple[_Part, _Part | None, int]]:
    """Every entity with its parent and depth (root: 1), in document order, without recursion.
    Children are read when their parent has been yielded, so parts attached then are walked too."""
    stack: list[tuple[_Part, _Part | None, int]] = [(root, None, 1)]
    while stack:
        part, parent, depth = stack.pop()
        yield part, parent, depth
        if part.is_multipart():
            stack.extend((child, part, depth + 1) for child in reversed(part.get_payload()))


# -- addresses ---------------------------------------------------------------------------------

_ADDRESS_TOKEN = patterns.compile(r'"(?:[^"\\]|\\.)*"|\\.|[()<>,:;"]|[^"()<>,:;\\]+', dotall=True)


@dataclass
class _AddressList:
    mailboxes: list[tuple[str, str]] = field(default_factory=list)  # (display name as written, address)
    empty_group: bool = False  # e.g. "undisclosed-recipients:;"
    malformed: str | None = None  # why the header could not be read


class _AddressListReader:
    """Splits an RFC 5322 address list in one linear pass: quoted strings, nested comments (dropped;
    a comment stands in for a missing display name, as in 'bob@example.org (Bob)'), angle
    addresses (source routes dropped) and groups. Unbalanced quotes, comments or angle brackets
    make the whole header malformed rather than guessed at: guessing is how CVE-2023-27043
    attributes a crafted address to the wrong mailbox. ';' outside a group separates like ','."""

    def __init__(self) -> None:
        self.result = _AddressList()
        self._phrase: list[str] = []
        self._angle: list[str] = []
        self._comment: list[str] = []
        self._has_angle = False
        self._in_angle = False
        self._comment_depth = 0
        self._group_members: int | None = None  # None outside a group

    def read(self, value: str) -> _AddressList:
        for match in _ADDRESS_TOKEN.finditer(value):
            if not self._take(match.group()):
                return self.result
        if self._comment_depth or self._in_angle:
            self._fail("a comment or angle address is not closed")
            return self.result
        self._end_mailbox()
        self._end_group()  # a missing ';' after a group is common and harmless
        return self.result

    def _take(self, token: str) -> bool:
        if self._comment_depth:
            if token == "(":
                self._comment_depth += 1
            elif token == ")":
                self._comment_depth -= 1
            else:
                self._comment.append(token)
            return True
        if token == "(":
            self._comment_depth = 1
        elif token in (')', '"'):
            return self._fail(f"unbalanced {token!r}")
        elif self._in_angle:
            if token == "<":
                return self._fail("'<' inside an angle address")
            if token == ">":
                self._in_angle = False
            else:
                self._angle.append(token)
        elif token == "<":
            if self._has_angle:
                return self._fail("two angle addresses in one mailbox")
            self._in_angle = self._has_angle = True
        elif token == ">":
            return self._fail("unbalanced '>'")
        elif token == ",":
            self._end_mailbox()
        elif token == ":" and self._group_members is None:
            self._group_members = 0
            self._phrase, self._comment = [], []  # the group's name is not an address
        elif token == ";":
            self._end_mailbox()
            self._end_group()
        else:
            self._phrase.append(token)
        return True

    def _end_mailbox(self) -> None:
        if self._has_angle:
            address = "".join(self._angle).strip().rsplit(":", 1)[-1].strip()  # drop a source route
            name = _unquote("".join(self._phrase))
        else:
            address = "".join(self._phrase).strip()
            name = ""
        name = name or _unquote("".join(self._comment))
        if address or (self._has_angle and name):  # 'MAILER DAEMON <>' still names its sender
            self.result.mailboxes.append((name, address))
        if address and self._group_members is not None:
            self._group_members += 1
        self._phrase, self._angle, self._comment, self._has_angle = [], [], [], False

    def _end_group(self) -> None:
        if self._group_members == 0:
            self.result.empty_group = True
        self._group_members = None

    def _fail(self, reason: str) -> bool:
        self.result = _AddressList(malformed=reason)
        return False


_QUOTED_STRING = patterns.compile(r'"((?:[^"\\]|\\.)*)"', dotall=True)
_QUOTED_PAIR = patterns.compile(r"\\(.)", dotall=True)


def _unquote(text: str) -> str:
    """A display name without its quotes and backslash escapes, whitespace collapsed."""
    words = _QUOTED_STRING.sub(lambda m: _QUOTED_PAIR.sub(r"\1", m.group(1)), text)
    return " ".join(words.split())


def _read_addresses(values: list[str], name: str, warnings: list[str]) -> _AddressList:
    """The mailboxes of every *name* header (one *values* entry each); malformed ones are skipped."""
    combined = _AddressList()
    for value in values:
        addresses = _AddressListReader().read(_decode_8bit(value))
        if addresses.malformed:
            _warn(warnings, f"{name} header is malformed ({addresses.malformed}); its addresses were ignored")
        combined.mailboxes += addresses.mailboxes
        combined.empty_group |= addresses.empty_group
    return combined


def _sender(values: list[str], warnings: list[str]) -> tuple[str, str]:
    """(display name, address) of the first From mailbox, display-safe."""
    mailboxes = _read_addresses(values, "From", warnings).mailboxes
    name, address = mailboxes[0] if mailboxes else ("", "")
    return _display(name, 200), clean_text(address, 320)


@dataclass(frozen=True)
class _Recipients:
    to: list[str]
    cc: list[str]
    count: int  # distinct addresses in To and Cc
    undisclosed: bool


def _recipients(to_values: list[str], cc_values: list[str], warnings: list[str]) -> _Recipients:
    to = _read_addresses(to_values, "To", warnings)
    cc = _read_addresses(cc_values, "Cc", warnings)
    addresses = [address for _, address in to.mailboxes + cc.mailboxes if address]
    return _Recipients(
        to=[clean_text(a, 320) for _, a in to.mailboxes if a][:MAX_LISTED_ADDRESSES],
        cc=[clean_text(a, 320) for _, a in cc.mailboxes if a][:MAX_LISTED_ADDRESSES],
        count=len({address.casefold() for address in addresses}),
        # An empty group ("undisclosed-recipients:;"), or no To/Cc content at all: Bcc-style delivery.
        undisclosed=to.empty_group or cc.empty_group or not any(v.strip() for v in to_values + cc_values),
    )


# -- content: mail-parser's extraction ----------------------------------------------------------

_BODY_TEXT_TYPES = ("text/plain", "text/html")
# mail-parser lists a leaf as an attachment when it has a file name. A nameless one it names at
# random or after its Content-ID, or, lacking both, decodes as text it then sets aside: a PoC
# binary sent without a name would drop out of the list. So every leaf that is not body text and
# has no name is given this one first; an attachment listed under it had no name of its own (a
# sender who uses it as a real name only loses it for display).
_UNNAMED = "intake-unnamed-part"
# What mail software means by a label, as browsers read it (WHATWG Encoding): the superset.
# mail-parser decodes by the label as written, so text using a superset's extra characters
# (Outlook's curly quotes in "iso-8859-1", GBK in "gb2312") would come out as control characters
# or U+FFFD, and Python has no codec at all for "iso-8859-8-i".
_CHARSET_SUPERSETS = {
    "iso-8859-1": "cp1252", "latin1": "cp1252", "gb2312": "gb18030", "gbk": "gb18030", "shift_jis": "cp932",
    "euc-kr": "cp949", "ks_c_5601-1987": "cp949", "iso-8859-8-i": "iso-8859-8", "tis-620": "cp874",
}


@dataclass
class _Content:
    """What mail-parser extracted: the text of the body parts, and the attachments with their
    decoded bytes."""

    plain: list[str] = field(default_factory=list)
    html: list[str] = field(default_factory=list)
    attachments: list[tuple[Attachment, bytes]] = field(default_factory=list)


def _extract_content(root: _Part, warnings: list[str]) -> _Content:
    """The content of the tree as mail-parser extracts it, and its MIME defects as a warning. If
    mail-parser fails, the content is left out with a warning: everything else is still read.
    It writes into the tree (see _prepare_for_mail_parser): read what else you need first."""
    _prepare_for_mail_parser(root, warnings)
    try:
        extracted = MailParser(_as_only_part(root))
    except Exception as exc:  # noqa: BLE001 - mail-parser raises outside its own hierarchy (AttributeError, TypeError)
        _warn(warnings, f"content extraction failed ({type(exc).__name__} in mail-parser); "
                        "body text and attachments are only in the stored raw message")
        return _Content()
    if extracted.defects_categories:
        _warn(warnings, "MIME defects: " + ", ".join(sorted(extracted.defects_categories)))
    return _Content(plain=extracted.text_plain, html=extracted.text_html,
                    attachments=_attachments(extracted.attachments))


def _prepare_for_mail_parser(root: _Part, warnings: list[str]) -> None:
    """State in the tree what mail-parser would otherwise get wrong, or take too long over: a
    name for each nameless attachment, names cut to their start, and how each body text part is
    encoded."""
    for number, (part, _, _) in enumerate(_walk(root), start=1):
        if part.is_multipart():
            continue
        name = _guarded(lambda: _bounded_file_name(part), "", f"part {number} file name", warnings)
        if part.get_content_type() in _BODY_TEXT_TYPES and _shown_inline(part, bool(name)):
            _guarded(lambda: _declare_text_encoding(part), None, f"part {number} charset", warnings)
        elif not name:
            _set_file_name(part, _UNNAMED)


def _bounded_file_name(part: Message) -> str:
    """The part's file name as mail-parser decodes it, from its first MAX_DECODED_HEADER
    characters only, which become the name it is given: it decodes a name whole, and encoded
    words decode in quadratic time (a 64 KB name took 70 ms)."""
    name = part.get_filename() or ""
    if len(name) > MAX_DECODED_HEADER:
        name = name[:MAX_DECODED_HEADER]
        _set_file_name(part, name)
    return decode_header_part(name)


def _set_file_name(part: Message, name: str) -> None:
    """Give *part* this file name (it takes precedence over a Content-Type name), keeping its
    disposition; a part with a name and no disposition is offered as a file anyway."""
    _replace_header(part, "Content-Disposition", part.get_content_disposition() or "attachment")
    part.set_param("filename", name, header="Content-Disposition")


def _declare_text_encoding(part: Message) -> None:
    """Label a body text part so that mail-parser decodes it as mail software does: in the
    superset of its charset, and always through that charset. (Text sent without a transfer
    encoding it returns as it stands whenever that is valid UTF-8: ISO-2022-JP, the usual charset
    of Japanese mail, would stay escape sequences. "binary" is the same identity encoding, and
    makes it decode.)"""
    declared = part.get_content_charset()
    superset = _CHARSET_SUPERSETS.get(declared or "")
    if superset:
        part.set_param("charset", superset)
    if str(part.get("Content-Transfer-Encoding", "")).strip().lower() in ("", "7bit", "8bit"):
        _replace_header(part, "Content-Transfer-Encoding", "binary")


def _replace_header(part: Message, name: str, value: str) -> None:
    del part[name]
    part[name] = value


def _as_only_part(root: _Part) -> Message:
    """*root* as the only part of a bare multipart: what mail-parser is given.

    Of the message it is given, mail-parser reads the whole header block: it parses the addresses
    (with the stdlib's parser, which recurses per nested comment), dates and Received chains, and
    decodes every header twice, most of its time on a 4 KB mail, for values read here already. Of
    a part it reads only the MIME fields, and it extracts the same content. The empty epilogue
    keeps its epilogue recovery idle: that re-parses the epilogue unbounded (the reader recovers
    those parts itself, within the limits), and in mail-parser 4.8 it raises when a nested part
    misses its start boundary and the top-level multipart has no epilogue."""
    wrapper = Message()
    wrapper["Content-Type"] = 'multipart/mixed; boundary="intake-only-part"'
    wrapper.attach(root)
    wrapper.epilogue = ""
    return wrapper


def _attachments(listed: list[dict[str, Any]]) -> list[tuple[Attachment, bytes]]:
    """mail-parser's attachments with their decoded bytes, numbered from 1 in document order.

    Left out: the flattened copy it lists of a multipart marked as an attachment (not the bytes
    that were sent; the parts are listed themselves) and nameless parts with nothing in them."""
    attachments: list[tuple[Attachment, bytes]] = []
    for item in listed:
        if not item["binary"]:  # only that flattened copy is not handed over base64-encoded
            continue
        data = decode_base64_payload(item["payload"])  # how mail-parser itself writes attachments out
        name = "" if item["filename"] == _UNNAMED else item["filename"]
        if name or data.strip():
            index = len(attachments) + 1
            attachments.append((_attachment(index, name, item["mail_content_type"], data), data))
    return attachments


def _attachment(index: int, filename: str, content_type: str, data: bytes) -> Attachment:
    return Attachment(
        index=index,
        filename=safe_filename(filename, index),
        original_filename=clean_text(filename, 255),
        content_type=clean_text(content_type, 255),
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
    )


# -- body text -----------------------------------------------------------------------------------

_NESTING_TAG = patterns.compile(r"<(/?)(?:ul|ol|dl|menu|blockquote)\b[^>]*>", ignorecase=True)
# Script and style content, to the closing tag or the end (RE2 has no backreference to say "the same tag").
_CODE = patterns.compile(r"<script\b.*?(?:</script\s*>|\z)|<style\b.*?(?:</style\s*>|\z)", ignorecase=True, dotall=True)
_TAG = patterns.compile(r"<[^>]*>")


def _body_text(content: _Content, ciphertexts: list[str], warnings: list[str]) -> str:
    """Plain text if there is any, else the HTML as text; PGP/MIME ciphertext after it."""
    if any(text.strip() for text in content.plain):
        body = "\n".join(content.plain)
    elif any(text.strip() for text in content.html):
        body = _html_to_text("\n".join(content.html), warnings)
    else:
        body = ""
    body = "\n".join(filter(None, [body, *ciphertexts]))
    if len(body) > MAX_BODY_TEXT:
        _warn(warnings, f"limit MAX_BODY_TEXT ({MAX_BODY_TEXT}): body text was cut")
        body = body[:MAX_BODY_TEXT]
    return _clean_body(body)


def _html_to_text(markup: str, warnings: list[str]) -> str:
    """Readable text (links kept as text); script and style content dropped, never active HTML."""
    if len(markup) > MAX_HTML_INPUT:
        _warn(warnings, f"limit MAX_HTML_INPUT ({MAX_HTML_INPUT}): only the start of the HTML was converted")
        markup = markup[:MAX_HTML_INPUT]
    if (end := _nth_event(markup, MAX_HTML_EVENTS)) is not None:
        _warn(warnings, f"limit MAX_HTML_EVENTS ({MAX_HTML_EVENTS}): only the start of the HTML was converted")
        markup = markup[:end]
    markup = _flatten_deep_nesting(markup, warnings)
    converter = html2text.HTML2Text()
    converter.ignore_images = True
    converter.body_width = 0
    try:
        return converter.handle(markup)
    except Exception as exc:  # noqa: BLE001 - an HTML parser failure must not lose the message
        _warn(warnings, f"HTML could not be converted ({type(exc).__name__}); tags were stripped instead")
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
            _warn(warnings, f"limit MAX_HTML_NESTING ({MAX_HTML_NESTING}): deeper lists and quotes were flattened")
        return tag.group() if kept else ""

    return _NESTING_TAG.sub(keep, markup)


# -- encryption ----------------------------------------------------------------------------------

_SMIME_NOT_ENCRYPTED = {"signed-data", "certs-only", "compressed-data"}
_PGP_ARMOR = "-----BEGIN PGP MESSAGE-----"


def _param(part: Message, name: str) -> str:
    value = part.get_param(name)
    text = collapse_rfc2231_value(value) if isinstance(value, tuple) else (value or "")
    return clean_text(text, 255).lower()


def _is_pgp_mime(part: Message) -> bool:
    """RFC 3156: multipart/encrypted; protocol="application/pgp-encrypted"."""
    return part.get_content_type() == "multipart/encrypted" and _param(part, "protocol") == "application/pgp-encrypted"


def _is_smime_encrypted(part: Message) -> bool:
    """RFC 8551 enveloped (or authenticated-enveloped) data; signed-only data is not encrypted."""
    return part.get_content_type() in ("application/pkcs7-mime", "application/x-pkcs7-mime") and \
        _param(part, "smime-type") not in _SMIME_NOT_ENCRYPTED


def _encrypted_parts(root: _Part) -> str | None:
    """The kind of the first encrypted entity, "pgp-mime" or "smime", if any. (The third kind, an
    armored PGP block in the text, "inline-pgp", is found in the body text.)"""
    for part, _, _ in _walk(root):
        if _is_pgp_mime(part):
            return "pgp-mime"
        if not part.is_multipart() and _is_smime_encrypted(part):
            return "smime"
    return None


def _pgp_ciphertexts(root: _Part) -> list[str]:
    """The encrypted parts of PGP/MIME entities as text, unchanged: the body shows them, so the
    armored block can be decrypted from the ticket without fetching the attachment."""
    return [(part.get_payload(decode=True) or b"").decode("utf-8", "replace") for part, parent, _ in _walk(root)
            if parent is not None and _is_pgp_mime(parent) and part.get_content_type() == "application/octet-stream"]


# -- the cheap header scan ---------------------------------------------------------------------


def _scan_header_block(data: bytes) -> dict[str, list[str]]:
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


def _first_values(fields: dict[str, list[str]]) -> dict[str, str]:
    return {name: values[0] for name, values in fields.items()}


def parse_headers_only(raw: bytes, warning: str) -> ParsedMail:
    """A minimal ParsedMail from a cheap scan of the header block, for when parsing failed or
    took too long; *warning* says which. The raw bytes stay stored for a later reprocess."""
    scanned = _scan_header_block(raw.removeprefix(codecs.BOM_UTF8))
    # Bounded before any decoding: this path must stay cheap whatever the headers hold.
    values = {name: [clean_text(value) for value in found] for name, found in scanned.items()}
    content_type = clean_text(values.get("content-type", [""])[0].split(";")[0], 255).lower()
    return _mail_from(values, [warning], content_type=content_type or "text/plain", body_text="",
                      header_count=sum(map(len, values.values())))


# -- delivery reports --------------------------------------------------------------------------

_DELIVERY_STATUS_TYPES = ("message/delivery-status", "message/global-delivery-status")
# text/rfc822-headers is the standard; message/rfc822-headers is seen in the wild (MailSite).
_RETURNED_TYPES = ("message/rfc822", "message/global", "text/rfc822-headers", "message/rfc822-headers",
                   "message/global-headers")
_ACTIONS = {"failed", "delayed", "delivered", "relayed", "expanded"}
# An enhanced status code (group 1) not inside a longer number: RE2 has no look-around, so the
# character before is matched (or the start) and one after that would extend it is caught in
# group 2, which rules the match out (see _status_code).
_STATUS_CODE = patterns.compile(r"(?:^|[^\d.])([245]\.\d{1,3}\.\d{1,3})(\.?\d)?")
_SMTP_REPLY_LINE = patterns.compile(r"^(?:.*[^\d])?[45]\d\d(?:[ -].*)?$", multiline=True)
_BOUNCED_RECIPIENT = patterns.compile(r"^<([^<>\s@]+@[^<>\s]+)>:|^[ \t]{2,}([^<>\s@]+@[^<>\s]+)[ \t]*$",
                                      multiline=True)
_DAEMON_LOCAL_PARTS = {"mailer-daemon", "mailerdaemon", "mail-daemon", "postmaster"}
_BOUNCE_TEXT = patterns.compile(r"Hi\. This is the qmail-send program|"
                                r"This message was created automatically by mail delivery software", ignorecase=True)
_BOUNCE_SUBJECT = patterns.compile(
    r"^\s*(?:undeliver|delivery (?:status notification|failure|failed|has failed|problem)|"
    r"returned mail|mail delivery failed|failure notice|non-?delivery|warning: message .* delayed)", ignorecase=True)
_DAEMON_NAME = patterns.compile(r"mail delivery (?:system|subsystem)", ignorecase=True)
_DELAY_WORDS = patterns.compile(r"\bdelay|will (?:retry|keep trying)|still (?:trying|being retried)", ignorecase=True)
_QUOTED_FIELD = patterns.compile(rf"^[ \t>]*(message-id|{TICKET_HEADER.lower()})[ \t]*:[ \t]*(?:\n[ \t]+)?(\S[^\n]*)",
                                 ignorecase=True, multiline=True)
_BLANK_LINE = patterns.compile(r"\n[ \t>]*\n")
_BLANK_LINES = patterns.compile(r"\r?\n(?:[ \t]*\r?\n)+")
# Characters of a bounce's text and of its delivery-status part searched for returned headers and
# fields: they come first, and a flood of blank lines after them costs nothing.
_BOUNCE_SCAN = 64 * 1024


@dataclass
class _Returned:
    """Headers of the mail that bounced, and where the bounce's own explanation ends."""

    message_id: str | None
    ticket: str | None
    explanation_end: int | None = None  # offset in the body text; None: the explanation is all of it


def _field_blocks(text: str) -> list[dict[str, str]]:
    """The header-like blocks of a delivery-status body. A block that is only base64 is decoded
    first: some gateways (Proofpoint) re-encode the per-recipient fields that way."""
    blocks = []
    for block in _BLANK_LINES.split(text.strip()):
        fields = _first_values(_scan_header_block(block.encode("utf-8")))
        if fields:
            blocks.append(fields)
        elif block.strip():
            try:
                decoded = base64.b64decode("".join(block.split()), validate=True)
            except (binascii.Error, ValueError):
                continue
            blocks += _field_blocks(decoded.decode("utf-8", "replace"))
    return blocks


def _recipient_fields(status_text: str) -> dict[str, str]:
    """The per-recipient fields of a DSN: the first recipient that failed, else the first one."""
    recipients = [b for b in _field_blocks(status_text)
                  if {"final-recipient", "original-recipient", "action", "status"} & b.keys()]
    failed = [b for b in recipients if clean_text(b.get("action", ""), 40).lower().startswith("failed")]
    return (failed or recipients or [{}])[0]


def _returned_headers(content: _Content, body: str) -> _Returned | None:
    """The returned message's Message-ID and X-Intake-Ticket, from a returned message or headers
    part, else from a header block quoted in the body text."""
    for attachment, data in content.attachments:
        if attachment.content_type in _RETURNED_TYPES:
            fields = _first_values(_scan_header_block(data))
            return _Returned(_first_message_id(fields.get("message-id")), _ticket(fields.get(TICKET_HEADER.lower())))
    return _quoted_returned_headers(body[:_BOUNCE_SCAN])


def _quoted_returned_headers(body: str) -> _Returned | None:
    """A returned header block quoted in the text (qmail, Exim): the block carrying X-Intake-Ticket,
    else the first one with a Message-ID. Blocks are separated by blank lines."""
    breaks = [m.end() for m in _BLANK_LINE.finditer(body)]
    blocks: dict[int, dict[str, str]] = {}
    for match in _QUOTED_FIELD.finditer(body):
        fields = blocks.setdefault(bisect.bisect_right(breaks, match.start()), {})
        fields.setdefault(match.group(1).lower(), match.group(2))
    with_ticket = [b for b in sorted(blocks) if TICKET_HEADER.lower() in blocks[b]]
    with_id = [b for b in sorted(blocks) if "message-id" in blocks[b]]
    chosen = (with_ticket or with_id or [None])[0]
    if chosen is None:
        return None
    fields = blocks[chosen]
    return _Returned(_first_message_id(fields.get("message-id")), _ticket(fields.get(TICKET_HEADER.lower())),
                     breaks[chosen - 1] if chosen else 0)


def _ticket(value: str | None) -> str | None:
    words = clean_text(value or "", 100).split()
    return words[0] if words else None


def _is_classic_bounce(mail: ParsedMail) -> bool:
    """A non-DSN bounce: sent by a mailer daemon, and saying so in its subject or opening text."""
    from_daemon = mail.from_address.rpartition("@")[0].lower() in _DAEMON_LOCAL_PARTS or \
        _DAEMON_NAME.match(mail.from_name) is not None
    return from_daemon and (_BOUNCE_SUBJECT.match(mail.subject) is not None
                            or _BOUNCE_TEXT.search(mail.body_text) is not None)


def _delivery_report(mail: ParsedMail, content: _Content) -> DeliveryReport | None:
    """What a DSN (multipart/report; report-type=delivery-status) says, or a classic bounce whose
    returned headers can be found. MDNs and feedback reports get none: they are not bounces."""
    is_dsn = mail.is_report == "delivery-status"
    if not is_dsn and not _is_classic_bounce(mail):
        return None
    returned = _returned_headers(content, mail.body_text)
    if not is_dsn and returned is None:
        return None
    status_part = next((data for attachment, data in content.attachments
                        if attachment.content_type in _DELIVERY_STATUS_TYPES), b"")
    fields = _recipient_fields(status_part[:_BOUNCE_SCAN].decode("utf-8", "replace"))
    explanation = mail.body_text[:_BOUNCE_SCAN][: returned.explanation_end if returned else None]
    if is_dsn:
        action = clean_text(fields.get("action", ""), 40).lower().split(" ")[0]
    else:
        action = "delayed" if _DELAY_WORDS.search(mail.subject + "\n" + explanation[:2000]) else "failed"
    status = _status_code(fields.get("status", "")) or _status_code(explanation)
    reply_line = _SMTP_REPLY_LINE.search(explanation)
    diagnostic = fields.get("diagnostic-code") or (reply_line.group() if reply_line else "")
    original_id = (returned.message_id if returned else None) or mail.in_reply_to or \
        (mail.references[-1] if mail.references else None)
    return DeliveryReport(
        original_message_id=original_id,
        original_ticket=returned.ticket if returned else None,
        recipient=_bounced_recipient(fields, mail, explanation),
        action=action if action in _ACTIONS else None,
        status=status,
        diagnostic=" ".join(clean_text(diagnostic, 500).split()) or None,
    )


def _status_code(text: str) -> str | None:
    """The first enhanced status code ("5.1.1") in *text* that is not part of a longer number."""
    return next((found.group(1) for found in _STATUS_CODE.finditer(text) if found.group(2) is None), None)


def _bounced_recipient(fields: dict[str, str], mail: ParsedMail, explanation: str) -> str | None:
    """Final-/Original-Recipient without its address type, else X-Failed-Recipients (Exim), else
    the address a qmail, Postfix or Exim explanation names."""
    candidates = [(fields.get("final-recipient") or fields.get("original-recipient") or "").rpartition(";")[2],
                  mail.headers.get("x-failed-recipients", "").split(",")[0]]
    found = _BOUNCED_RECIPIENT.search(explanation)
    if found:
        candidates.append(found.group(1) or found.group(2))
    return next((clean_text(c, 320).strip("<>") for c in candidates if c.strip()), None)


# -- parse -------------------------------------------------------------------------------------


def parse(raw: bytes) -> ParsedMail:
    """Parse *raw*; whatever happens, return a ParsedMail (warnings say what went wrong)."""
    try:
        return _parse(raw)
    except Exception as exc:  # noqa: BLE001 - the promise is "never raises"; the raw bytes stay stored
        return parse_headers_only(raw, f"parse failed ({type(exc).__name__}); only the header block was read")


def _parse(raw: bytes) -> ParsedMail:
    reading = _read_mime(raw)
    root, warnings = reading.root, list(reading.warnings)
    # What we read of the tree ourselves is read first: the extraction writes into it.
    values = _header_values(root)
    content_type = clean_text(root.get_content_type(), 255)
    is_report = (_param(root, "report-type") or None) if content_type == "multipart/report" else None
    encrypted_parts, ciphertexts = _encrypted_parts(root), _pgp_ciphertexts(root)
    content = _extract_content(root, warnings)
    body = _body_text(content, ciphertexts, warnings)
    encrypted = encrypted_parts or ("inline-pgp" if _PGP_ARMOR in body else None)
    if encrypted:
        _warn(warnings, f"encrypted: {encrypted}")
    mail = _mail_from(
        values, warnings,
        content_type=content_type,
        body_text=body,
        attachments=[attachment for attachment, _ in content.attachments],
        encrypted=encrypted,
        is_report=is_report,
        part_count=reading.part_count,
        header_count=reading.header_count,
    )
    return _with_delivery_report(mail, content)


def _mail_from(values: dict[str, list[str]], warnings: list[str], **content: Any) -> ParsedMail:
    """A ParsedMail: the fields read from the top-level header *values* (raw, by lowercased name),
    plus the *content* fields."""

    def first(name: str) -> str:
        return values[name][0] if name in values else ""

    from_name, from_address = _sender(values.get("from", []), warnings)
    recipients = _recipients(values.get("to", []), values.get("cc", []), warnings)
    return ParsedMail(
        message_id=_first_message_id(first("message-id")),
        subject=clean_text(_decode_words(first("subject"))),  # whole: it must read as the stdlib reads it
        from_address=from_address,
        from_name=from_name,
        to=recipients.to,
        in_reply_to=_first_message_id(first("in-reply-to")),
        references=[clean_text(r, 500) for r in _message_ids(first("references"))][:100],
        auto_submitted=clean_text(first("auto-submitted"), 100).lower() or None,
        precedence=clean_text(first("precedence"), 100).lower() or None,
        warnings=warnings,
        headers={name: _display(values[name][0]) for name in LOOP_HEADERS if name in values},
        cc=recipients.cc,
        recipient_count=recipients.count,
        undisclosed_recipients=recipients.undisclosed,
        **content,
    )


def _with_delivery_report(mail: ParsedMail, content: _Content) -> ParsedMail:
    report = _guarded(lambda: _delivery_report(mail, content), None, "delivery report", mail.warnings)
    return mail if report is None else dataclasses.replace(mail, delivery_report=report)


def extract_attachment(raw: bytes, index: int) -> tuple[Attachment, bytes]:
    """The *index*-th attachment (1-based, numbered as in ParsedMail.attachments) and its decoded
    bytes; LookupError if the message has no such attachment."""
    try:
        attachments = _extract_content(_read_mime(raw).root, []).attachments
    except Exception as exc:  # noqa: BLE001 - parse() lists no attachments for a message it cannot read
        raise LookupError(f"the message could not be read ({type(exc).__name__})") from exc
    if not 1 <= index <= len(attachments):
        raise LookupError(f"no attachment {index}: the message has {len(attachments)}")
    return attachments[index - 1]
