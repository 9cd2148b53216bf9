"""The ``[scheduler]`` section and its ``[scheduler.digests.<name>]`` schedules: when the SLA sweep
runs, who gets notices and escalations, and each digest's cron line, recipients and limits."""

from __future__ import annotations

import re  # config text only
from typing import Annotated
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from apscheduler.triggers.cron import CronTrigger
from pydantic import AfterValidator, Field, field_validator, model_validator

from intake.config.sections import ElapsedText, Mailbox, Section


def _check_zone(name: str) -> str:
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown IANA time zone {name!r} (e.g. 'Australia/Brisbane')") from None
    return name


class DigestSchedule(Section):
    # When it is sent: a crontab line "minute hour day month weekday", e.g. "0 8 * * mon-fri".
    cron: str
    # IANA time zone the cron line is read in, e.g. "Australia/Brisbane".
    timezone: Annotated[str, AfterValidator(_check_zone)] = "UTC"
    # Who gets it; empty: every [[maintainers]] address.
    recipients: list[Mailbox] = Field(default_factory=list)
    # The "due soon" section lists unmet stages due within this (elapsed) time.
    due_within: ElapsedText = "48 hours"
    # The "disclosure dates" section lists disclosure deadlines within this.
    disclosures_within: ElapsedText = "14 days"
    # Send it even when it has nothing to list (otherwise an empty digest is skipped).
    send_empty: bool = False
    # The most tickets a section names; the rest are counted ("... and 120 more").
    list_limit: int = Field(default=50, ge=1, le=1000)

    @model_validator(mode="after")
    def _cron_parses(self) -> DigestSchedule:
        self.trigger()
        return self

    def trigger(self) -> CronTrigger:
        """The APScheduler trigger of this schedule, in its time zone."""
        try:
            return CronTrigger.from_crontab(self.cron, timezone=ZoneInfo(self.timezone))
        except ValueError as exc:
            raise ValueError(f"cron {self.cron!r} is not a crontab line 'minute hour day month weekday': {exc}")\
                from None


class SchedulerSection(Section):
    # Run the scheduler (sweep and digests) inside `intake serve`.
    enabled: bool = True
    # Seconds between SLA sweeps (reminders, breach notices, escalations).
    sweep_interval: float = Field(default=60.0, ge=1)
    # Seconds a scheduled run may start late and still run (a digest due while intake was
    # stopped longer than this is skipped, never sent in a burst); a notice that fell due longer
    # ago than this is sent as a catch-up stating where the ticket stands.
    misfire_grace: float = Field(default=300.0, ge=1)
    # Hold reminders that are not breaches to the stage calendar's working hours.
    quiet_hours: bool = True
    # A breached stage's notice is repeated this often until it is met.
    breach_repeat: ElapsedText = "1 day"
    # A stage still unmet this long after its due instant is escalated to escalate_to (once).
    escalation_delay: ElapsedText = "1 day"
    # Who gets escalations; empty: nobody (no escalation).
    escalate_to: list[Mailbox] = Field(default_factory=list)
    # Who gets new-ticket notices, reminders and breach notices; empty: every [[maintainers]] address.
    recipients: list[Mailbox] = Field(default_factory=list)
    # Tell the recipients about each new ticket (its text, sender, decision and SLA dates).
    new_ticket_notice: bool = True
    # The new-ticket notice quotes the report's text; false: it names the ticket and its dates only.
    notices_include_report: bool = True
    # Digests by name, each with its own schedule and recipients.
    digests: dict[str, DigestSchedule] = Field(default_factory=dict)

    @field_validator("digests")
    @classmethod
    def _digest_names(cls, value: dict[str, DigestSchedule]) -> dict[str, DigestSchedule]:
        for name in value:
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
                raise ValueError(f"digest name {name!r}: letters, digits, '_', '-', '.'")
        return value
