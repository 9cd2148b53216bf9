"""The text work on a message, done in the prepare stage so that none of it runs under the write lock.

Acting on a message reads things out of its body text: the credit a report or a reporter's reply
states (:mod:`intake.tickets.credit`), a maintainer's ``#command`` lines and the text relayed to the
reporter with the quoted thread and signature trimmed (:mod:`intake.tickets.maintainer_mail`). A reply of
60,000 blank lines once made that work take 39 s inside the write transaction, and every other
sender got ``451`` meanwhile (issue 12). So it is all done here, for every message, before any
lock is taken: in the parse helper after parsing and scoring, within ``processing.message_budget``
(see :mod:`intake.understand.parse_guard`); the result travels on ``processor.Prepared`` and the act stage
only copies it. Which of its parts a message needs is known only after routing, so all are done:
each is linear in the text (RE2 patterns, line-by-line scans).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from intake.tickets import credit, maintainer_mail


@dataclass(frozen=True)
class TextWork:
    """What acting on a message needs from its text. The default is what a message whose text
    was not read (the processing budget ran out first) gets: nothing recognised, nothing relayed."""

    report_credit: credit.Credit | None = None  # the credit the mail states, read as a report
    reply_credit: credit.Credit | None = None  # as a reporter's reply: in its own words, above the quote
    # A maintainer's #command lines at the top, (name, args): the first MAX_COMMANDS, and how many more.
    commands: tuple[tuple[str, str], ...] = ()
    more_commands: int = 0
    internal: bool = False  # a #note line among them: the text stays an internal note
    relayed_text: str = ""  # the rest, quoted thread and signature trimmed: what a maintainer's reply relays


def read(body: str) -> TextWork:
    """The text work on a message's *body* text (``ParsedMail.body_text``)."""
    commands, rest = maintainer_mail.split_commands(body)
    most = maintainer_mail.MAX_COMMANDS
    own_words = credit.own_words(body)
    report_credit = credit.recognise(body)
    if own_words == body:  # nothing quoted: the same words, read once
        reply_credit = replace(report_credit, source="reply") if report_credit else None
    else:
        reply_credit = credit.recognise(own_words, source="reply")
    return TextWork(report_credit=report_credit, reply_credit=reply_credit,
                    commands=tuple(commands[:most]), more_commands=max(0, len(commands) - most),
                    internal=any(name == "note" for name, _ in commands),
                    relayed_text=maintainer_mail.trim_reply(rest))
