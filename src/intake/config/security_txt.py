"""``/.well-known/security.txt`` (RFC 9116) built from the configuration.

The ``[security_txt]`` section is checked when the configuration loads (web URIs are https,
``expires`` is an RFC 3339 instant with an offset); :func:`render` writes the file and
:func:`expiry_warning` is what ``intake check-config`` says when the file is about to go stale.

The file has one ``Field: value`` per line, lines ending in LF (RFC 9116 §4 allows CRLF or LF),
in this order: Contact (the intake addresses as ``mailto:``, then ``extra_contacts``), Expires
(exactly once), Encryption, Policy, Acknowledgments, Preferred-Languages (once, comma-separated),
Canonical, Hiring. No PGP signature: sign the output yourself if you publish a signed file.
"""

from __future__ import annotations

import math
import re  # config text only; senders' text goes through intake.patterns (RE2)
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from intake.config.settings import Settings

# check-config warns when the file expires within this, or has expired.
EXPIRY_WARNING = timedelta(days=30)
# RFC 9116 §2.5.5: Expires SHOULD be less than a year ahead.
EXPIRY_LONGEST = timedelta(days=366)

_RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(?:\.\d+)?(?:[Zz]|[+-]\d{2}:\d{2})")
_LANGUAGE_TAG = re.compile(r"[A-Za-z]{1,8}(?:-[A-Za-z0-9]{1,8})*")


def _uri(*schemes: str):  # type: ignore[no-untyped-def]
    """A validator: a URI of one of *schemes*, without whitespace (one field, one line)."""

    def check(value: str) -> str:
        if not re.fullmatch(r"\S+", value) or not value.lower().startswith(tuple(f"{s}:" for s in schemes)):
            raise ValueError(f"{value!r} must be a {' or '.join(f'{s}:' for s in schemes)} URI without spaces")
        if value.lower().startswith("https:") and not re.match(r"https://[^/\s]+", value, re.IGNORECASE):
            raise ValueError(f"{value!r} is not an https:// URL")
        return value

    return AfterValidator(check)


def _rfc3339(value: str) -> str:
    if not _RFC3339.fullmatch(value):
        raise ValueError(f"{value!r} is not an RFC 3339 date and time with an offset, e.g. 2027-01-31T00:00:00Z")
    try:
        parse_instant(value)
    except ValueError as exc:
        raise ValueError(f"{value!r}: {exc}") from None
    return value


def _language(value: str) -> str:
    if not _LANGUAGE_TAG.fullmatch(value):
        raise ValueError(f"{value!r} is not a language tag (e.g. en, de, pt-BR)")
    return value


HttpsUrl = Annotated[str, _uri("https")]


class SecurityTxtSection(BaseModel):
    """``[security_txt]``: what ``intake security-txt`` publishes besides the intake addresses."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Further Contact lines after the intake addresses: mailto:, tel: or https: URIs.
    extra_contacts: list[Annotated[str, _uri("mailto", "tel", "https")]] = Field(default_factory=list)
    # When the file goes stale (RFC 3339 with an offset). Unset: `intake security-txt` refuses.
    expires: Annotated[str, AfterValidator(_rfc3339)] | None = None
    # Where the PGP key is: https: URLs, openpgp4fpr: fingerprints or dns: OPENPGPKEY records.
    encryption: list[Annotated[str, _uri("https", "openpgp4fpr", "dns")]] = Field(default_factory=list)
    policy: HttpsUrl | None = None
    acknowledgments: HttpsUrl | None = None
    preferred_languages: list[Annotated[str, AfterValidator(_language)]] = Field(default_factory=list)
    # Where the file is published (https://example.com/.well-known/security.txt).
    canonical: list[HttpsUrl] = Field(default_factory=list)
    hiring: HttpsUrl | None = None


class NotConfigured(ValueError):
    """The configuration lacks what the file needs; the message names the key."""


def parse_instant(value: str) -> datetime:
    """An RFC 3339 string as an aware datetime."""
    instant = datetime.fromisoformat(value.replace("z", "Z").replace("t", "T"))
    if instant.utcoffset() is None:
        raise ValueError("it has no UTC offset")
    return instant


def render(settings: Settings) -> str:
    """The security.txt file, LF line endings, ending with a newline."""
    section = settings.security_txt
    if section.expires is None:
        raise NotConfigured("security_txt.expires is not set (RFC 9116 requires Expires), "
                            "e.g. expires = \"2027-01-31T00:00:00Z\" or INTAKE_SECURITY_TXT__EXPIRES")
    expires = parse_instant(section.expires).astimezone(timezone.utc)
    fields: list[tuple[str, str]] = [("Contact", f"mailto:{address}") for address in settings.smtp.addresses]
    fields += [("Contact", contact) for contact in section.extra_contacts]
    fields.append(("Expires", expires.strftime("%Y-%m-%dT%H:%M:%SZ")))
    fields += [("Encryption", uri) for uri in section.encryption]
    fields += [("Policy", section.policy)] if section.policy else []
    fields += [("Acknowledgments", section.acknowledgments)] if section.acknowledgments else []
    if section.preferred_languages:
        fields.append(("Preferred-Languages", ", ".join(section.preferred_languages)))
    fields += [("Canonical", uri) for uri in section.canonical]
    fields += [("Hiring", section.hiring)] if section.hiring else []
    return "".join(f"{name}: {value}\n" for name, value in fields)


def expiry_warning(settings: Settings, now: datetime) -> str | None:
    """Why the configured Expires needs attention at *now* (past, under 30 days away, over a year
    away), or None (also when security.txt is not configured)."""
    if settings.security_txt.expires is None:
        return None
    expires = parse_instant(settings.security_txt.expires)
    if expires <= now:
        return f"security_txt.expires {settings.security_txt.expires} has passed: the published file is stale"
    if expires - now < EXPIRY_WARNING:
        days = math.ceil((expires - now) / timedelta(days=1))
        return (f"security_txt.expires {settings.security_txt.expires} is {days} day(s) away "
                f"(less than {EXPIRY_WARNING.days}): set a new date and republish the file")
    if expires - now > EXPIRY_LONGEST:
        return (f"security_txt.expires {settings.security_txt.expires} is more than a year away "
                "(RFC 9116 asks for less)")
    return None
