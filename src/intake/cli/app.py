"""The root of the operator CLI: ``intake [--config FILE] [--version] COMMAND``.

Commands live in the modules of this package by topic and are listed in :data:`COMMANDS` by name,
with the short help ``intake --help`` shows; a command's module is imported only when it runs (or
its own ``--help`` is asked for), so ``intake --help`` and ``intake --version`` start without
importing the service. Adding a command: write it in its topic's module, add its line here.

Exit status: 0 success, 1 the thing asked for failed or was not found, 2 usage error,
78 configuration error (EX_CONFIG).
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import NamedTuple

import click

from intake.cli.common import Context
from intake.display import echo
from intake.vocabulary import MILESTONE_SPECS


class Registered(NamedTuple):
    target: str  # "module:attribute" of the click command
    short_help: str  # the first paragraph of its help, shown by `intake --help`


_M = "intake.cli."
COMMANDS = {
    "tickets": Registered(_M + "tickets:list_tickets", "List tickets, by next deadline unless --sort received."),
    "show": Registered(_M + "tickets:show", "Show a ticket: its fields, deadlines, thread and events."),
    "attachment": Registered(_M + "tickets:attachment",
                             "Write attachment NUMBER of ticket REFERENCE (as numbered by `intake show`) to a file."),
    "assign": Registered(_M + "triage:assign",
                         "Assign the ticket to a maintainer (email, name or login from [[maintainers]])."),
    "language": Registered(_M + "triage:language",
                           "Write the ticket's later mail to its reporter in language TAG (one of [intake] languages)."),
    "severity": Registered(_M + "triage:severity",
                           "Set the ticket's severity (and CVSS vector); severity-dependent deadlines follow."),
    "label": Registered(_M + "triage:label", "Add labels to the ticket (and take some off with --remove)."),
    "merge": Registered(_M + "triage:merge",
                        "Merge duplicate REFERENCE into INTO_REFERENCE; the duplicate's reporter is told."),
    "close": Registered(_M + "triage:close", "Close the ticket (it counts as resolved)."),
    "reopen": Registered(_M + "triage:reopen", "Reopen a closed or resolved ticket."),
    # ack, assess, released, resolve, disclose: as MILESTONE_SPECS declares them
    **{spec.verb: Registered(_M + f"triage:{spec.verb}", spec.summary) for spec in MILESTONE_SPECS},
    "disclose-date": Registered(_M + "triage:disclose_date",
                                "Agree the disclosure date (YYYY-MM-DD) of REFERENCE: accept the reporter's proposal "
                                "or counter it."),
    "wait": Registered(_M + "triage:wait",
                       "The ticket waits on the reporter (clocks stop where the policy says so)."),
    "resume": Registered(_M + "triage:resume", "The ticket no longer waits on the reporter."),
    "reply": Registered(_M + "mail:reply",
                        "Reply to the reporter from the intake address (counts as the human acknowledgement)."),
    "note": Registered(_M + "mail:note", "Add an internal note to the ticket; it is never sent."),
    "outbox": Registered(_M + "mail:outbox_command", "Mail queued, sent and dead, newest first."),
    "messages": Registered(_M + "messages:messages_group",
                           "Stored messages that made no ticket of their own, newest first (see `show`, `purge` "
                           "and `intake promote`)."),
    "purge": Registered(_M + "retention:purge",
                        "Erase content past its [retention] period: closed tickets' reports, threads and mail; held "
                        "messages; bodies of sent mail."),
    "promote": Registered(_M + "messages:promote",
                          "Make a ticket of held message ID, as if it had come in as a new report."),
    "fetch": Registered(_M + "fetch:fetch_command",
                        "Store the mail waiting in the [[fetch]] IMAP mailboxes, then mark it seen, move or delete it "
                        "there (as each source's `after` says)."),
    "reprocess": Registered(_M + "mail:reprocess", "Run failed (or ignored) stored messages through processing again."),
    "import": Registered(_M + "importing:import_command",
                         "Import an mbox file or Maildir folder as history: stored, processed, nothing sent."),
    "sweep": Registered(_M + "mail:sweep",
                        "Run one SLA sweep: reminders, breach notices, escalations and keep-in-loop mail due at --now, "
                        "each sent once."),
    "digest": Registered(_M + "mail:digest_command",
                         "Preview or send digest NAME (a [scheduler.digests.NAME] schedule) as of --now."),
    "reminders": Registered(_M + "mail:reminders_command",
                            "What was sent for ticket REFERENCE, to maintainers and to the reporter, "
                            "and what comes next."),
    "serve": Registered(_M + "serving:serve", "Run the SMTP listener, processor and outbox until SIGTERM."),
    "init": Registered(_M + "setup:init",
                       "Write a production config.toml (mode 0640, group intake) from these flags, asking on a "
                       "terminal for what is missing; placeholder domains (example.com, *.test, ...) are refused."),
    "check-config": Registered(_M + "admin:check_config",
                               "Validate the configuration: exit 0, or 78 naming the bad key."),
    "db": Registered(_M + "admin:db_group",
                     "The database schema: upgrade (migrate), check against the models, current, history."),
    "backup": Registered(_M + "admin:backup_command", "Back up the database to PATH, consistently, while intake runs."),
    "restore": Registered(_M + "admin:restore_command",
                          "Replace the SQLite database's contents with BACKUP (made by `intake backup`)."),
    "storage": Registered(_M + "storage:storage_group",
                          "Encryption at rest: keygen, status, rotate, encrypt-existing."),
    "audit": Registered(_M + "audit:audit_group",
                        "The tamper-evident audit chain of events and maintainers' reads: verify, log, anchor, rekey."),
    "secret": Registered(_M + "admin:secret_group", "The secret that signs maintainers' reply addresses."),
    "sla": Registered(_M + "admin:sla", "SLA deadlines: explain a policy, recompute the stored deadlines."),
    "credit": Registered(_M + "reports:credit_command", "Show or set how the reporter of REFERENCE is credited."),
    "credits": Registered(_M + "reports:credits_command",
                          "Whom to thank in release notes: the credited reporters of tickets that went out."),
    "advisory": Registered(_M + "reports:advisory_command",
                           "Write an OSV advisory draft for REFERENCE; replace every \"TODO\" before publishing."),
    "stats": Registered(_M + "reports:stats_command",
                        "Per stage: median and 90th-percentile time to meet it, share met on time, open breaches; "
                        "tickets by state and severity, messages by decision, held mail and purged."),
    "key": Registered(_M + "keys:key_command",
                      "Show the reporter's OpenPGP key of ticket TARGET, or keep the one in FILE for them; `intake "
                      "key export` prints the organisation's public key (armored)."),
    "security-txt": Registered(_M + "reports:security_txt_command",
                               "Print /.well-known/security.txt (RFC 9116, LF line endings) from the configuration."),
}


class LazyGroup(click.Group):
    """A group whose commands are imported from :data:`COMMANDS` when first looked up."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        registered = COMMANDS.get(cmd_name)
        if registered is None:
            return None
        module_name, attribute = registered.target.split(":")
        command: click.Command = getattr(importlib.import_module(module_name), attribute)
        return command

    def invoke(self, ctx: click.Context) -> object:
        from intake.config.settings import EXIT_CONFIG, ConfigError

        try:
            return super().invoke(ctx)
        except ConfigError as exc:  # met after loading, e.g. a secret only the service can read
            echo(f"intake: {exc}", err=True)
            sys.exit(EXIT_CONFIG)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """The command list from :data:`COMMANDS`, as click would write it, importing no command."""
        limit = formatter.width - 6 - max(len(name) for name in COMMANDS)
        # Shortened to the width as click shortens a command's own help.
        rows = [(name, click.Command(name, help=COMMANDS[name].short_help).get_short_help_str(limit))
                for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup)
@click.option("--config", "config_path", type=click.Path(path_type=Path), default=None,
              help="Config file (default: $INTAKE_CONFIG, else /etc/intake/config.toml if it exists, else ./config.toml).")
@click.version_option(package_name="intake", message="intake %(version)s",
                      help="Print intake's version and exit.")
@click.pass_context
def main(ctx: click.Context, config_path: Path | None) -> None:
    """intake: the security@ mailbox as tracked tickets."""
    ctx.obj = Context(config_path)
