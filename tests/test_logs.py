"""The structured log formatter: logfmt and JSON lines from intake's key=value messages, odd
messages included, and the journald priority prefix."""

from __future__ import annotations

import json
import logging
import os
import re
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from intake.config.sections import LoggingSection
from intake.run.logs import StructuredFormatter, make_handler, parse_fields, stderr_is_journal, timestamp

_LOGFMT_PAIR = re.compile(r'([^\s=]+)=("(?:[^"\\]|\\.)*"|[^\s"]*)(?:\s+|$)')


def parse_logfmt(line: str) -> dict[str, str]:
    """A strict logfmt reader: the whole line must be pairs; quoted values are JSON strings."""
    fields: dict[str, str] = {}
    position = 0
    while position < len(line):
        match = _LOGFMT_PAIR.match(line, position)
        assert match, f"not logfmt at {position}: {line!r}"
        key, value = match.groups()
        assert key not in fields, f"{key} twice in {line!r}"
        fields[key] = json.loads(value) if value.startswith('"') else value
        position = match.end()
    return fields


def record(message: str, *args: object, level: int = logging.INFO, exc_info=None) -> logging.LogRecord:  # type: ignore[no-untyped-def]
    made = logging.LogRecord("intake.test", level, __file__, 1, message, args, exc_info)
    # One instant for every record: two lines compared whole must not straddle a millisecond.
    made.created = 1_777_887_000.123
    return made


def logfmt(message: str, *args: object, **kwargs) -> dict[str, str]:  # type: ignore[no-untyped-def]
    line = StructuredFormatter("logfmt").format(record(message, *args, **kwargs))
    assert "\n" not in line
    return parse_logfmt(line)


def as_json(message: str, *args: object, **kwargs) -> dict:  # type: ignore[no-untyped-def]
    line = StructuredFormatter("json").format(record(message, *args, **kwargs))
    assert "\n" not in line
    return json.loads(line)


def test_an_intake_event_becomes_fields_after_ts_level_and_logger():
    line = StructuredFormatter("logfmt").format(
        record("event=accepted inbound_id=%d peer=%s size=%d", 7, "127.0.0.1:5100", 812))
    assert re.fullmatch(r"ts=\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z level=info logger=intake\.test "
                        r"event=accepted inbound_id=7 peer=127\.0\.0\.1:5100 size=812", line), line


def test_repr_values_lose_their_python_quotes_and_spaces_are_quoted():
    fields = logfmt("event=processed message_id=%s decision=%s reason=%r", "<a b@x>", "new-ticket",
                    "no earlier rule matched; mentions SEC-2026-0001")
    assert fields["message_id"] == "<a b@x>" and fields["decision"] == "new-ticket"
    assert fields["reason"] == "no earlier rule matched; mentions SEC-2026-0001"


def test_quotes_backslashes_newlines_and_equals_signs_survive_a_round_trip():
    nasty = 'he said "x=1"\\n\nand\ttabs \x1b[31m'
    assert logfmt("event=odd value=%r", nasty)["value"] == nasty
    assert as_json("event=odd value=%r", nasty)["value"] == nasty


def test_an_unquoted_value_with_spaces_runs_to_the_next_key():
    fields = logfmt("event=store-failed error=%r size=%d", ConnectionRefusedError(111, "Connection refused"), 5)
    assert fields["error"] == "ConnectionRefusedError(111, 'Connection refused')" and fields["size"] == "5"


def test_text_that_is_no_pair_goes_into_msg():
    assert logfmt("Scheduler started")["msg"] == "Scheduler started"
    fields = logfmt("Running job %s (next run 10:00) key=%s", "sweep", "v")
    assert fields["msg"] == "Running job sweep (next run 10:00)" and fields["key"] == "v"
    assert logfmt("")["level"] == "info"


def test_reserved_and_repeated_keys_never_overwrite_a_field():
    fields = logfmt("event=x level=debug logger=me event=y")
    assert fields["level"] == "info" and fields["level_"] == "debug"
    assert fields["logger"] == "intake.test" and fields["logger_"] == "me"
    assert fields["event"] == "x" and fields["event_"] == "y"


@pytest.mark.parametrize("message", [
    "event=x value='unterminated", "event=x value='a' 'b'", "=== x= =y", "event=x value='bytes'suffix",
    "event=x value=b'raw'", "key='a\\'b' next=1", "\x00\x01=\x02", "ünïcödé=値 ключ=значение", "event=x " * 200,
])
def test_odd_messages_never_crash_and_stay_one_parsable_line(message: str):
    fields = logfmt(message)
    assert fields["logger"] == "intake.test"
    json_fields = as_json(message)
    assert json_fields["logger"] == "intake.test"


def test_a_message_whose_arguments_do_not_fit_is_still_a_line():
    fields = logfmt("event=x count=%d", "not a number")
    assert fields["logger"] == "intake.test" and "unformattable" in fields["msg"]


def test_a_traceback_is_escaped_onto_the_same_line():
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        exc_info = sys.exc_info()
    fields = logfmt("event=processor-error", level=logging.ERROR, exc_info=exc_info)
    assert fields["level"] == "error" and "Traceback" in fields["exc"] and "second line" in fields["exc"]
    assert "ValueError" in as_json("event=x", exc_info=exc_info)["exc"]


def test_json_numbers_are_numbers_and_everything_else_strings():
    fields = as_json("event=processed inbound_id=%d parse_ms=%.1f ticket=%s id=%s", 3, 1.25, "SEC-2026-0001", "007")
    assert fields["inbound_id"] == 3 and fields["parse_ms"] == 1.2
    assert fields["ticket"] == "SEC-2026-0001" and fields["id"] == "007"


@pytest.mark.parametrize(("level", "prefix"), [
    (logging.DEBUG, "<7>"), (logging.INFO, "<6>"), (logging.WARNING, "<4>"), (logging.ERROR, "<3>"),
    (logging.CRITICAL, "<2>"),
])
def test_journald_priority_prefixes(level: int, prefix: str):
    line = StructuredFormatter("logfmt", journal_prefix=True).format(record("event=x", level=level))
    assert line.startswith(prefix + "ts=")
    assert StructuredFormatter("json", journal_prefix=True).format(record("event=x", level=level)).startswith(
        prefix + "{")


def test_stderr_is_the_journal_only_when_journal_stream_names_its_file(tmp_path):
    with open(tmp_path / "stream", "w") as stream:
        status = os.fstat(stream.fileno())
        assert stderr_is_journal(stream, {"JOURNAL_STREAM": f"{status.st_dev}:{status.st_ino}"})
        assert not stderr_is_journal(stream, {"JOURNAL_STREAM": f"{status.st_dev}:{status.st_ino + 1}"})
        assert not stderr_is_journal(stream, {"JOURNAL_STREAM": "garbage"})
        assert not stderr_is_journal(stream, {})


def test_the_handler_follows_the_section():
    always = make_handler(LoggingSection(format="json", journal_prefix="always"))
    assert always.format(record("event=x")).startswith("<6>{")
    never = make_handler(LoggingSection(journal_prefix="never"))
    assert never.format(record("event=x")).startswith("ts=")


def test_parse_fields_keeps_order_and_values():
    assert list(parse_fields("event=a b=1 c='x y' d=")) == ["event", "b", "c", "d"]
    assert parse_fields("event=a b=1 c='x y' d=") == {"event": "a", "b": "1", "c": "x y", "d": ""}


_WORD = st.text(st.characters(blacklist_categories=("Cs", "Z", "C"), blacklist_characters="=\"'\\"), min_size=1)


@given(inbound_id=st.integers(), peer=_WORD, reason=st.text(), parse_ms=st.floats(allow_nan=False), error=st.one_of(
    st.integers(), st.none(), st.builds(OSError, st.integers(), _WORD)))
def test_a_template_of_pairs_gives_the_same_fields_as_reading_the_text(inbound_id, peer, reason, parse_ms, error):
    template = "event=processed inbound_id=%d peer=%s parse_ms=%.1f reason=%r error=%r"
    arguments = (inbound_id, peer, parse_ms, reason, error)
    by_template = logfmt(template, *arguments)
    by_text = parse_fields(template % arguments)
    assert {key: by_template[key] for key in by_text} == by_text
    assert by_template["reason"] == reason and by_template["peer"] == peer


def test_a_template_keeps_a_value_whole_that_reads_like_more_pairs():
    fields = logfmt("event=x helo=%s size=%d", "mx.example other=1 'q'", 5)
    assert fields["helo"] == "mx.example other=1 'q'" and fields["size"] == "5" and "other" not in fields
    assert logfmt("event=x level=%s event=%s", "debug", "y") == logfmt("event=x level=debug event=y")


@given(st.floats(min_value=0, max_value=4_000_000_000, allow_nan=False))
def test_timestamps_are_utc_to_the_millisecond(created):
    from datetime import datetime, timedelta, timezone

    written = timestamp(created)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", written), written
    read = datetime.fromisoformat(written.replace("Z", "+00:00"))
    assert timedelta(0) <= datetime.fromtimestamp(created, timezone.utc) - read < timedelta(milliseconds=1.01)
