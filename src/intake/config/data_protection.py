"""The data-protection sections of the configuration: ``[storage]`` (encryption at rest),
``[retention]`` (how long content is kept) and ``[audit]`` (the audit chain's key); apart from
:mod:`intake.config.sections` to keep each module small."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, Field

from intake.config.sections import Section, check_elapsed
from intake.sla.calendars import parse_duration


class StorageSection(Section):
    # The storage key (made by `intake storage keygen PATH`): when set, report content is stored
    # encrypted (intake.store.sealing). Unset: the systemd credential 'storage-key' if there is one.
    key_file: Path | None = None
    # Older storage keys still readable: data keys wrapped by them open until `intake storage
    # rotate` has re-wrapped them under key_file; then remove them here and destroy the files.
    previous_key_files: list[Path] = Field(default_factory=list)


def _check_retention(value: str | None) -> str | None:
    """A retention period: an elapsed time ("365 days"), or "never" (None): kept forever."""
    if value is None or value.strip().lower() == "never":
        return None
    return check_elapsed(value)


RetentionText = Annotated[str | None, AfterValidator(_check_retention)]


class RetentionSection(Section):
    """``[retention]``: how long content is kept before ``intake purge`` (and the scheduler, daily)
    erases it (see :mod:`intake.tickets.retention`). Unset or "never": kept forever, so an upgrade
    never starts deleting what its operator did not ask to delete; the shipped config.toml sets
    the recommended periods."""

    # After a ticket is closed or resolved (measured from its last change): its report, thread,
    # stored messages and mail are erased; its reference, dates, states, deadlines, credit and
    # events stay.
    after_close: RetentionText = None
    # Held messages (no ticket of their own), from when they were received and processed: deleted.
    held: RetentionText = None
    # Bodies of outgoing mail once sent (or given up on), from then: erased; the row stays.
    sent_mail: RetentionText = None
    # A ticket with this label is never purged, nor its mail (a legal hold).
    legal_hold_label: str = Field(default="legal-hold", pattern=r"^[a-z0-9][a-z0-9._-]{0,39}$")

    def period(self, name: Literal["after_close", "held", "sent_mail"]) -> timedelta | None:
        """The retention period of *name*, or None: kept forever."""
        value = getattr(self, name)
        return None if value is None else parse_duration(value).elapsed


class AuditSection(Section):
    """``[audit]``: the key of the tamper-evident audit chain (:mod:`intake.store.audit`)."""

    # A file holding the key (32+ characters); the audit-key credential, if given, comes first.
    # Unset and no credential: a key intake keeps in the database (check-config warns).
    key_file: Path | None = None
