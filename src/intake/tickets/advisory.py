"""Advisory drafts in the OSV format (https://ossf.github.io/osv-schema/), for the maintainer to finish.

What the ticket knows goes in: the subject as ``summary``, a ``details`` skeleton, the CVSS
vector as ``severity``, the reporter's credit (``FINDER``; none when anonymous or not known),
``published`` (disclosed, else released) and ``modified`` (the later of the two; the time the
draft was made when neither happened), and the reference under ``database_specific``. What it
cannot know is left as the placeholder ``TODO``: the ``affected`` package, its ecosystem and the
version that introduced the flaw (the fixed version is filled when ``intake released --version``
recorded one). Replace every ``TODO`` before publishing.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from intake.sla import deadlines
from intake.tickets import credit
from intake.tickets.reads import TicketDetail
from intake.understand import credit_words
from intake.vocabulary import EventKind, Milestone

PLACEHOLDER = "TODO"
SCHEMA_VERSION = "1.6.0"


def _osv_time(instant: datetime) -> str:
    """RFC 3339 in UTC with a Z, as OSV wants its timestamps."""
    return instant.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def severity_entry(vector: str) -> dict[str, str]:
    """The OSV severity of a CVSS *vector*: its type follows the vector's version."""
    if vector.startswith("CVSS:4."):
        kind = "CVSS_V4"
    elif vector.startswith("CVSS:3."):
        kind = "CVSS_V3"
    else:
        kind = "CVSS_V2"  # v2 vectors carry no version prefix
    return {"type": kind, "score": vector}


def credits_entry(preference: credit_words.Credit | None) -> list[dict[str, Any]]:
    """OSV ``credits``: the reporter as FINDER, with their URL as contact; nobody when anonymous."""
    if preference is None or preference.anonymous:
        return []
    entry: dict[str, Any] = {"name": preference.display, "type": "FINDER"}
    if preference.url:
        entry["contact"] = [preference.url]
    return [entry]


def osv(detail: TicketDetail, id_prefix: str, organisation: str, now: datetime) -> dict[str, Any]:
    """The OSV draft of the ticket in *detail*, made at *now*."""
    ticket = detail.ticket
    reached = deadlines.sla_inputs(ticket, detail.events).milestones
    version = next((e.detail.get("version") for e in reversed(detail.events)
                    if e.kind == EventKind.MILESTONE and e.detail.get("milestone") == Milestone.RELEASED), None)
    public = [reached[m] for m in (Milestone.DISCLOSED, Milestone.RELEASED) if m in reached]
    draft: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "id": f"{id_prefix}{ticket.reference}",
        "modified": _osv_time(max(public) if public else now),
    }
    if public:
        draft["published"] = _osv_time(public[0])  # disclosed if it was, else released
    draft["summary"] = ticket.subject
    draft["details"] = "\n\n".join(filter(None, [
        f"{PLACEHOLDER}: describe the vulnerability, its impact and how to remediate it.",
        f"Fixed in {version}." if version else None,
        f"Reported to {organisation} as {ticket.reference}.",
    ]))
    vector = ticket.cvss_vector
    if vector:
        draft["severity"] = [severity_entry(vector)]
    draft["affected"] = [{
        "package": {"ecosystem": PLACEHOLDER, "name": PLACEHOLDER},
        "ranges": [{"type": "ECOSYSTEM", "events": [{"introduced": PLACEHOLDER}, {"fixed": version or PLACEHOLDER}]}],
    }]
    found = credits_entry(credit.credit_of(ticket))
    if found:
        draft["credits"] = found
    draft["database_specific"] = {"intake_reference": ticket.reference, "severity": ticket.severity,
                                  "state": ticket.state}
    return draft
