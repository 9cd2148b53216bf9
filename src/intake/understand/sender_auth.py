"""Who a message is really from: a verdict on its From: domain, made before any lock is taken.

An Authentication-Results header (RFC 8601) is believed only from an authserv-id the operator
lists in ``[sender_auth] trusted_authserv_ids`` (our own MX), and only the topmost one; without
one, and with ``verify = true``, intake checks DKIM signatures itself (dkimpy) and looks up the
From: domain's DMARC record, with bounded DNS lookups.

DNS cost is bounded by construction:

* A trusted header is read without any lookup, whatever the mail.
* The processor asks for lookups (passes a resolver) only for mail that could gain privilege or
  be taken for a ticket's reporter (:func:`may_gain_privilege`, cheap checks on parsed headers):
  a recipient ``+tag`` naming a ticket (a reference or a maintainer's reply address), an
  In-Reply-To or References header, a subject naming a ticket reference, or an envelope or From:
  address of a maintainer. A stranger's new report costs no lookup at all.
* At most ``max_dns_lookups`` lookups per message, each within ``dns_timeout``: the DMARC record
  (``_dmarc.<domain>``, then the organisational domain's) and one key per DKIM signature, only
  for signatures aligned with the From: domain (an unaligned one cannot make a pass, so it is
  never looked up), at most :data:`MAX_SIGNATURES` of them, on messages of at most
  :data:`MAX_VERIFIED_BYTES` (CPU: dkimpy reads the body once per signature).
* Answers are cached per process, and so are timeouts and failures, for a few minutes, and a
  processing batch spends a bounded time on lookups (:mod:`intake.understand.dns_lookups`): a
  sender with a slow name server of their own cannot hold every other message up.

CPU is bounded too: header sections past the parser's field limit are not judged; trusted-header
candidates are length- and nesting-capped before authres reads them; dkimpy gets the header
section alone, signatures capped in size, and a body already in canonical form (its own
canonicalisation is slow or quadratic on blank-line and whitespace floods).

A lookup that times out or fails gives a ``none`` verdict whose reason says ``temperror``; every
input is hostile, so :func:`authenticate` answers a verdict and never raises.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, replace
from email.parser import BytesHeaderParser
from email.policy import compat32
from email.utils import getaddresses
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import authres
import authres.dmarc
import dkim

from intake.config.sections import SenderAuthSection
from intake.understand.dns_lookups import Resolver
from intake.understand.mime_reader import MAX_HEADER_FIELDS

if TYPE_CHECKING:
    from intake.config.settings import Settings
    from intake.understand.parsed_mail import ParsedMail

log = logging.getLogger(__name__)
# dkimpy logs each bad signature or key as an error, in the sender's words; the verdict's reason
# says what matters, so its log goes nowhere.
_dkimpy_log = logging.getLogger(__name__ + ".dkimpy")
_dkimpy_log.addHandler(logging.NullHandler())
_dkimpy_log.propagate = False

PASS = "pass"
FAIL = "fail"
NONE = "none"

# DKIM signatures looked at per message, and of those verified (each costs a key lookup).
MAX_SIGNATURES = 3
# Largest message whose DKIM signatures are verified here: dkimpy canonicalises the body once per
# signature, at up to ~0.1 s per MB on hostile bodies. A trusted MX's header has no such limit.
MAX_VERIFIED_BYTES = 4 * 1024 * 1024
# Authentication-Results headers read from the top (ours is the topmost), and the longest read.
_MAX_AR_HEADERS = 20
_MAX_AR_LENGTH = 4096
_MAX_REASON = 500
_MAX_HEADER_BYTES = 256 * 1024
_MAX_SIGNATURE_BYTES = 4096
_MAX_SIGNED_FIELDS = 100
_BLANKS = re.compile(rb"\t[\t ]*| [\t ]+")  # blank runs but single spaces, which stay as they are
# Comments nest in Authentication-Results; authres recurses once per level.
_MAX_COMMENT_DEPTH = 8
_AR_FEATURES = authres.FeatureContext(authres.dmarc)
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
# "x=1; y=2" tag lists of DMARC records (RFC 7489 6.3).
_TAG = re.compile(r"\s*([a-z]+)\s*=\s*([^;]*)")


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
        # Every field is a str, bool or None: asdict's deep copy would give the same, at several times the cost.
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


def authenticate(raw: bytes, from_address: str, config: SenderAuthSection, resolver: Resolver | None) -> Verdict:
    """The verdict on *raw*'s From: domain (*from_address* is the parser's reading of From:).

    A trusted Authentication-Results header decides without DNS; otherwise, with ``verify`` and a
    *resolver*, DKIM and DMARC are checked here; ``resolver=None`` makes no lookup at all."""
    try:
        verdict = _authenticate(raw, from_address, config, resolver)
    except Exception as exc:  # noqa: BLE001 - libraries on hostile bytes: a verdict, never a crash
        log.exception("event=sender-auth-error")
        return Verdict(NONE, f"not verified: internal error {type(exc).__name__}")
    # Reasons quote sender-written values (d=, library errors): one printable line, bounded.
    reason = verdict.reason[:_MAX_REASON]
    if reason.isprintable():  # the usual case: our own words, nothing to replace character by character
        return verdict if reason == verdict.reason else replace(verdict, reason=reason)
    return replace(verdict, reason="".join(c if c.isprintable() else "?" for c in reason))


def _authenticate(raw: bytes, from_address: str, config: SenderAuthSection, resolver: Resolver | None) -> Verdict:
    block = _header_section(raw)
    fields = block.count(b"\n") + 1 - block.count(b"\n ") - block.count(b"\n\t")
    if fields > MAX_HEADER_FIELDS or len(block) > _MAX_HEADER_BYTES:
        # Past what the parser reads (a From: it never saw) and what honest mail has: not judged.
        return Verdict(NONE, f"not verified: header section too large ({fields} fields, {len(block)} bytes)")
    headers = _plain_fields(block) or BytesHeaderParser(policy=compat32).parsebytes(block)
    domain, problem = _from_domain(headers, from_address)
    if problem:
        return problem
    trusted = _trusted_results(headers, config.trusted_authserv_ids)
    if trusted is not None:
        return _judge_results(trusted, domain)
    if not config.verify:
        return Verdict(NONE, "not verified (no trusted Authentication-Results; verify = false)", domain)
    if resolver is None:
        return Verdict(NONE, "not verified (no trusted Authentication-Results; no DNS lookups for mail that "
                             "cannot gain privilege)", domain)
    return _verify(raw, domain, _Budget(resolver, config.max_dns_lookups))


def may_gain_privilege(settings: Settings, mail: ParsedMail, mail_from: str, rcpt_tos: list[str]) -> bool:
    """Whether *mail* could be a maintainer's or a ticket reporter's (so is worth DNS lookups): a
    recipient +tag naming a ticket (a reference or a reply address), threading headers, a ticket
    reference in the subject, a maintainer sender. (A +tag naming a policy opens a new ticket.)"""
    reference = settings.intake.reference_prefix.lower() + "-"
    if any(recipient.rpartition("@")[0].partition("+")[2].lower().startswith(reference) for recipient in rcpt_tos):
        return True
    if mail.in_reply_to or mail.references:
        return True
    if reference in mail.subject.lower():
        return True
    return any(address and settings.is_maintainer(address) for address in (mail_from, mail.from_address))


# -- From: ------------------------------------------------------------------------------------------


def _split(raw: bytes) -> tuple[bytes, bytes]:
    """(header section with its last line ending, body): split at the first empty line."""
    header_end, body_start = _section_ends(raw)
    return raw[:header_end], raw[body_start:]


def _header_section(raw: bytes) -> bytes:
    """The header section of *raw* (as :func:`_split` gives it, without copying the body)."""
    return raw[:_section_ends(raw)[0]]


def _section_ends(raw: bytes) -> tuple[int, int]:
    """Where the header section of *raw* ends (after its last line ending) and its body starts."""
    if raw[:1] == b"\n" or raw[:2] == b"\r\n":
        return 0, 1 if raw[:1] == b"\n" else 2
    ends = [i for i in (raw.find(b"\n\n"), raw.find(b"\n\r\n")) if i >= 0]
    if not ends:
        return len(raw), len(raw)
    end = min(ends) + 1
    return end, end + (1 if raw[end:end + 1] == b"\n" else 2)


# A field's first line: its name (printable ASCII but the colon) and the colon.
_FIELD_START = re.compile(r"[!-9;-~]+:")


class _PlainFields:
    """A header section of plain fields, read as the stdlib's compat32 parser reads it, at a
    fraction of its cost: only ``get_all`` (see :func:`_plain_fields`)."""

    def __init__(self, fields: list[tuple[str, str]]) -> None:
        self._fields = fields

    def get_all(self, name: str) -> list[str] | None:
        name = name.lower()
        return [value for field, value in self._fields if field.lower() == name] or None


def _plain_fields(block: bytes) -> _PlainFields | None:
    """The fields of the header section *block* when it is plain: ASCII, lines ending in LF or
    CRLF, each line a field's first (a name and a colon) or a folded one after it. compat32 reads
    exactly these (name, value) pairs from it: the value from after the colon and its blanks, the
    folded lines as they are, the last line ending cut. Anything else (8-bit bytes, a lone CR, a
    line that is no field, a Unix From line) is None: left to the stdlib's parser."""
    if not block.isascii() or block.count(b"\r") != block.count(b"\r\n"):
        return None
    lines = block.decode("ascii").split("\n")
    last = lines.pop()  # after the last line ending ('' when there is one)
    lines = [line + "\n" for line in lines] + ([last] if last else [])
    fields: list[tuple[str, list[str]]] = []
    for line in lines:
        if line[0] in " \t":
            if not fields:
                return None
            fields[-1][1].append(line)
        elif _FIELD_START.match(line):
            name, _, value = line.partition(":")
            fields.append((name, [value.lstrip(" \t")]))
        else:
            return None
    return _PlainFields([(name, "".join(parts).rstrip("\r\n")) for name, parts in fields])


def _from_domain(headers: Any, from_address: str) -> tuple[str, Verdict | None]:
    """The From: domain, or a verdict on why there is none to judge."""
    values = headers.get_all("From") or []
    if not values:
        return "", Verdict(NONE, "no From: header")
    if len(values) > 1:
        return "", Verdict(FAIL, f"{len(values)} From: headers (RFC 5322 allows one)")
    addresses = [address for _, address in getaddresses([str(values[0])]) if address]
    if len(addresses) != 1:
        return "", Verdict(FAIL, f"From: holds {len(addresses) or 'no'} addresses, not exactly one")
    domain = addresses[0].rpartition("@")[2].strip().rstrip(".").lower()
    parsed = from_address.rpartition("@")[2].strip().rstrip(".").lower()
    if not domain.isascii() or not parsed.isascii():
        return "", Verdict(NONE, "From: domain is not ASCII (internationalised domains are not verified)")
    if not _valid_domain(domain):
        return "", Verdict(FAIL, f"From: domain {domain[:100]!r} is not a valid domain name")
    if parsed != domain:
        # Two readings of one header: the parser and DKIM/DMARC might not judge the same address.
        return "", Verdict(FAIL, f"From: read as {parsed[:100]!r} and as {domain[:100]!r}: ambiguous")
    return domain, None


def _dkim_body(body: bytes) -> bytes:
    """*body* as dkimpy reads it (every line ending CRLF), made by C-speed replaces: dkimpy's own
    reading splits the whole message into a list of lines first."""
    if body.count(b"\n") == body.count(b"\r\n"):
        return body
    return body.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def _without_trailing_lines(body: bytes, relaxed: bool) -> bytes:
    """*body* (CRLF lines) with the trailing lines its canonicalization ignores cut to one CRLF,
    which hashes the same (RFC 6376 3.4.3, 3.4.4): empty lines (simple), blank lines and the last
    line's trailing blanks (relaxed). dkimpy drops them one at a time in Python, slow on a flood."""
    content = body.rstrip(b" \t\r\n" if relaxed else b"\r\n")
    tail = body[len(content):]
    if not tail.endswith(b"\r\n"):
        return body
    # A CR not starting a CRLF is content, as is everything before it.
    kept = tail.replace(b"\r\n", b"\n\n").rfind(b"\r") + 1
    return content + tail[:kept] + b"\r\n"


def _relaxed_body(body: bytes) -> bytes:
    """The relaxed canonical form of *body* (RFC 6376 3.4.4) made in linear time. dkimpy's own
    (``[\\t ]+\\r\\n``) is quadratic in a blank run without a line end; on this form, which it
    leaves as it is, it is linear."""
    return _without_trailing_lines(_BLANKS.sub(b" ", body).replace(b" \r\n", b"\r\n"), True)


def _valid_domain(domain: str) -> bool:
    labels = domain.split(".")
    return len(domain) <= 253 and len(labels) >= 2 and all(_LABEL.fullmatch(label) for label in labels)


@lru_cache(maxsize=1)
def _public_suffixes() -> Any:
    from publicsuffixlist import PublicSuffixList  # the bundled list; never fetched

    return PublicSuffixList()


def organisational_domain(domain: str) -> str:
    """The registrable domain of *domain* (RFC 7489 3.2): ``mail.example.co.uk`` -> ``example.co.uk``."""
    return _public_suffixes().privatesuffix(domain) or domain


def aligned(signing_domain: str, from_domain: str, strict: bool = False) -> bool:
    """DMARC identifier alignment: the same domain (strict), or the same organisational domain."""
    signing_domain, from_domain = signing_domain.lower().rstrip("."), from_domain.lower().rstrip(".")
    if not (_valid_domain(signing_domain) and _valid_domain(from_domain)):
        return False
    if signing_domain == from_domain:
        return True
    return not strict and organisational_domain(signing_domain) == organisational_domain(from_domain)


# -- a trusted Authentication-Results header --------------------------------------------------------


def _trusted_results(headers: Any, trusted_ids: list[str]) -> Any | None:
    """The topmost Authentication-Results header of a trusted authserv-id, parsed; None when there
    is none (then every Authentication-Results header is ignored)."""
    if not trusted_ids:
        return None
    for value in (headers.get_all("Authentication-Results") or [])[:_MAX_AR_HEADERS]:
        text = re.sub(r"\r?\n", "", str(value)).strip()
        if len(text) > _MAX_AR_LENGTH or not text.isascii() or _comment_depth(text) > _MAX_COMMENT_DEPTH:
            continue  # not what an MX writes; a sender's
        try:
            parsed = _AR_FEATURES.parse_value(text)
        except authres.AuthResError:
            # Our MX's own header, unreadable: nothing below it is worth more.
            if (text.split(";", 1)[0].split() or [""])[0].lower() in trusted_ids:
                return _UNREADABLE
            continue
        if parsed.authserv_id in trusted_ids:
            return parsed
    return None


_UNREADABLE = object()


def _comment_depth(text: str) -> int:
    depth = deepest = 0
    for char in text:
        if char in "()":
            depth = max(depth + (1 if char == "(" else -1), 0)
            deepest = max(deepest, depth)
    return deepest


def _judge_results(header: Any, domain: str) -> Verdict:
    """The verdict a trusted Authentication-Results header gives on *domain*."""
    if header is _UNREADABLE:
        return Verdict(NONE, "trusted Authentication-Results header is unreadable", domain,
                       method="authentication-results")
    by = f"(by {header.authserv_id})"

    def made(result: str, reason: str, published: bool | None) -> Verdict:
        return Verdict(result, f"{reason} {by}", domain, published, "authentication-results")

    results = [r for r in header.results if getattr(r, "method", None)]
    published: bool | None = None
    for dmarc_result in (r for r in results if r.method == "dmarc"):
        header_from = (_property(dmarc_result, "header", "from") or domain).lower()
        if header_from != domain:
            continue  # about another domain than this From:
        outcome = (dmarc_result.result or "").lower()
        if outcome == PASS:
            return made(PASS, f"dmarc=pass header.from={domain}", True)
        if outcome == FAIL:
            return made(FAIL, f"dmarc=fail header.from={domain}", True)
        if outcome == NONE:
            published = False
        break
    dkim_results = [r for r in results if r.method == "dkim"]
    passed = [_signer(r) for r in dkim_results if (r.result or "").lower() == PASS]
    for signer in passed:
        if signer and aligned(signer, domain):
            return made(PASS, f"dkim=pass header.d={signer} aligned with From: {domain}", published)
    if passed:
        return made(FAIL, f"dkim=pass only for header.d={', '.join(passed)}, not aligned with From: {domain}",
                    published)
    failed = [r for r in dkim_results if (r.result or "").lower() in (FAIL, "neutral", "policy", "permerror")]
    if failed:
        return made(FAIL, f"dkim={failed[0].result.lower()} header.d={_signer(failed[0]) or '?'}", published)
    dmarc_said = "dmarc=none" if published is False else "no dmarc result"
    return made(NONE, f"{dmarc_said}, no DKIM pass for {domain}", published)


def _signer(result: Any) -> str:
    """The signing domain of a dkim result: header.d, else the domain of header.i (older filters)."""
    return (_property(result, "header", "d") or _property(result, "header", "i").rpartition("@")[2]).lower()


def _property(result: Any, ptype: str, name: str) -> str:
    for prop in getattr(result, "properties", None) or []:
        if prop.type == ptype and prop.name == name:
            return str(prop.value or "")
    return ""


# -- DKIM and DMARC checked here ------------------------------------------------------------------


class _Unanswered(Exception):
    """A lookup that could not be made or answered: the verdict is a temperror."""


class _Budget:
    """At most *most* lookups through *resolver* for one message."""

    def __init__(self, resolver: Resolver, most: int) -> None:
        self.resolver, self.left = resolver, most

    def txt(self, name: str) -> list[bytes]:
        if self.left <= 0:
            raise _Unanswered(f"DNS lookup budget spent before {name}")
        self.left -= 1
        try:
            return self.resolver.txt(name)
        except TimeoutError:
            raise _Unanswered(f"DNS lookup of {name} timed out") from None
        except OSError as exc:
            raise _Unanswered(f"DNS lookup of {name} failed ({exc})") from None

    def dkim_key(self, name: bytes, timeout: float = 0) -> bytes | None:
        """dkimpy's ``dnsfunc``: the key record of *name*, None when there is none."""
        records = self.txt(name.decode("ascii", "replace").rstrip("."))
        return records[0] if records else None


@dataclass(frozen=True)
class _Dmarc:
    published: bool | None
    strict: bool  # adkim=s
    problem: str = ""  # why it could not be learnt


def _dmarc(domain: str, budget: _Budget) -> _Dmarc:
    """The DMARC record of *domain*, else of its organisational domain (RFC 7489 6.6.3)."""
    names = [domain] + ([org] if (org := organisational_domain(domain)) != domain else [])
    try:
        for name in names:
            records = [r for r in budget.txt(f"_dmarc.{name}") if r[:8].lower() == b"v=dmarc1"]
            if len(records) == 1:
                tags = dict(_TAG.findall(records[0].decode("ascii", "replace").lower()))
                return _Dmarc(True, tags.get("adkim", "r").strip() == "s")
    except _Unanswered as exc:
        # Unknown policy: only a signature of exactly the From: domain can pass.
        return _Dmarc(None, True, f"temperror: {exc}")
    return _Dmarc(False, False)


def _verify(raw: bytes, domain: str, budget: _Budget) -> Verdict:
    """DKIM signatures aligned with *domain* verified with keys looked up through *budget*."""
    dmarc = _dmarc(domain, budget)
    note = f"; {dmarc.problem}" if dmarc.problem else ""

    def made(result: str, reason: str) -> Verdict:
        return Verdict(result, reason + note, domain, dmarc.published, "dkim")

    # dkimpy reads the header section only; the body is given to it ready (see _dkim_body).
    try:
        signer = dkim.DKIM(_header_section(raw), logger=_dkimpy_log, minkey=1024)
    except dkim.DKIMException as exc:
        return made(FAIL, f"header section unreadable for DKIM ({exc})")
    signatures = [value for name, value in signer.headers if name.lower() == b"dkim-signature"]
    if not signatures:
        return made(NONE, "no DKIM signature")
    if len(raw) > MAX_VERIFIED_BYTES:
        return made(NONE, f"not verified: DKIM is checked here on messages up to {MAX_VERIFIED_BYTES >> 20} MiB "
                          f"(this one has {len(raw)} bytes)")
    refused: list[str] = []
    candidates: list[tuple[int, str, bool]] = []
    for index, value in enumerate(signatures[:MAX_SIGNATURES]):
        if len(value) > _MAX_SIGNATURE_BYTES or value.count(b":") > _MAX_SIGNED_FIELDS:
            # dkimpy splits h= and finds each signed field in quadratic time: bounded here.
            refused.append(f"DKIM signature over {_MAX_SIGNATURE_BYTES} bytes or {_MAX_SIGNED_FIELDS} signed fields")
            continue
        try:
            fields = signer.verify_headerprep(index)[0]
        except dkim.DKIMException as exc:
            refused.append(f"malformed DKIM signature ({exc})")
            continue
        d = fields[b"d"].decode("ascii", "replace").lower()
        if not aligned(d, domain, dmarc.strict):
            refused.append(f"DKIM signature d={d} not aligned with From: {domain}")
        elif b"l" in fields:
            refused.append(f"DKIM signature d={d} covers only part of the body (l=)")
        else:
            candidates.append((index, d, fields.get(b"c", b"").lower().endswith(b"/relaxed")))
    temperror = ""
    body = _dkim_body(_split(raw)[1]) if candidates else b""
    ready = {relaxed: _relaxed_body(body) if relaxed else _without_trailing_lines(body, False)
             for relaxed in {c[2] for c in candidates}}
    for index, d, relaxed in candidates:
        signer.body = ready[relaxed]
        try:
            if signer.verify(idx=index, dnsfunc=budget.dkim_key):
                return made(PASS, f"dkim=pass d={d} aligned with From: {domain}")
            refused.append(f"DKIM signature d={d} does not verify")
        except _Unanswered as exc:
            temperror = temperror or f"temperror: {exc}"
        except dkim.DKIMException as exc:
            refused.append(f"DKIM signature d={d} does not verify ({exc})")
    if temperror:
        return made(NONE, "; ".join([temperror, *refused]))
    return made(FAIL, "; ".join(refused))
