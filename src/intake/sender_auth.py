"""Who a message is really from: a verdict on its From: domain, made before any lock is taken.

An Authentication-Results header (RFC 8601) is believed only from an authserv-id the operator
lists in ``[sender_auth] trusted_authserv_ids`` (our own MX), and only the topmost one; without
one, and with ``verify = true``, intake checks DKIM signatures itself (dkimpy) and looks up the
From: domain's DMARC record, with bounded DNS lookups.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Protocol

PASS = "pass"
FAIL = "fail"
NONE = "none"


class Resolver(Protocol):
    """The DNS lookups sender authentication needs (dnspython in service, a stub in tests)."""

    def txt(self, name: str) -> list[bytes]:
        """The TXT strings of *name*, each record's strings joined; [] when it has none.
        Raises ``TimeoutError`` (or ``OSError``) when the lookup could not be answered."""
        ...


@dataclass(frozen=True)
class Verdict:
    """Whether a message's From: domain is authenticated, and why."""

    result: str  # PASS: DMARC pass, or a valid DKIM signature aligned with the From: domain;
    # FAIL: evidence against (dmarc=fail, a broken or unaligned signature, ...); NONE: no evidence.
    reason: str  # one line for people, e.g. "dmarc=pass header.from=example.org (by mx.example.com)"
    from_domain: str = ""
    # Whether the From: domain publishes a DMARC record; None when that could not be learnt.
    dmarc_published: bool | None = None
    method: str = NONE  # "authentication-results" | "dkim" | "none"

    @property
    def authenticated(self) -> bool:
        return self.result == PASS

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
