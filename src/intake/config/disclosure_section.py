"""The ``[disclosure]`` section: how late a coordinated disclosure date may be agreed.

A maintainer's ``intake disclose-date`` (or ``#disclose-date``) past this limit is refused unless
forced (see :mod:`intake.tickets.disclosure`); apart from :mod:`intake.config.sections` to keep
each module small.
"""

from __future__ import annotations

from datetime import timedelta

from pydantic import Field

from intake.config.sections import ElapsedText, Section
from intake.sla.calendars import parse_duration


class DisclosureSection(Section):
    # The latest disclosure date agreed without --force, counted from the report's receipt; where
    # the ticket's policy has a disclose stage with a due date, that date is the limit instead.
    max_embargo: ElapsedText = "90 days"
    # Per policy (its key): a limit of its own instead of max_embargo.
    max_embargo_by_policy: dict[str, ElapsedText] = Field(default_factory=dict)

    def embargo(self, policy: str) -> timedelta:
        """How long after receipt a ticket under *policy* may be disclosed at the latest."""
        return parse_duration(self.max_embargo_by_policy.get(policy, self.max_embargo)).elapsed
