"""``/.well-known/security.txt`` (RFC 9116) built from the configuration.

The ``[security_txt]`` section (:class:`intake.config.security_txt_section.SecurityTxtSection`) is checked when
the configuration loads (web URIs are https, ``expires`` is an RFC 3339 instant with an offset);
:func:`render` writes the file and :func:`expiry_warning` is what ``intake check-config`` says
when the file is about to go stale.

The file has one ``Field: value`` per line, lines ending in LF (RFC 9116 §4 allows CRLF or LF),
in this order: Contact (the intake addresses as ``mailto:``, then ``extra_contacts``), Expires
(exactly once), Encryption, Policy, Acknowledgments, Preferred-Languages (once, comma-separated),
Canonical, Hiring. No PGP signature: sign the output yourself if you publish a signed file.

Preferred-Languages is ``[security_txt] preferred_languages`` when set, else ``[intake] languages``
(the languages reporters get mail in) when that is more than English: without the field,
researchers assume English (RFC 9116 2.5.8). The two may differ on purpose (a team reads French without sending French mail), so a difference
is a check-config warning (:func:`languages_warning`), not an error.
"""

from __future__ import annotations

import math
from datetime import datetime, timedelta, timezone

from intake.config.security_txt_section import parse_instant
from intake import openpgp
from intake.config.settings import Settings

# check-config warns when the file expires within this, or has expired.
EXPIRY_WARNING = timedelta(days=30)
# RFC 9116 §2.5.5: Expires SHOULD be less than a year ahead.
EXPIRY_LONGEST = timedelta(days=366)


class NotConfigured(ValueError):
    """The configuration lacks what the file needs; the message names the key."""


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
    fields += [("Encryption", uri) for uri in section.encryption or _published_key(settings)]
    fields += [("Policy", section.policy)] if section.policy else []
    fields += [("Acknowledgments", section.acknowledgments)] if section.acknowledgments else []
    languages = preferred_languages(settings)
    if languages:
        fields.append(("Preferred-Languages", ", ".join(languages)))
    fields += [("Canonical", uri) for uri in section.canonical]
    fields += [("Hiring", section.hiring)] if section.hiring else []
    return "".join(f"{name}: {value}\n" for name, value in fields)


def _published_key(settings: Settings) -> list[str]:
    """The Encryption line for the organisation's OpenPGP key, when one is configured and
    ``encryption`` names none: ``[openpgp] key_url``, else ``openpgp4fpr:<fingerprint>``
    (RFC 9116 section 2.5.4 allows both)."""
    key = openpgp.org_key(settings)
    if key is None:
        return []
    return [settings.openpgp.key_url or f"openpgp4fpr:{key.fingerprint.lower()}"]


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


def preferred_languages(settings: Settings) -> list[str]:
    """The Preferred-Languages the file states: the explicit list, else the languages reporters
    get mail in when that is more than English; empty: no field."""
    offered = settings.intake.languages
    return list(settings.security_txt.preferred_languages) or (list(offered) if len(offered) > 1 else [])


def languages_warning(settings: Settings) -> str | None:
    """Why security.txt's explicit Preferred-Languages and ``[intake] languages`` need a look:
    one lists a language the other does not; None when they agree or nothing is explicit."""
    explicit = {tag.lower() for tag in settings.security_txt.preferred_languages}
    offered = {tag.lower() for tag in settings.intake.languages}
    if not explicit or explicit == offered:
        return None
    return (f"security_txt.preferred_languages ({', '.join(sorted(explicit))}) differs from intake.languages "
            f"({', '.join(sorted(offered))}); security.txt states the first, automatic mail is written in the second")
