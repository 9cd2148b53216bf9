"""The text work on a message, done in the prepare stage so that none of it runs under the write lock.

Acting on a message reads things out of its body text: the credit a report or a reporter's reply
states (:mod:`intake.understand.credit_words`), a maintainer's ``#command`` lines (:func:`split_commands`;
:mod:`intake.tickets.mail_commands` carries them out) and the text relayed to the reporter with the
quoted thread and signature trimmed (:func:`trim_reply`), and the disclosure date a reporter proposes
(:mod:`intake.understand.disclosure_words`). A reply of 60,000 blank lines once made
that work take 39 s inside the write transaction, and every other sender got ``451`` meanwhile.
So it is all done here, for every message, before any lock is taken: in the parse helper after
parsing and scoring, within ``processing.message_budget`` (see :mod:`intake.understand.parse_guard`);
the result travels on ``processor.Prepared`` and the act stage only copies it. Which of its parts a
message needs is known only after routing, so all are done: each is linear in the text (RE2
patterns, line-by-line scans).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import date

from intake import patterns
from intake.understand import credit_words
from intake.understand import disclosure_words

# Where quoted history starts in a reply: "On Mon, … wrote:", Outlook's separator and header block.
# Both patterns see mail text: RE2 (intake.patterns).
_QUOTE_START = patterns.compile(
    r"^(on .{0,200}wrote:\s*$|-{2,}\s*original message\s*-{2,}|_{10,}\s*$|from:\s.+$|am .{0,200}schrieb .{0,80}:\s*$)",
    ignorecase=True)
# What each alternative of _QUOTE_START begins with, lowercased: other lines skip the regex.
_QUOTE_START_PREFIXES = ("on ", "--", "__________", "from:", "am ")
_SIGNATURE = "-- "
# Command lines carried out per mail; more are refused, in one line of the confirmation.
MAX_COMMANDS = 20
_COMMAND = patterns.compile(r"^#([a-z-]+)\b\s*(.*)$", ignorecase=True)
# The command that keeps a maintainer's text internal (a note) instead of relaying it.
NOTE_COMMAND = "note"


@dataclass(frozen=True)
class TextWork:
    """What acting on a message needs from its text. The default is what a message whose text
    was not read (the processing budget ran out first) gets: nothing recognised, nothing relayed."""

    report_credit: credit_words.Credit | None = None  # the credit the mail states, read as a report
    reply_credit: credit_words.Credit | None = None  # as a reporter's reply: in its own words, above the quote
    # A maintainer's #command lines at the top, (name, args): the first MAX_COMMANDS, and how many more.
    commands: tuple[tuple[str, str], ...] = ()
    more_commands: int = 0
    internal: bool = False  # a #note line among them: the text stays an internal note
    relayed_text: str = ""  # the rest, quoted thread and signature trimmed: what a maintainer's reply relays
    # The disclosure date the mail proposes (``#disclose DATE`` or plain words; a reporter's counts).
    disclosure_date: date | None = None


# What a line that ends the text or is a quote starts with, stripped (the signature and a quote
# included): no other character lowercases to one of these. Other lines are kept as they are.
_NOTABLE_STARTS = frozenset("oOfFaA-_>")


def trim_reply(text: str) -> str:
    """*text* without the quoted thread (``>`` lines, "On … wrote:" and below) and the signature."""
    kept = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped[:1] not in _NOTABLE_STARTS:  # most lines: cheaper than the checks below
            kept.append(line.rstrip())
            continue
        if line.rstrip() == _SIGNATURE.rstrip() and line.startswith("--"):
            break
        if stripped.lower().startswith(_QUOTE_START_PREFIXES) and _QUOTE_START.match(stripped):
            break
        if line.lstrip().startswith(">"):
            continue
        kept.append(line.rstrip())
    return "\n".join(kept).strip("\n")


def split_commands(text: str) -> tuple[list[tuple[str, str]], str]:
    """The ``#command args`` lines at the top of *text* (blank lines between them allowed) and the rest.
    Past ``MAX_COMMANDS`` commands (none of which will be carried out) any ``#`` line is one more,
    named by its first word: no regex per line of a flood."""
    lines = text.splitlines()
    commands = []
    position = 0
    while position < len(lines):
        line = lines[position].strip()
        if len(commands) > MAX_COMMANDS and line.startswith("#"):
            commands.append((line[1:].split(maxsplit=1)[0].lower() if line[1:].strip() else "", ""))
        elif line and not (match := _COMMAND.match(line)):
            break
        elif line:
            commands.append((match.group(1).lower(), match.group(2).strip()))
        position += 1
    return commands, "\n".join(lines[position:])


def read(body: str) -> TextWork:
    """The text work on a message's *body* text (``ParsedMail.body_text``)."""
    commands, rest = split_commands(body)
    most = MAX_COMMANDS
    own_words = credit_words.own_words(body)
    report_credit = credit_words.recognise(body)
    if own_words == body:  # nothing quoted: the same words, read once
        reply_credit = replace(report_credit, source="reply") if report_credit else None
    else:
        reply_credit = credit_words.recognise(own_words, source="reply")
    return TextWork(report_credit=report_credit, reply_credit=reply_credit,
                    commands=tuple(commands[:most]), more_commands=max(0, len(commands) - most),
                    internal=any(name == NOTE_COMMAND for name, _ in commands),
                    relayed_text=trim_reply(rest), disclosure_date=disclosure_words.proposed_date(body))
