"""The MIME structure of raw bytes, read by the stdlib feed parser within limits applied as it reads.

The stdlib feed parser reads with the lenient ``compat32`` policy (it parses no structured
header, so none of the header parser's quadratic or recursive paths run). A hostile message still
reads into what could be read, plus a warning naming the limit it hit; header floods are cut
before the parser sees them, and a leaf body is read in one step rather than line by line.

A message's body is fed a step at a time and never split into lines whole: a large base64
attachment stays in the raw bytes, a placeholder in the tree (see :mod:`intake.understand.large_parts`).
"""

from __future__ import annotations

import bisect
import codecs
import collections
import email.policy
import io
import itertools
import operator
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email import feedparser
from email.feedparser import BytesFeedParser, FeedParser
from email.message import Message

from intake import patterns
from intake.understand import large_parts
from intake.understand.header_text import clean_text, warn
from intake.understand.large_parts import LargePart

# Each is far above what legitimate mail needs; past one, reading goes on with what was read and
# records a warning that starts with "limit <NAME>".
MAX_MIME_DEPTH = 20  # multipart containers nested deeper are kept as one opaque part
MAX_MIME_PARTS = 500  # MIME entities read; parsing stops at the next one (the rest stays in the raw bytes)
MAX_HEADER_FIELDS = 1000  # header fields read per entity; later ones are ignored
MAX_HEADER_LENGTH = 64 * 1024  # characters of one header field (folded lines included); the rest is cut
# ';'-separated parameters of Content-Type and Content-Disposition (the stdlib parses them in quadratic time)
MAX_MIME_PARAMETERS = 64


# -- reading the MIME structure within the limits ----------------------------------------------


class MimePart(Message):
    """A MIME entity. While ``opaque`` is set it reports application/octet-stream, so the feed
    parser reads its body as one leaf (its exact bytes) rather than parsing it; :func:`read_mime`
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
# Parts of these are read by what they hold (a ciphertext, a signature, a returned message): never left in the raw bytes.
_READ_BY_CONTENT = ("multipart/encrypted", "multipart/signed", "multipart/report")
_FEED_STEP = 64 * 1024  # bytes of a message's body handed to the feed parser at a time


@dataclass
class _Reading:
    """What reading the MIME structure found, and the limits it hit (shared by every parser run
    over one message, so recovered parts count against the same limits)."""

    root: MimePart = field(default_factory=MimePart)
    warnings: list[str] = field(default_factory=list)
    part_count: int = 0
    header_count: int = 0  # of the top-level header block, including fields past the limit
    # Parts whose body was left in the raw bytes (see :mod:`intake.understand.large_parts`), by
    # the placeholder that is their payload in the tree (unguessable: a sender cannot forge one).
    large_parts: dict[str, LargePart] = field(default_factory=dict)
    placeholder_prefix: str = field(default_factory=lambda: f"intake-large-part-{secrets.token_hex(16)}-")


class _BoundedFeedParser(BytesFeedParser):
    """The stdlib feed parser (compat32) with the limits applied as it reads.

    It overrides two hooks of ``email.feedparser.FeedParser``, unchanged since Python 3.3:
    ``_new_message`` (once per MIME entity) and ``_parse_headers`` (an entity's header lines,
    before its body is read; the parser picks how to read the body from the entity's content
    type right after). Embedded messages (message/*) are read as one opaque part, their exact
    bytes; :func:`read_mime` parses those shown inline afterwards, within the same limits.
    :meth:`parse` also hands the header lines to its input (``BufferedSubFile.pushlines``) and
    runs it (``_call_parse``) itself, and :meth:`_join_leaf_body` joins lines in the input's
    ``_lines`` up to the first one its ``_eofstack`` ends a part at; tests check that every
    message reads as ``feed`` reads it.
    """

    def __init__(self, reading: _Reading, depth: int, stored: bool = False) -> None:
        super().__init__(_factory=MimePart, policy=email.policy.compat32)
        self._reading = reading
        self._depth = depth  # of the entity this run's top entity is nested in (0: none)
        self._stored = stored  # the data parsed is the message as stored: large parts may stay in it
        self._top_field_count: int | None = None  # the top entity's header fields, counted before any were cut
        self._top_headers_read = False
        self._field_count: int | None = None  # the next nested part's header fields, counted before any were cut
        self._data: bytes | None = None  # while the body of the top entity is fed: the bytes read
        self._position = 0  # of the first byte of _data not yet fed

    def parse(self, data: bytes) -> MimePart:
        """The entity in *data*; after the part limit, what was read of it.

        The same Message as feeding *data* whole, read faster: the top entity's header
        block is handed over without the fields :meth:`_parse_headers` would ignore, and the body
        of a top entity the feed parser reads as one leaf (not multipart, not message/*) is not
        pushed through it line by line: its text is the lines the parser read plus the rest."""
        try:
            head, count, body_start = _split_header_block(data)
            self._top_field_count = count
            self._input.pushlines(head)
            self._call_parse()
            top = self._msgstack[0] if self._msgstack else None
            if top is None or not self._top_headers_read or self._cur is not top \
                    or top.get_content_maintype() in ("multipart", "message"):
                self._feed_in_steps(data, body_start)
                return self.close()
            top = self.close()  # the body lines read so far become its payload
            # (its raw text: get_payload would decode the 8-bit bytes in it)
            rest = str(memoryview(data)[body_start:], "ascii", "surrogateescape")
            top.set_payload(top._payload + rest if top._payload else rest)
            return top
        except _PartLimitReached:
            return self._msgstack[0]

    def _feed_in_steps(self, data: bytes, start: int) -> None:
        """Feed ``data[start:]`` a step at a time (never split into lines whole), so that a large
        part's body can be left in *data* when its header block is read (:meth:`_read_as_large`)."""
        self._data, self._position = data, start
        try:
            while self._position < len(data):
                step = memoryview(data)[self._position:self._position + _FEED_STEP]
                self._position += len(step)
                FeedParser.feed(self, str(step, "ascii", "surrogateescape"))
        finally:
            self._data = None

    def _new_message(self) -> None:
        if self._reading.part_count >= MAX_MIME_PARTS:
            warn(self._reading.warnings, _PART_LIMIT_WARNING)
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
            warn(warnings, f"limit MAX_HEADER_FIELDS ({MAX_HEADER_FIELDS}): {count} header fields "
                            "in one part; the rest were ignored")
            fields = fields[:MAX_HEADER_FIELDS]
        super()._parse_headers([line for field_lines in fields for line in self._bounded(field_lines)])
        part = self._cur
        if part.get_content_maintype() == "message":
            part.opaque = True
        elif part.get_content_maintype() == "multipart" and depth > MAX_MIME_DEPTH:
            warn(warnings, _DEPTH_LIMIT_WARNING)
            part.opaque = True
        if part.get_content_maintype() not in ("multipart", "message") and self._input._eofstack:
            if self._data is None or not self._take_leaf_body(part):
                self._join_leaf_body()

    def _take_leaf_body(self, part: MimePart) -> bool:
        """As :meth:`_join_leaf_body`, while the top entity's body is fed in steps: the body of
        *part* (a leaf inside a multipart, its header block just read) becomes one line taken
        from the bytes rather than split into lines; a large base64 attachment's body stays in
        the bytes, and the tree gets a placeholder line for it (the reading, its size and digest).
        The feed parser has read none of the body yet: what it holds is the bytes fed since the
        body began, dropped here; feeding resumes at the line that ends the body. False if no line
        ends it, or the parser holds other lines (one it put back, a header flood's cut): the rest
        is then fed on as it comes."""
        assert self._data is not None
        queued = "".join(self._input._lines) + self._input._partial.getvalue()
        start = self._position - len(queued)  # one character per byte: fed decoded as ASCII with surrogateescape
        if start < 0 or queued.encode("ascii", "surrogateescape") != self._data[start:self._position]:
            return False
        end = self._end_of_body(start)
        if end is None:
            return False
        found = large_parts.digest(self._data, start, end) \
            if self._stored and end - start >= large_parts.LARGE_PART and self._may_stay_in_bytes(part) else None
        self._input._lines.clear()
        self._input._partial.seek(0)
        self._input._partial.truncate()
        self._position = end
        if found is not None:
            placeholder = f"{self._reading.placeholder_prefix}{len(self._reading.large_parts)}"
            self._reading.large_parts[placeholder] = found
            self._input.pushlines([placeholder + "\n"])  # the line break before a boundary is the boundary's
        elif end > start:
            self._input.pushlines(_one_line(str(self._data[start:end], "ascii", "surrogateescape"),
                                            self._input._eofstack))
        return True

    def _may_stay_in_bytes(self, part: MimePart) -> bool:
        """Whether nothing reads *part*'s bytes while parsing: a base64 attachment, not text, not
        an OpenPGP key, not a part of an entity read by what its parts hold."""
        parent = self._msgstack[-2]
        return parent.get_content_type() not in _READ_BY_CONTENT \
            and part.get_content_maintype() not in ("text", "message") \
            and part.get_content_type() != "application/pgp-keys" \
            and str(part.get("Content-Transfer-Encoding", "")).strip().lower() == "base64"

    def _end_of_body(self, start: int) -> int | None:
        """Where the line that ends a body starting at *start* begins: the first line any boundary
        of the enclosing multiparts matches (every matcher on the stack is one: message/* is read
        opaque), as the feed parser looks for it; None if there is none."""
        data, ends = self._data, self._input._eofstack
        assert data is not None
        found = data.find(b"--", start)
        while found >= 0:
            if found == start or data[found - 1] in b"\r\n":
                line = str(data[found:_line_end(data, found)], "ascii", "surrogateescape")
                if any(ends_here(line) for ends_here in ends):
                    return found
            found = data.find(b"--", found + 1)
        return None

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
        lines.extendleft(reversed(_one_line(body, ends)))

    def _bounded(self, lines: list[str]) -> list[str]:
        """One header field's lines, cut to the length and parameter limits."""
        name = lines[0].split(":", 1)[0].strip()
        if sum(map(len, lines)) > MAX_HEADER_LENGTH:
            warn(self._reading.warnings, f"limit MAX_HEADER_LENGTH ({MAX_HEADER_LENGTH}): a "
                                          f"{clean_text(name, 60)} header was cut")
            lines = ["".join(lines)[:MAX_HEADER_LENGTH]]
        if name.lower() in ("content-type", "content-disposition"):
            text = "".join(lines)
            cut = _nth_index(text, ";", MAX_MIME_PARAMETERS + 1)
            if cut >= 0:
                warn(self._reading.warnings, f"limit MAX_MIME_PARAMETERS ({MAX_MIME_PARAMETERS}): "
                                              f"{clean_text(name, 60)} parameters past the limit were ignored")
                lines = [text[:cut]]
        return lines


def _one_line(body: str, ends: list[Callable[[str], object]]) -> list[str]:
    """The lines of a body none of which is a line that ends it, as one line to hand the parser."""
    if any(ends_here(body) for ends_here in ends):  # cannot be (each line was not): split it, to be safe
        return io.StringIO(body, newline="").readlines()
    return [body]


# The feed parser's header lines (``email.feedparser.headerRE``: a field name and colon, a
# continuation, or "From "), each with its line break (a line is cut at CRLF, CR or LF), the last
# line of the data without one.
_HEADER_BLOCK = patterns.compile(r"(?:(?:From |[\x21-\x39\x3b-\x7e]*:|[\t ])[^\r\n]*(?:\r\n|\r|\n|$))*")
# One header field of a header block: its first line and its continuation lines.
_HEADER_FIELD = patterns.compile(r"(?:[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+$)(?:[\t ][^\r\n]*(?:\r\n|\r|\n|$))*")
# For the scans above: bytes 0x80-0xff as DEL, which no header line pattern takes either, so
# the text is ASCII (RE2 cannot take the lone surrogates 8-bit bytes decode to) and indexes as *data*.
_ASCII_VIEW = bytes(range(128)) + b"\x7f" * 128
_HEADER_WINDOW = 64 * 1024  # bytes first viewed for the header block (see _header_block)


def _line_end(data: bytes, start: int) -> int:
    """The end of the line at *start* (after its CRLF, CR or LF; the end of *data* if none)."""
    ends = [i for i in (data.find(b"\r", start), data.find(b"\n", start)) if i >= 0]
    if not ends:
        return len(data)
    end = min(ends)
    return end + 2 if data[end:end + 2] == b"\r\n" else end + 1


def _split_header_block(data: bytes) -> tuple[list[str], int | None, int]:
    """*data* as the feed parser would read its header block: the lines of the header block
    (without the fields past MAX_HEADER_FIELDS, and without the lines of a field past the ones
    that make it longer than MAX_HEADER_LENGTH: both ignored by _parse_headers), then the line
    that ends the block (a blank line, or the body's first line); the number of header fields
    in the block (None: all of them are in the lines); where the bytes after that line start.

    Every line ends at a break the parser finds in the whole (a CR is never parted from its LF),
    so the lines and the bytes after them read as the whole does."""
    view, block_end = _header_block(data)
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
    return lines, count, body_start


def _header_block(data: bytes) -> tuple[str, int]:
    """An ASCII view (_ASCII_VIEW) of the start of *data* and where its header block ends in it.
    Only as much is viewed as the block needs: the end is found once the line it stops at has
    its line break in the view (whether a line is a header line is decided by its start)."""
    window = _HEADER_WINDOW
    while True:
        view = data[:window].translate(_ASCII_VIEW).decode("ascii")
        block_end = _HEADER_BLOCK.match(view).end()
        if window >= len(data) or "\n" in view[block_end:] or "\r" in view[block_end:-1]:
            return view, block_end
        window *= 4


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


def read_mime(raw: bytes) -> _Reading:
    """The MIME tree of *raw* within the limits: embedded messages shown inline are parsed in
    place, parts that follow a premature closing delimiter are recovered."""
    reading = _Reading()
    # A leading UTF-8 byte-order mark (seen in the wild) would make the first header a body line.
    reading.root = _BoundedFeedParser(reading, depth=0, stored=True).parse(raw.removeprefix(codecs.BOM_UTF8))
    for part, parent, depth in walk_parts(reading.root):
        part.opaque = False  # read: from here on every entity reports the type it declared
        if part.is_multipart():
            _recover_parts_after_close(part, depth, reading)
        elif part.get_content_type() in _INLINE_MESSAGE_TYPES and shown_inline(part, bool(part.get_filename())) \
                and (parent is None or parent.get_content_type() != "multipart/report"):
            _parse_embedded_message(part, depth, reading)
    return reading


def shown_inline(part: Message, named: bool) -> bool:
    """Displayed as part of the message by mail clients, rather than offered as a file (RFC 2183:
    an explicit disposition decides; without one, a part with a file name is a file)."""
    disposition = part.get_content_disposition()
    return disposition != "attachment" and (disposition == "inline" or not named)


def _parse_embedded_message(part: Message, depth: int, reading: _Reading) -> None:
    """Parse an inline embedded message (a forward, a digest entry) in place, so its text and
    attachments count as the message's own; a report's returned message stays one attachment."""
    if depth >= MAX_MIME_DEPTH:
        warn(reading.warnings, _DEPTH_LIMIT_WARNING)
        return
    if reading.part_count >= MAX_MIME_PARTS:
        warn(reading.warnings, _PART_LIMIT_WARNING)
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
            warn(reading.warnings, _PART_LIMIT_WARNING)
            return
        multipart.attach(_BoundedFeedParser(reading, depth).parse(chunk.encode("ascii", "surrogateescape")))
        warn(reading.warnings, "parts after a premature closing MIME boundary were recovered")


def walk_parts(root: MimePart) -> Iterator[tuple[MimePart, MimePart | None, int]]:
    """Every entity with its parent and depth (root: 1), in document order, without recursion.
    Children are read when their parent has been yielded, so parts attached then are walked too."""
    stack: list[tuple[MimePart, MimePart | None, int]] = [(root, None, 1)]
    while stack:
        part, parent, depth = stack.pop()
        yield part, parent, depth
        if part.is_multipart():
            stack.extend((child, part, depth + 1) for child in reversed(part.get_payload()))
