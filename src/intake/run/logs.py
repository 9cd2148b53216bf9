"""Structured log lines: one line per event on stderr, logfmt or JSON, journald priority prefixes.

intake's own messages are already ``key=value`` pairs (``event=accepted inbound_id=7 peer=...``);
:class:`StructuredFormatter` parses them into fields and writes them out again properly quoted,
after ``ts``, ``level`` and ``logger``::

    ts=2026-05-04T09:30:00.123Z level=info logger=intake.receive.listener event=accepted inbound_id=7 peer=127.0.0.1:5100
    {"ts": "2026-05-04T09:30:00.123Z", "level": "info", "logger": "intake.listener", "event": "accepted", ...}

Values written with ``%r`` (``error='relay down'``) lose their Python quotes; a value that runs
on with spaces up to the next ``key=`` is kept whole. A message made only of such pairs, each
value a literal word or one ``%`` placeholder, is split by its template, not by its text: there
every value is exactly its argument, whatever it holds, and the line costs less to write (the
listener writes one per message). Text that is not a pair (a third-party
library's sentence) goes into ``msg``; a traceback into ``exc``, escaped onto the same line.
Nothing here raises on an odd message: a line that cannot be parsed is still written, as ``msg``.

When stderr is the journal, each line starts with its sd-daemon(3) priority (``<3>`` error,
``<4>`` warning, ``<6>`` info, ``<7>`` debug), so ``journalctl -p warning`` filters on it.

Why not structlog (measured with ``benchmarks/log_lines.py``, CPU per line, 2 cores): on today's
call sites structlog's ``ProcessorFormatter`` would replace only the rendering, since a record's
message must still be split into fields here, and costs twice as much (a listener line 9-13 us
here, 18-19 us there; a 10 KB hostile value ~60 us both). Its renderers are not display-safe:
``LogfmtRenderer`` writes CR, ESC, C1 and bidi characters raw (and a newline and a literal
``\\n`` alike), ``JSONRenderer`` C1 and bidi ones, so this module's escaping would stay anyway
(figures and checks: benchmarks/README.md).
What structlog would remove, the parsing of messages back into fields, goes only with call sites
that pass fields (``log.info("accepted", inbound_id=7)``); through stdlib logging, which the
libraries' records need, that costs 18-20 us a line. So the formatter stays until call sites change.
"""

from __future__ import annotations

import ast
import functools
import json
import logging
import os
import re  # log templates are ours; on values only a one-character class (linear): see intake.patterns
import sys
import time
from typing import Any, TextIO

from intake.config.sections import LoggingSection
from intake.display import DANGEROUS_CLASS, json_safe

# sd-daemon(3) / syslog(3) priorities.
_PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6, logging.DEBUG: 7}
_LEVEL_NAMES = {logging.CRITICAL: "critical", logging.ERROR: "error", logging.WARNING: "warning",
                logging.INFO: "info", logging.DEBUG: "debug"}
_RESERVED = ("ts", "level", "logger", "msg", "exc")

# A key: at the start of the message or after whitespace, followed by '='.
_KEY = re.compile(r"(?:^|(?<=\s))([A-Za-z_][A-Za-z0-9_.-]*)=")
_NUMBER = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?")
# A template pair: key=%<conversion> or key=<a literal word>.
_TEMPLATE_PAIR = re.compile(r"([A-Za-z_][A-Za-z0-9_.-]*)=(?:(%[-#0 +]*[0-9]*(?:\.[0-9]+)?[sdifgGxr])|([^\s%'\"=]*))")
# A value needs quotes in logfmt when empty or holding a space, '=', a quote or a control character.
# Quoted, and so escaped: what could drive the terminal `intake serve` runs in (see intake.display).
_NEEDS_QUOTES = re.compile(rf'[\s="\\{DANGEROUS_CLASS}]|^$')


def parse_fields(message: str) -> dict[str, str]:
    """The ``key=value`` pairs of *message*, in order; leading text that is no pair becomes ``msg``.

    A value is a Python string literal (as ``%r`` writes it) when it is one followed by a space
    or the end; otherwise everything up to the next `` key=`` (trailing spaces dropped)."""
    fields: dict[str, str] = {}
    matches = list(_KEY.finditer(message))
    if not matches:
        return {"msg": message} if message else {}
    lead = message[:matches[0].start()].strip()
    if lead:
        fields["msg"] = lead
    position = 0
    for match in matches:
        if match.start() < position:  # inside a quoted value already taken
            continue
        key = match.group(1)
        start = match.end()
        literal = _string_literal(message, start)
        if literal is not None:
            value, position = literal
        else:
            following = next((m.start() for m in matches if m.start() > start), len(message))
            value, position = message[start:following].rstrip(), following
        fields[_unreserved(key, fields)] = value
    return fields


def _string_literal(message: str, start: int) -> tuple[str, int] | None:
    """The Python string literal at *start* and where it ends, if one is there and ends a token."""
    if start >= len(message) or message[start] not in "'\"":
        return None
    quote = message[start]
    index = start + 1
    while index < len(message):
        char = message[index]
        if char == "\\":
            index += 2
            continue
        if char == quote:
            end = index + 1
            if end < len(message) and not message[end].isspace():
                return None
            try:
                value = ast.literal_eval(message[start:end])
            except (ValueError, SyntaxError):
                return None
            return (value, end) if isinstance(value, str) else None
        index += 1
    return None


@functools.lru_cache(maxsize=512)
def _template(message: str) -> tuple[tuple[tuple[str, str | None, str | None], ...], int] | None:
    """The pairs of a template made only of ``key=%x`` / ``key=word`` pairs, one space apart, as
    (key, conversion, literal), and how many arguments they take; None for any other template."""
    pairs = []
    for token in message.split(" "):
        match = _TEMPLATE_PAIR.fullmatch(token)
        if match is None:
            return None
        pairs.append(match.groups())
    return tuple(pairs), sum(conversion is not None for _, conversion, _ in pairs)


def _fields_by_template(record: logging.LogRecord) -> list[tuple[str, str]] | None:
    """The pairs of *record* taken from its template and arguments; None when that cannot be done
    (see :func:`_template`, or arguments that do not fit it), and the message text is parsed instead."""
    if not isinstance(record.msg, str) or not isinstance(record.args, tuple) or not record.args:
        return None
    template = _template(record.msg)
    if template is None or template[1] != len(record.args):
        return None
    arguments = iter(record.args)
    pairs = []
    try:
        for key, conversion, literal in template[0]:
            if conversion is None:
                value = literal
            elif conversion == "%r":
                argument = next(arguments)  # as parse_fields reads a %r string back: the string itself
                value = argument if isinstance(argument, str) else repr(argument)
            else:
                value = conversion % (next(arguments),)
            pairs.append((key, value))
    except (TypeError, ValueError):
        return None
    return pairs


@functools.lru_cache(maxsize=4)
def _utc_second(second: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))


def timestamp(created: float) -> str:
    """*created* (seconds since the epoch) as UTC ISO 8601 to the millisecond: ``2026-05-04T09:30:00.123Z``."""
    second = int(created)
    return f"{_utc_second(second)}.{int((created - second) * 1000):03d}Z"


def _unreserved(key: str, fields: dict[str, str]) -> str:
    """*key*, renamed when it would overwrite one of the line's own fields or an earlier pair."""
    while key in _RESERVED or key in fields:
        key = f"{key}_"
    return key


def logfmt_value(value: str) -> str:
    """*value* as a logfmt value: bare when it can be, else double-quoted with JSON escapes."""
    return json_safe(json.dumps(value, ensure_ascii=False)) if _NEEDS_QUOTES.search(value) else value


def _json_value(value: str) -> Any:
    """Numbers as JSON numbers (``inbound_id``, ``parse_ms``), everything else as a string."""
    if _NUMBER.fullmatch(value):
        return float(value) if "." in value else int(value)
    return value


class StructuredFormatter(logging.Formatter):
    """Renders each record as one logfmt or JSON line, optionally with a journald priority prefix."""

    def __init__(self, style: str = "logfmt", journal_prefix: bool = False):
        super().__init__()
        if style not in ("logfmt", "json"):
            raise ValueError(f"unknown log format {style!r}")
        self._json = style == "json"
        self._prefix = journal_prefix

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, str] = {
            "ts": timestamp(record.created),
            "level": _LEVEL_NAMES.get(record.levelno, record.levelname.lower()),
            "logger": record.name,
        }
        pairs = _fields_by_template(record)
        if pairs is not None:
            for key, value in pairs:
                fields[_unreserved(key, fields)] = value
        else:
            try:
                message = record.getMessage()
            except Exception as exc:  # noqa: BLE001 - a bad %-format must cost a field, never the line
                message = f"unformattable log message {record.msg!r} args={record.args!r}: {exc!r}"
            fields.update(parse_fields(message))
        if record.exc_info:
            fields["exc"] = self.formatException(record.exc_info)
        if self._json:
            line = json_safe(json.dumps({key: value if key in _RESERVED else _json_value(value)
                                         for key, value in fields.items()}, ensure_ascii=False))
        else:
            line = " ".join(f"{key}={logfmt_value(value)}" for key, value in fields.items())
        if self._prefix:
            line = f"<{_priority(record.levelno)}>{line}"
        return line


def _priority(levelno: int) -> int:
    for threshold in sorted(_PRIORITY, reverse=True):
        if levelno >= threshold:
            return _PRIORITY[threshold]
    return _PRIORITY[logging.DEBUG]


def stderr_is_journal(stream: TextIO | None = None, environ: dict[str, str] | None = None) -> bool:
    """True when $JOURNAL_STREAM ("device:inode", set by systemd) names the file *stream* writes to."""
    environ = os.environ if environ is None else environ
    stream = sys.stderr if stream is None else stream
    device, _, inode = environ.get("JOURNAL_STREAM", "").partition(":")
    if not device.isdigit() or not inode.isdigit():
        return False
    try:
        status = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return (status.st_dev, status.st_ino) == (int(device), int(inode))


def make_handler(section: LoggingSection) -> logging.Handler:
    """A stderr handler writing records as *section* says (format, journald prefix)."""
    prefix = section.journal_prefix == "always" or (section.journal_prefix == "auto" and stderr_is_journal())
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(StructuredFormatter(section.format, prefix))
    return handler


def configure_logging(section: LoggingSection) -> None:
    """Every logger to stderr, one structured line per record (see the module's docstring)."""
    logging.basicConfig(level=section.level.upper(), handlers=[make_handler(section)], force=True)
    # aiosmtpd logs every SMTP command at INFO, addresses included; our own lines say what matters.
    logging.getLogger("mail.log").setLevel(logging.WARNING)
    # mail-parser warns about every MIME type it does not render; that is not news.
    logging.getLogger("mailparser").setLevel(logging.ERROR)
    # APScheduler logs two lines for every run of every job; the sweep logs what it sent.
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    # Alembic logs its plugin set-up at every start (about 20 lines); event=schema-upgraded says what changed.
    logging.getLogger("alembic").setLevel(logging.WARNING)
