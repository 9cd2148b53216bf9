"""Mail to reporters in their language: which templates a language needs, where they are found,
and dates written the way that language writes them.

English is the shipped templates (``intake/send/templates/*.j2``), overridden by files of the same
name in ``[intake] templates_dir``. Another language is a folder of the same names beside them,
``templates/<tag>/`` (German ships as ``de``), overridden or added by ``<templates_dir>/<tag>/``.
A language in ``[intake] languages`` must have every template a reporter reads
(:func:`reporter_templates`: every shipped template that is not maintainers' mail), or the
configuration is refused (:func:`missing_templates`): no reporter gets half-English mail by
surprise. Maintainers' mail (:data:`MAINTAINER_TEMPLATES`) is always English.

Dates in English mail keep the wording they always had (``Fri 04 Dec 2026 17:00 CET``); other
languages get Babel's (CLDR's) weekday and month names and that language's order
(``Fr., 4. Dez. 2026, 17:00 MEZ``).
"""

from __future__ import annotations

from datetime import date, datetime
from functools import lru_cache
from pathlib import Path
from zoneinfo import ZoneInfo

from babel import Locale, UnknownLocaleError
from babel.dates import format_datetime, format_skeleton

from intake.language_tags import ENGLISH

SHIPPED = Path(__file__).parent / "templates"
TEMPLATE_SUFFIX = ".j2"
# Mail to maintainers: written in English whatever the ticket's language.
MAINTAINER_TEMPLATES = frozenset({"notice.txt.j2", "new-ticket.txt.j2", "digest.txt.j2", "digest.html.j2",
                                  "keep-in-loop-notice.txt.j2"})


@lru_cache(maxsize=1)
def reporter_templates() -> tuple[str, ...]:
    """The templates of mail a reporter reads: every shipped English template but maintainers'.
    A template added to the shipped folder is required of every offered language at once."""
    return tuple(sorted(path.name for path in SHIPPED.glob(f"*{TEMPLATE_SUFFIX}")
                        if path.name not in MAINTAINER_TEMPLATES))


def language_folders(language: str, override_dir: Path | None) -> list[Path]:
    """Where *language*'s templates are looked up, first found first: the operator's folder, then
    the shipped one (English: the template folders themselves)."""
    folders = [override_dir] if override_dir else []
    folders.append(SHIPPED)
    return folders if language == ENGLISH else [folder / language for folder in folders]


def missing_templates(language: str, override_dir: Path | None) -> list[str]:
    """The reporters' templates *language* has in none of its folders."""
    folders = language_folders(language, override_dir)
    return [name for name in reporter_templates() if not any((folder / name).is_file() for folder in folders)]


def check_languages(languages: list[str], override_dir: Path | None) -> None:
    """Raise ValueError naming every offered language that lacks a reporters' template, and which."""
    unknown = [tag for tag in languages if _locale(tag) is None]
    if unknown:
        raise ValueError(f"intake.languages: no date and month names (CLDR) for {', '.join(map(repr, unknown))}")
    gaps = [f"{tag!r} lacks {', '.join(missing)}"
            for tag in languages for missing in [missing_templates(tag, override_dir)] if missing]
    if gaps:
        where = f"{override_dir}/<tag>/ or " if override_dir else "[intake] templates_dir <tag>/ or "
        raise ValueError(f"intake.languages: {'; '.join(gaps)} (add them to {where}{SHIPPED}/<tag>/)")


@lru_cache(maxsize=32)
def _locale(language: str) -> Locale | None:
    try:
        return Locale.parse(language, sep="-")
    except (UnknownLocaleError, ValueError):
        return None


def _zone_name(local: datetime, locale: Locale | None) -> str:
    """The zone's short name in *locale* (MEZ), else the one English mail gives (AEST), never an
    offset CLDR writes for a zone it has no name for."""
    name = format_datetime(local, "zzz", locale=locale)
    return local.strftime("%Z") if name[:1] in "+-" or name.startswith("GMT") else name


def calendar_date(day: date, language: str) -> str:
    """A calendar date as a reporter reads it: "Mon 01 Mar 2027" in English (as always), else
    that language's own ("Mo., 1. März 2027")."""
    return f"{day:%a %d %b %Y}" if language == ENGLISH else format_skeleton("yMMMEd", day, locale=_locale(language))


def date_time(instant: datetime, timezone: str, language: str) -> str:
    """*instant* as a reporter reads it: the local date and time in *timezone* and, where that is
    not UTC, the UTC time beside it."""
    local = instant.astimezone(ZoneInfo(timezone))
    utc = instant.astimezone(ZoneInfo("UTC"))
    if language == ENGLISH:  # the wording English mail always had (README and tests quote it)
        text = local.strftime("%a %d %b %Y %H:%M %Z")
        return text + utc.strftime(" (%d %b %H:%M UTC)") if timezone != "UTC" else text
    locale = _locale(language)
    text = f"{format_skeleton('yMMMEd', local, locale=locale)}, {local:%H:%M} {_zone_name(local, locale)}"
    if timezone != "UTC":
        text += f" ({format_skeleton('MMMd', utc, locale=locale)}, {utc:%H:%M} UTC)"
    return text

