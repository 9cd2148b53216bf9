"""The ``[security_txt]`` section (RFC 9116) and its checks: what ``intake security-txt``
(:mod:`intake.config.security_txt`) publishes besides the intake addresses."""

from __future__ import annotations

import re  # config text only
from datetime import datetime
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

# -- [security_txt] (RFC 9116): rendered by intake.config.security_txt --------------------------

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


def parse_instant(value: str) -> datetime:
    """An RFC 3339 string as an aware datetime."""
    instant = datetime.fromisoformat(value.replace("z", "Z").replace("t", "T"))
    if instant.utcoffset() is None:
        raise ValueError("it has no UTC offset")
    return instant
