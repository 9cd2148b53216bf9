"""DATA read in bulk gives what reading it line by line gives: the same bytes, outcome and budget.

:func:`intake.receive.spool.receive` takes the whole lines it has received together; the rules
(aiosmtpd's: CRLF lines, dot-unstuffing, 500 for a line over the limit and 552 past the size,
both after the final dot; the memory budget's 452) are those of reading one line at a time,
written out here as the reference, on the same bytes arriving in the same pieces.
"""

from __future__ import annotations

import asyncio
import random

import pytest

from intake.receive import spool
from intake.receive.spool import Outcome


async def line_by_line(reader: asyncio.StreamReader, data: spool.Spool, size_limit: int | None,
                       line_length_limit: int, admit) -> Outcome:  # type: ignore[no-untyped-def]
    """The rules, one ``readuntil`` a line (the listener's DATA before it read in bulk)."""
    received, outcome, fragment = 0, Outcome.COMPLETE, False
    while True:
        try:
            line = await reader.readuntil(b"\r\n")
        except asyncio.LimitOverrunError as overrun:
            if outcome in (Outcome.COMPLETE, Outcome.OVER_BUDGET, Outcome.OUT_OF_MEMORY):
                outcome = Outcome.TOO_LONG
            data.discard()
            line = await reader.read(overrun.consumed)
        if not fragment and line == b".\r\n":
            return outcome
        received += len(line)
        if outcome not in (Outcome.TOO_LONG, Outcome.TOO_MUCH) and size_limit and received > size_limit:
            outcome = Outcome.TOO_MUCH
            data.discard()
        fragment = not line.endswith(b"\r\n")
        if outcome is not Outcome.COMPLETE or fragment:
            continue
        if len(line) > line_length_limit:
            outcome = Outcome.TOO_LONG
            data.discard()
            continue
        unstuffed = line[1:] if line[:1] == b"." else line
        if not admit(data.size + len(unstuffed)):
            outcome = Outcome.OVER_BUDGET
            data.discard()
            continue
        data.append(unstuffed)


async def read_with(read, pieces: list[bytes], size_limit: int | None, line_length_limit: int,  # type: ignore[no-untyped-def]
                    budget_limit: int) -> tuple[Outcome, bytes, bytes, int, int]:
    """*pieces* arriving one by one (each after the reader has taken what it could of the last):
    the outcome, the message kept, what is left for the next command, and what the budget holds."""
    reader = asyncio.StreamReader(limit=line_length_limit)
    budget = spool.MemoryBudget(budget_limit)
    reservation = budget.reservation()
    with spool.Spool(None) as data:
        task = asyncio.ensure_future(read(reader, data, size_limit, line_length_limit, reservation.cover))
        for piece in pieces:
            for _ in range(3):
                await asyncio.sleep(0)
            reader.feed_data(piece)  # after the final dot, it is the next command's
        reader.feed_eof()
        outcome = await task
        kept = data.content() if outcome is Outcome.COMPLETE else b""
    left = await reader.read()
    return outcome, kept, left, reservation.held, budget.used


def stuffed(lines: list[bytes]) -> bytes:
    return b"".join(b"." + line if line.startswith(b".") else line for line in lines) + b".\r\n"


def random_wire(chances: random.Random) -> bytes:
    """A message (dot-stuffed or not quite: stray dots, bare CR and LF, long lines, a final dot
    that is not one) and maybe the next command pipelined after it."""
    words = [b"a", b"bb", b".", b"..", b"\r", b"\n", b"\r\n", b" ", b".\r\n", b"x" * 15, b"y" * 40, b"\r\n.\r\n"]
    lines = []
    for _ in range(chances.randint(0, 30)):
        lines.append(b"".join(chances.choice(words) for _ in range(chances.randint(0, 4))) + b"\r\n")
    wire = stuffed(lines) if chances.random() < 0.7 else b"".join(lines) + b".\r\n"
    if chances.random() < 0.3:
        wire += b"QUIT\r\n"
    return wire


def pieces_of(wire: bytes, chances: random.Random) -> list[bytes]:
    cuts = sorted(chances.sample(range(1, len(wire)), min(chances.randint(0, 6), len(wire) - 1))) if len(wire) > 1 else []
    return [wire[start:end] for start, end in zip([0, *cuts], [*cuts, len(wire)])]


def both(pieces: list[bytes], size_limit: int | None, line_length_limit: int, budget_limit: int) -> tuple:
    async def run() -> tuple:
        return (await read_with(spool.receive, pieces, size_limit, line_length_limit, budget_limit),
                await read_with(line_by_line, pieces, size_limit, line_length_limit, budget_limit))

    return asyncio.run(run())


def test_random_messages_in_random_pieces_come_out_as_line_by_line():
    chances = random.Random(1203)
    differences = []
    for _ in range(1500):
        pieces = pieces_of(random_wire(chances), chances)
        limits = (chances.choice([None, 0, 40, 120, 400]), chances.choice([20, 30, 1001]),
                  chances.choice([30, 100, 10_000]))
        bulk, reference = both(pieces, *limits)
        if bulk != reference:
            differences.append((pieces, limits, bulk, reference))
    assert not differences[:3]


@pytest.mark.parametrize("over", [-1, 0, 1])
def test_the_size_limit_is_exact_when_the_whole_message_arrives_at_once(over):
    lines = [b"%05d plain line of some length\r\n" % n for n in range(200)]
    size = sum(map(len, lines))
    bulk, reference = both([stuffed(lines) + b"QUIT\r\n"], size - over, 1001, 1 << 20)
    assert bulk == reference
    assert bulk[:3] == ((Outcome.TOO_MUCH, b"", b"QUIT\r\n") if over > 0 else
                        (Outcome.COMPLETE, b"".join(lines), b"QUIT\r\n"))


def test_a_long_line_after_many_short_ones_is_500_as_line_by_line():
    lines = [b"ab\r\n"] * 20_000 + [b"z" * 2000 + b"\r\n"] + [b"cd\r\n"] * 100
    bulk, reference = both([stuffed(lines)], None, 1001, 1 << 20)
    assert bulk == reference and bulk[0] is Outcome.TOO_LONG


def test_dots_at_the_start_of_lines_and_of_the_message_are_unstuffed_once():
    lines = [b".starts with a dot\r\n", b"..\r\n", b". \r\n", b"plain\r\n", b"...three\r\n"]
    bulk, reference = both([stuffed(lines)], None, 1001, 1 << 20)
    assert bulk == reference and bulk[:3] == (Outcome.COMPLETE, b"".join(lines), b"")


def test_the_budget_refuses_what_it_has_no_room_for_and_holds_nothing_after():
    lines = [b"%05d a line\r\n" % n for n in range(1000)]
    bulk, reference = both([stuffed(lines)], None, 1001, 5000)
    assert bulk == reference and bulk[0] is Outcome.OVER_BUDGET and bulk[3:] == (0, 0)
