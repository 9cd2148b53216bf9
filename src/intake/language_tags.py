"""Language tags (BCP 47, RFC 5646) as intake reads, writes and matches them.

Tags come from the configuration (``[intake] languages``), from ``intake language`` and from
senders' headers (Content-Language, Accept-Language): the last are attacker text, so every value
is cut to :data:`MAX_HEADER` characters before it is read, read with RE2 patterns only
(:mod:`intake.patterns`), and what comes out is a tag we offer or nothing; a header's text is
never stored or echoed. Matching is RFC 4647 3.4 "lookup": a range is shortened from the end
until it names an offered tag (de-AT-1996 -> de-AT -> de).
"""

from __future__ import annotations

from intake import patterns

ENGLISH = "en"
# RFC 5646 4.4.1: implementations need not handle longer tags, and none we could offer is.
MAX_TAG = 35
# How much of a Content-Language or Accept-Language value is read; the rest is ignored.
MAX_HEADER = 256
# How many languages of one header are considered, in order.
MAX_RANGES = 16

# language (2-3 letters; extlang and 4-8 letter languages are not offered), script, region,
# variants, extensions and private use, as RFC 5646 2.1 spells them.
_TAG = patterns.compile(
    r"[A-Za-z]{2,3}(-[A-Za-z]{4})?(-([A-Za-z]{2}|[0-9]{3}))?(-([A-Za-z0-9]{5,8}|[0-9][A-Za-z0-9]{3}))*"
    r"(-[A-WY-Za-wy-z0-9](-[A-Za-z0-9]{2,8})+)*(-[Xx](-[A-Za-z0-9]{1,8})+)?")
# One Accept-Language item: a range and an optional weight (RFC 9110 12.5.4).
_WEIGHTED = patterns.compile(r"\s*([A-Za-z0-9-]{1,35}|\*)\s*(;\s*[qQ]\s*=\s*(0(\.[0-9]{0,3})?|1(\.0{0,3})?))?\s*")


def parse(text: str) -> str | None:
    """*text* as a well-formed tag in its canonical case (de-AT, zh-Hant-TW, sr-Latn), or None."""
    if len(text) > MAX_TAG or not _TAG.fullmatch(text):
        return None
    subtags = text.split("-")
    canonical = [subtags[0].lower()]
    extension = False  # after a singleton (an extension or private use) everything is lower case
    for subtag in subtags[1:]:
        extension = extension or len(subtag) == 1
        if extension:
            canonical.append(subtag.lower())
        elif len(subtag) == 4 and subtag.isalpha():
            canonical.append(subtag.title())  # script
        elif len(subtag) == 2 and subtag.isalpha():
            canonical.append(subtag.upper())  # region
        else:
            canonical.append(subtag.lower())
    return "-".join(canonical)


def lookup(ranges: list[str], offered: list[str]) -> str | None:
    """The first of *ranges* (well-formed tags, best first) that names an offered tag, shortened
    as RFC 4647 3.4 says; None when none does."""
    by_lower = {tag.lower(): tag for tag in offered}
    for wanted in ranges:
        subtags = wanted.lower().split("-")
        while subtags:
            found = by_lower.get("-".join(subtags))
            if found:
                return found
            subtags.pop()
            if subtags and len(subtags[-1]) == 1:  # a singleton never ends a range (RFC 4647 3.4)
                subtags.pop()
    return None


def content_language(value: str) -> list[str]:
    """The tags of a Content-Language value (RFC 3282: comma-separated), in order; malformed ones
    dropped."""
    if not value:
        return []  # most mail has none: no pattern run on the empty item
    items = value[:MAX_HEADER].split(",")[:MAX_RANGES]
    return [tag for tag in (parse(item.strip()) for item in items) if tag]


def accept_language(value: str) -> list[str]:
    """The tags of an Accept-Language value, most wanted first (a stable sort by weight); ``*``,
    weight 0 and malformed items dropped."""
    if not value:
        return []
    weighted = []
    for position, item in enumerate(value[:MAX_HEADER].split(",")[:MAX_RANGES]):
        match = _WEIGHTED.fullmatch(item)
        tag = parse(match.group(1)) if match else None
        weight = float(match.group(3)) if match and match.group(3) else 1.0
        if tag and weight > 0:
            weighted.append((-weight, position, tag))
    return [tag for _, _, tag in sorted(weighted)]


def choose(offered: list[str], *, content: str = "", accept: str = "", part_content: str = "") -> str:
    """The language to write to a reporter in: the report's own Content-Language (the message's,
    then its text part's), else the languages its Accept-Language asks for, looked up among
    *offered*; else English."""
    for ranges in (content_language(content), content_language(part_content), accept_language(accept)):
        found = lookup(ranges, offered)
        if found:
            return found
    return ENGLISH
