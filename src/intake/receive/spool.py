"""DATA read into a spool: a message's bytes held once, in memory while small, in a file past that.

aiosmtpd collects DATA as a list of one object per line, then joins them: about three times the
message in memory before anything is stored (a 25.8 MB message took the listener 100 MB). Here
the lines go, dot-unstuffed, into one buffer that is written to an anonymous temporary file
(``O_TMPFILE``: no name, gone when closed, even if the process dies) each time it reaches
:data:`BUFFER_BYTES`; at the end the message is read back in one piece.

The rules are aiosmtpd's (1.4, ``SMTP.smtp_DATA``), kept exactly: lines end with CRLF (a bare LF is
part of a line), a line longer than the line length limit makes ``500`` and one past the size
limit ``552``, both answered only after the client's final dot, and the size counted is of the
lines as sent (before unstuffing, without the final dot).

Lines are taken one at a time (``readuntil``) only where these rules have something to say. The
whole lines already received are taken together, up to :data:`BULK_BYTES` at once, unstuffed with
one ``replace``: a 4 KB message is some 60 lines, and reading them one by one cost the listener
150 µs (a tenth of what it spends on a message). Together only when none of them is too long, the
size limit is not reached with them, the budget has room for them all and nothing has gone wrong
before: otherwise line by line, as before, so every outcome is the one the lines would have had
read one by one. (This reads the ``asyncio.StreamReader``'s own buffer, ``_buffer``: the reader
has no way to look at what it holds without taking it.)
"""

from __future__ import annotations

import asyncio
import enum
import logging
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

log = logging.getLogger(__name__)

BUFFER_BYTES = 1024 * 1024  # bytes of a message held in memory before it goes to the spool file
BULK_BYTES = 64 * 1024  # the most of the reader's buffer taken in one piece (whole lines only)


class Outcome(enum.Enum):
    COMPLETE = "complete"
    TOO_LONG = "too-long"  # a line over the line length limit: 500
    TOO_MUCH = "too-much"  # more than the size limit: 552
    OVER_BUDGET = "over-budget"  # more than the listener's memory budget had room for: 452
    OUT_OF_MEMORY = "out-of-memory"  # the process could not have the memory the budget allowed: 452
    SPOOL_FAILED = "spool-failed"  # the spool file could not be written (disk full, no folder): 451


class MemoryBudget:
    """Bytes of mail the listener may hold at once (``smtp.memory_budget``), shared by its sessions."""

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0

    def reservation(self) -> Reservation:
        return Reservation(self)


class Reservation:
    """One transaction's share of the budget: grown as its message arrives, released at its end."""

    def __init__(self, budget: MemoryBudget):
        self._budget = budget
        self.held = 0

    def cover(self, size: int) -> bool:
        """Hold at least *size* bytes in all; False when the budget has no room, and then nothing is
        held any more: the message is refused and its spool discarded, so what it held goes at once
        to the sessions still receiving (held to the end of DATA, many sessions each holding part of
        the budget would all be refused)."""
        more = size - self.held
        if more <= 0:
            return True
        if self._budget.used + more > self._budget.limit:
            self.release()
            return False
        self._budget.used += more
        self.held = size
        return True

    def release(self) -> None:
        self._budget.used -= self.held
        self.held = 0


class Spool:
    """One message's bytes as they arrive: a buffer, then an anonymous file in *directory*."""

    def __init__(self, directory: Path | None):
        self._directory = directory
        self._buffer = bytearray()
        self._file: BinaryIO | None = None
        self.size = 0  # bytes held (after unstuffing)

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.discard()

    def append(self, line: bytes) -> None:
        self._buffer += line
        self.size += len(line)
        if len(self._buffer) >= BUFFER_BYTES:
            self._flush()

    def _flush(self) -> None:
        if self._file is None:
            self._file = tempfile.TemporaryFile(dir=self._directory, buffering=0)  # noqa: SIM115 - closed by discard
        self._file.write(self._buffer)
        self._buffer = bytearray()

    def content(self) -> bytes:
        """The message in one piece (the spool file read back into one object of its size)."""
        if self._file is None:
            return bytes(self._buffer)
        self._flush()
        self._file.seek(0)
        return self._file.read()

    def discard(self) -> None:
        self._buffer = bytearray()
        self.size = 0
        if self._file is not None:
            self._file.close()
            self._file = None


async def receive(reader: asyncio.StreamReader, spool: Spool, size_limit: int | None, line_length_limit: int,
                  admit: Callable[[int], bool]) -> Outcome:
    """Read DATA lines from *reader* up to the final dot into *spool*, dot-unstuffed.

    *admit(n)* is asked before the spool holds *n* bytes in all; when it says no, the rest is read and
    thrown away and the outcome is ``OVER_BUDGET`` (unless the message was already over a limit).
    The reader's own limit must be *line_length_limit* (as aiosmtpd makes it)."""
    received = 0
    outcome = Outcome.COMPLETE
    fragment = False  # a part of an over-long line has been read: a dot ends nothing until its CRLF
    while True:
        if outcome is Outcome.COMPLETE and not fragment:
            lines, last = _whole_lines(reader, line_length_limit, size_limit - received if size_limit else BULK_BYTES)
            if lines or last:
                del reader._buffer[:len(lines) + (3 if last else 0)]  # the lines, and the final dot if it came
                reader._maybe_resume_transport()
                received += len(lines)
                outcome = _keep(spool, _unstuffed(lines), admit)
                if last:
                    return outcome
                continue
        try:
            line = await reader.readuntil(b"\r\n")
        except asyncio.LimitOverrunError as overrun:  # the line is longer than the reader may hold
            if outcome in (Outcome.COMPLETE, Outcome.OVER_BUDGET, Outcome.OUT_OF_MEMORY):
                outcome = Outcome.TOO_LONG
            spool.discard()
            line = await reader.read(overrun.consumed)
        if not fragment and line == b".\r\n":
            return outcome
        received += len(line)
        if outcome is not Outcome.TOO_LONG and outcome is not Outcome.TOO_MUCH and size_limit and received > size_limit:
            outcome = Outcome.TOO_MUCH
            spool.discard()
        fragment = not line.endswith(b"\r\n")
        if outcome is not Outcome.COMPLETE or fragment:
            continue
        if len(line) > line_length_limit:  # aiosmtpd's defensive check: the reader's limit stops these first
            outcome = Outcome.TOO_LONG
            spool.discard()
            continue
        outcome = _keep(spool, line[1:] if line[:1] == b"." else line, admit)


def _keep(spool: Spool, unstuffed: bytes | bytearray, admit: Callable[[int], bool]) -> Outcome:
    """Add *unstuffed* lines to *spool* if the budget has room: the outcome so far, discarding the
    spool when it is no longer complete."""
    if not admit(spool.size + len(unstuffed)):
        spool.discard()
        return Outcome.OVER_BUDGET
    try:
        spool.append(unstuffed)
    except OSError as exc:
        log.error("event=spool-failed error=%r", exc)
        spool.discard()
        return Outcome.SPOOL_FAILED
    except MemoryError:  # the process may have less than the budget says: read on, then 452
        spool.discard()
        return Outcome.OUT_OF_MEMORY
    return Outcome.COMPLETE


def _whole_lines(reader: asyncio.StreamReader, line_length_limit: int, room: int) -> tuple[bytearray, bool]:
    """The whole lines at the start of *reader*'s buffer that can be taken together (none longer
    than *line_length_limit*, at most *room* and :data:`BULK_BYTES` bytes in all), and whether the
    final dot follows them. The buffer starts at a line's start (no fragment is being read). No
    lines (and False) leave the next line to ``readuntil``: it is not whole yet, or it is too long,
    or it is past the room left."""
    buffer = reader._buffer
    if buffer[:3] == b".\r\n":
        return bytearray(), True
    reach = min(room, BULK_BYTES)
    final = buffer.find(b"\r\n.\r\n", 0, reach + 3)  # lines before it end within reach
    end = final + 2 if final >= 0 else buffer.rfind(b"\r\n", 0, reach) + 2
    if end < 2:
        return bytearray(), False
    lines = buffer[:end]
    each = lines.split(b"\r\n")
    if max(map(len, each)) + 2 <= line_length_limit:
        return lines, final >= 0
    end = 0
    for line in each:  # only up to the first that is too long (rare: the message gets 500 for it)
        if len(line) + 2 > line_length_limit:
            break
        end += len(line) + 2
    return lines[:end], False


def _unstuffed(lines: bytearray) -> bytearray:
    """Whole *lines* without the dot each that starts with one had added (RFC 5321 4.5.2)."""
    if b"\r\n." in lines:
        lines = lines.replace(b"\r\n.", b"\r\n")
    return lines[1:] if lines[:1] == b"." else lines
