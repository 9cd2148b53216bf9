"""Benchmark intake's log formatter against structlog doing the same job (not a test).

Three ways to write one log line to a handler on /dev/null, through the logger as services do:

* ``intake``: :class:`intake.run.logs.StructuredFormatter` on today's call sites
  (``log.info("event=accepted inbound_id=%d ...", ...)``);
* ``structlog-formatter``: structlog's ``ProcessorFormatter`` (timestamper, level, logger name,
  ``LogfmtRenderer`` / ``JSONRenderer``) on the same call sites: a record's message still has to be
  split into fields, by :func:`intake.run.logs.parse_fields`, so it replaces only the rendering;
* ``structlog-native``: call sites migrated to structlog (``log.info("accepted", inbound_id=7, ...)``)
  through ``structlog.stdlib`` and the same ``ProcessorFormatter``: no message to split;
* ``structlog-direct``: migrated call sites on structlog alone (``WriteLogger``, no stdlib
  logging): the cheapest structlog can be, though the libraries' records (aiosmtpd, APScheduler,
  alembic) would still need a formatter; ``structlog-direct-safe`` is the same with intake's value
  escaping as its renderer (structlog's own leave CR, ESC, C1 and bidi characters raw).

for a typical listener line and a hostile one (a 10 KB value with quotes, CR/LF, ANSI and OSC
escapes, a bidi override), in logfmt and JSON, and checks each line: one line, no raw character a
terminal could act on (:data:`intake.display.DANGEROUS`), and the value read back exactly.

    .venv/bin/python benchmarks/log_lines.py             # needs `pip install structlog`
    .venv/bin/python benchmarks/log_lines.py --lines 20000
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import time
from collections.abc import Callable

import structlog

from intake.display import DANGEROUS, json_safe
from intake.run import logs
from intake.run.logs import StructuredFormatter, parse_fields

PEER = "127.0.0.1:5100"
HOSTILE = 'a "quoted" x=1 \\n\r\n\x1b[2K\x1b]52;c;ZXZpbA==\x07 \u202e' + "y" * 10_000
_LOGFMT_PAIR = re.compile(r'([^\s=]+)=("(?:[^"\\]|\\.)*"|[^\s"]*)(?:\s+|$)')


def read_logfmt(line: str) -> dict[str, str]:
    """Strict logfmt: the whole line is pairs; a quoted value is a JSON string."""
    fields, position = {}, 0
    while position < len(line):
        match = _LOGFMT_PAIR.match(line, position)
        if match is None:
            raise ValueError(f"not logfmt at {position}")
        key, value = match.groups()
        fields[key] = json.loads(value) if value.startswith('"') else value
        position = match.end()
    return fields


class Captured(logging.Handler):
    """Formats every record (the cost measured) and keeps the last line, for the checks."""

    def __init__(self, formatter: logging.Formatter, sink: object) -> None:
        super().__init__()
        self.setFormatter(formatter)
        self.sink, self.last = sink, ""

    def emit(self, record: logging.LogRecord) -> None:
        self.last = self.format(record)
        self.sink.write(self.last + "\n")  # type: ignore[attr-defined]


def split_message(_: object, __: str, event_dict: dict) -> dict:
    """structlog processor for stdlib records: the message's key=value pairs as fields, split as
    intake's formatter splits them (by the template when it can: the cheaper way)."""
    message = event_dict.pop("event")
    template = logging.makeLogRecord({"msg": event_dict["_record"].msg, "args": event_dict.pop("positional_args", ())})
    pairs = logs._fields_by_template(template)
    event_dict.update(pairs if pairs is not None else parse_fields(message))
    return event_dict


def structlog_formatter(style: str) -> logging.Formatter:
    renderer = (structlog.processors.JSONRenderer(ensure_ascii=False) if style == "json"
                else structlog.processors.LogfmtRenderer(key_order=["ts", "level", "logger"]))
    return structlog.stdlib.ProcessorFormatter(
        pass_foreign_args=True,
        foreign_pre_chain=[structlog.processors.TimeStamper(fmt="iso", utc=True, key="ts"),
                           structlog.stdlib.add_log_level, structlog.stdlib.add_logger_name, split_message],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )


def native_formatter(style: str) -> logging.Formatter:
    renderer = (structlog.processors.JSONRenderer(ensure_ascii=False) if style == "json"
                else structlog.processors.LogfmtRenderer(key_order=["ts", "level", "logger", "event"]))
    return structlog.stdlib.ProcessorFormatter(
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer])


def setup(name: str, formatter: logging.Formatter, sink: object) -> tuple[logging.Logger, Captured]:
    logger = logging.getLogger(f"intake.bench.{name}")
    logger.handlers[:] = []
    logger.propagate = False
    logger.setLevel(logging.INFO)
    handler = Captured(formatter, sink)
    logger.addHandler(handler)
    return logger, handler


def native_logger(stdlib_logger: logging.Logger) -> structlog.stdlib.BoundLogger:
    return structlog.wrap_logger(
        stdlib_logger, wrapper_class=structlog.stdlib.BoundLogger,
        processors=[structlog.stdlib.filter_by_level, structlog.stdlib.add_logger_name,
                    structlog.stdlib.add_log_level,
                    structlog.processors.TimeStamper(fmt="iso", utc=True, key="ts"),
                    structlog.stdlib.ProcessorFormatter.wrap_for_formatter])


def safe_logfmt(_: object, __: str, event_dict: dict) -> str:
    """A logfmt renderer quoting values as intake does (JSON escapes, nothing raw a terminal acts on)."""
    return " ".join(f"{key}={logs.logfmt_value(str(value))}" for key, value in event_dict.items())


def safe_json(data: object, **options: object) -> str:
    return json_safe(json.dumps(data, ensure_ascii=False, **options))  # type: ignore[arg-type]


def direct_logger(style: str, sink: object, safe: bool = False) -> tuple[structlog.BoundLogger, Captured]:
    """structlog without stdlib logging (third-party libraries' records would need the formatter);
    *safe*: with intake's escaping instead of structlog's renderers'."""
    if safe:
        renderer = structlog.processors.JSONRenderer(serializer=safe_json) if style == "json" else safe_logfmt
    else:
        renderer = (structlog.processors.JSONRenderer(ensure_ascii=False) if style == "json"
                    else structlog.processors.LogfmtRenderer(key_order=["ts", "level", "logger", "event"]))
    seen = Captured(logging.Formatter(), sink)

    def keep(_: object, __: str, line: str) -> str:
        seen.last = line
        return line

    logger = structlog.wrap_logger(
        structlog.WriteLogger(sink), wrapper_class=structlog.BoundLogger,  # type: ignore[arg-type]
        processors=[structlog.processors.add_log_level,
                    structlog.processors.TimeStamper(fmt="iso", utc=True, key="ts"), renderer, keep])
    return logger, seen


def per_line_us(write: Callable[[], None], lines: int) -> float:
    """CPU time per line, best of five runs (CPU time: other processes on the machine do not count)."""
    best = float("inf")
    for _ in range(5):
        started = time.process_time()
        for _ in range(lines):
            write()
        best = min(best, time.process_time() - started)
    return best / lines * 1e6


def check(line: str, style: str, key: str, expected: str) -> str:
    problems = []
    if "\n" in line or "\r" in line:
        problems.append("line break")
    if DANGEROUS.search(line):
        problems.append("raw control/bidi")
    try:
        value = (json.loads(line) if style == "json" else read_logfmt(line)).get(key)
        if value != expected:
            problems.append("value differs when read back")
    except ValueError:
        problems.append("unreadable")
    return ", ".join(problems) or "ok"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=10_000, help="lines per timing run (best of 5)")
    args = parser.parse_args()
    rows = []
    with open(os.devnull, "w") as sink:
        for style in ("logfmt", "json"):
            intake_log, intake_out = setup(f"intake-{style}", StructuredFormatter(style), sink)
            formatter_log, formatter_out = setup(f"structlog-{style}", structlog_formatter(style), sink)
            native_stdlib, native_out = setup(f"native-{style}", native_formatter(style), sink)
            native = native_logger(native_stdlib)
            direct, direct_out = direct_logger(style, sink)
            safe, safe_out = direct_logger(style, sink, safe=True)
            cases = {
                "typical": (
                    lambda: intake_log.info("event=accepted inbound_id=%d peer=%s size=%d rcpts=%d", 7, PEER, 812, 1),
                    lambda: formatter_log.info("event=accepted inbound_id=%d peer=%s size=%d rcpts=%d", 7, PEER, 812,
                                               1),
                    lambda: native.info("accepted", inbound_id=7, peer=PEER, size=812, rcpts=1),
                    lambda: direct.info("accepted", inbound_id=7, peer=PEER, size=812, rcpts=1),
                    lambda: safe.info("accepted", inbound_id=7, peer=PEER, size=812, rcpts=1),
                    "peer", PEER),
                "hostile": (
                    lambda: intake_log.info("event=rcpt-refused peer=%s rcpt=%r", PEER, HOSTILE),
                    lambda: formatter_log.info("event=rcpt-refused peer=%s rcpt=%r", PEER, HOSTILE),
                    lambda: native.info("rcpt-refused", peer=PEER, rcpt=HOSTILE),
                    lambda: direct.info("rcpt-refused", peer=PEER, rcpt=HOSTILE),
                    lambda: safe.info("rcpt-refused", peer=PEER, rcpt=HOSTILE),
                    "rcpt", HOSTILE),
            }
            for case, (ours, formatter, migrated, bare, bare_safe, key, expected) in cases.items():
                lines = args.lines if case == "typical" else max(args.lines // 10, 100)
                writers = (("intake", ours, intake_out), ("structlog-formatter", formatter, formatter_out),
                           ("structlog-native", migrated, native_out), ("structlog-direct", bare, direct_out),
                           ("structlog-direct-safe", bare_safe, safe_out))
                for name, write, out in writers:
                    cost = per_line_us(write, lines)
                    rows.append((style, case, name, cost, check(out.last, style, key, expected)))
    print(f"{'format':7} {'line':8} {'writer':22} {'us/line':>8}  check")
    for style, case, name, cost, verdict in rows:
        print(f"{style:7} {case:8} {name:22} {cost:8.1f}  {verdict}")


if __name__ == "__main__":
    main()
