"""The ``#commands`` maintainers write at the top of their mail, each declared once in
:data:`COMMANDS`: its name, its arguments, one line of help and what it does. The help a maintainer
gets (for ``#help``, or with an unknown command) and the command list in forwarded mail
(:func:`footer`) are generated from that table, and README's list is checked against it.

A command runs the same service function as the CLI command for the same job, with the maintainer
as actor, in the caller's transaction, each in a savepoint: a refused one leaves nothing half
done. To add a command, write its function and add its entry to :data:`COMMANDS`.
"""

from __future__ import annotations

import shlex
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, datetime

from sqlmodel import Session

from intake.config.settings import Settings
from intake.store.models import Ticket
from intake.tickets import credit, disclosure, milestones, triage, updates
from intake.understand import credit_words
from intake.understand.text_work import NOTE_COMMAND
from intake.vocabulary import CLOSE_REASONS, SEVERITIES, Milestone, TicketState

HELP_COMMAND = "help"
# What `#state` takes to stop waiting on the reporter.
_RESUME_WORDS = ("resume", "resumed", "open")
# What `#disclose-date DATE` takes to agree a date past the policy's limit (the CLI's --force).
_FORCE_WORD = "force"


class CommandError(ValueError):
    """The command is not carried out; the message says why."""


class _Usage(CommandError):
    """The command's arguments are not what it takes: answered with its usage."""


@dataclass(frozen=True)
class Request:
    """Where a command runs: the ticket, and who asks."""

    session: Session
    settings: Settings
    ticket: Ticket
    now: datetime
    actor: str


@dataclass(frozen=True)
class Command:
    name: str
    usage: str  # its arguments as help shows them; "" for none
    help: str  # one line: what it does
    # Carries it out with the argument words; returns what was done. None: the mail handler
    # reads it itself (#note, #help).
    run: Callable[[Request, list[str]], str] | None
    arguments: tuple[int, int | None] = (0, None)  # how many words it takes: at least, at most (None: any)
    aliases: tuple[str, ...] = ()

    @property
    def synopsis(self) -> str:
        return f"#{self.name} {self.usage}".rstrip()


def _severity(request: Request, words: list[str]) -> str:
    ticket = request.ticket
    _, warning = triage.set_severity(request.session, request.settings, ticket, words[0].lower(), now=request.now,
                                     actor=request.actor, cvss_vector=words[1] if len(words) > 1 else None)
    return (f"severity {ticket.severity}" + (f" (CVSS {ticket.cvss_score})" if len(words) > 1 else "")
            + (f"; warning: {warning}" if warning else ""))


def _assign(request: Request, words: list[str]) -> str:
    assignee = triage.assign(request.session, request.settings, request.ticket, words[0], now=request.now,
                             actor=request.actor)
    return f"assigned to {assignee}"


def _state(request: Request, words: list[str]) -> str:
    wanted = words[0].lower()
    if wanted == TicketState.WAITING:
        milestones.wait(request.session, request.settings, request.ticket, now=request.now, actor=request.actor)
    elif wanted in _RESUME_WORDS:
        milestones.resume(request.session, request.settings, request.ticket, now=request.now, actor=request.actor)
    else:
        raise _Usage()
    return f"state {request.ticket.state}"


def _record(milestone: str) -> Callable[[Request, list[str]], str]:
    def record(request: Request, words: list[str]) -> str:
        milestones.record(request.session, request.settings, request.ticket, milestone, at=request.now,
                          now=request.now, actor=request.actor)
        return milestone
    return record


def _released(request: Request, words: list[str]) -> str:
    version = words[0] if words else None
    updates.released(request.session, request.settings, request.ticket, at=request.now, now=request.now,
                     actor=request.actor, version=version)
    return Milestone.RELEASED + (f" {version}" if version else "")


def _disclosed(request: Request, words: list[str]) -> str:
    advisory = words[0] if words else None
    updates.disclosed(request.session, request.settings, request.ticket, at=request.now, now=request.now,
                      actor=request.actor, advisory=advisory)
    return Milestone.DISCLOSED + (f" {advisory}" if advisory else "")


def _disclose_date(request: Request, words: list[str]) -> str:
    if len(words) > 1 and words[1].lower() != _FORCE_WORD:
        raise _Usage()
    try:
        when = date.fromisoformat(words[0])
    except ValueError:
        raise CommandError(f"{words[0]!r} is not a date (YYYY-MM-DD)") from None
    disclosure.agree(request.session, request.settings, request.ticket, when, now=request.now, actor=request.actor,
                     force=len(words) > 1)
    return f"disclosure date {when.isoformat()}"


def _assess(request: Request, words: list[str]) -> str:
    updates.assess(request.session, request.settings, request.ticket, words[0].lower(), at=request.now,
                   now=request.now, actor=request.actor)
    return f"assessed, severity {request.ticket.severity}"


def _close(request: Request, words: list[str]) -> str:
    updates.close(request.session, request.settings, request.ticket, words[0].lower(), now=request.now,
                  actor=request.actor)
    return f"closed ({request.ticket.close_reason})"


def _credit(request: Request, words: list[str]) -> str:
    if [word.lower() for word in words] == ["anonymous"]:
        wanted = credit_words.make(anonymous=True, source="mail")
    else:
        handle = next((word for word in words if word.startswith("@")), None)
        url = next((word for word in words if word.startswith(("https://", "http://"))), None)
        name = " ".join(word for word in words if word not in (handle, url)) or None
        try:
            wanted = credit_words.make(name=name, handle=handle, url=url, source="mail")
        except credit_words.CreditError as exc:
            raise CommandError(str(exc)) from None
    credit.set_credit(request.session, request.ticket, wanted, request.now, request.actor)
    return f"credit: {wanted.display}"


def _label(request: Request, words: list[str]) -> str:
    return "labels " + ", ".join(triage.label(request.session, request.ticket, tuple(words), (), now=request.now,
                                              actor=request.actor))


COMMANDS = (
    Command("severity", f"{'|'.join(SEVERITIES)} [CVSS-vector]", "set the severity (and the CVSS score)",
            _severity, (1, 2)),
    Command("assign", "<maintainer>", "assign the ticket to a maintainer (address, name or login)", _assign, (1, 1)),
    Command("state", f"{TicketState.WAITING}|{_RESUME_WORDS[0]}", "wait on the reporter (clocks stop where the policy says), "
            "or stop waiting", _state, (1, 1)),
    Command(Milestone.RELEASED, "[version]", "record that a fixed release is out", _released),
    Command("ack", "", "record that a person acknowledged the report", _record(Milestone.ACKNOWLEDGED),
            aliases=(Milestone.ACKNOWLEDGED,)),
    Command("assess", "<severity>", "record the assessment, with its severity", _assess, (1, 1)),
    Command(Milestone.DISCLOSED, "[advisory id or URL]", "record that the issue was disclosed", _disclosed),
    Command("disclose-date", f"<YYYY-MM-DD> [{_FORCE_WORD}]", "agree the disclosure date with the reporter (theirs "
            f"or another); '{_FORCE_WORD}' for one past the policy's limit", _disclose_date, (1, 2)),
    Command(Milestone.RESOLVED, "", "record that the ticket is resolved", _record(Milestone.RESOLVED)),
    Command("close", "|".join(CLOSE_REASONS), "close the ticket with that reason", _close, (1, 1)),
    Command("label", "<label> …", "add labels", _label, (1, None)),
    Command("credit", "<name> [@handle] [https://url] | #credit anonymous", "how the reporter wants to be credited",
            _credit, (1, None)),
    Command(NOTE_COMMAND, "", "keep this mail's text internal: a note on the ticket, not sent to the reporter", None),
    Command(HELP_COMMAND, "", "answer with this list of commands", None),
)
_BY_NAME = {name: command for command in COMMANDS for name in (command.name, *command.aliases)}


def help_text() -> str:
    """The list of commands, as the reply to ``#help`` or an unknown command shows it: each
    command's synopsis, and under it what it does."""
    lines = ["Commands (lines at the top of your mail, before your text):", ""]
    for command in COMMANDS:
        also = f" (also {', '.join(f'#{alias}' for alias in command.aliases)})" if command.aliases else ""
        lines += [command.synopsis, f"    {command.help}{also}"]
    return "\n".join(lines) + "\n"


def names() -> str:
    """Every command's name, as in ``#severity #assign …``."""
    return " ".join(f"#{command.name}" for command in COMMANDS)


def footer() -> list[str]:
    """The lines about commands in mail a maintainer can answer (a forwarded reply)."""
    return [f"Command lines at the top of your reply change the ticket; #{NOTE_COMMAND} keeps your text",
            f"internal and #{HELP_COMMAND} answers with what each takes:",
            *textwrap.wrap(names(), 72, break_on_hyphens=False)]  # "#disclose-date" whole


@dataclass
class Outcome:
    """What a mail's commands did."""

    done: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    show_help: bool = False  # #help, or an unknown command: the reply lists the commands


def carry_out(request: Request, commands: tuple[tuple[str, str], ...] | list[tuple[str, str]]) -> Outcome:
    """Carry out *commands* ((name, argument text) pairs, in order) on the request's ticket."""
    outcome = Outcome()
    for name, args in commands:
        command = _BY_NAME.get(name)
        line = f"#{name} {args}".strip()
        if command is None:
            outcome.refused.append(f"{line}: unknown command #{name} (known: {names()})")
            outcome.show_help = True
        elif command.run is None:
            outcome.show_help |= command.name == HELP_COMMAND
        else:
            try:
                words = _words(args)
                with request.session.begin_nested():  # a refused command leaves nothing half done
                    outcome.done.append(_run(command, request, words))
            except (CommandError, milestones.Refused) as exc:
                outcome.refused.append(f"{line}: {exc}")
    return outcome


def _words(args: str) -> list[str]:
    try:
        return shlex.split(args)
    except ValueError as exc:  # an unclosed quote
        raise CommandError(f"cannot read the arguments: {exc}") from None


def _run(command: Command, request: Request, words: list[str]) -> str:
    assert command.run is not None
    least, most = command.arguments
    try:
        if len(words) < least or (most is not None and len(words) > most):
            raise _Usage()
        return command.run(request, words)
    except _Usage:
        raise CommandError(f"usage: {command.synopsis}") from None
