"""Bytes -> :class:`ParsedMail`. Pure (no database, no clock) and it never raises.

mail-parser does the MIME work. It can fail on hostile input with exceptions outside its own
hierarchy, so any failure falls back to the stdlib's lenient ``compat32`` parser, and failing
that to the bare headers; each fallback is recorded as a warning and the raw bytes stay stored.

Every string that leaves this module is *display-safe*: no CR, LF or NUL, no lone surrogates,
bounded length. That is what lets later stages put a researcher's subject into a header of
mail we send without opening a header-injection hole.
"""

from __future__ import annotations

import base64
import binascii
import email
import email.policy
import hashlib
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from email.header import decode_header, make_header
from email.message import Message
from email.parser import BytesHeaderParser
from email.utils import getaddresses, parseaddr
from typing import TypeVar

import html2text
import mailparser

T = TypeVar("T")

MAX_HEADER_TEXT = 998  # RFC 5322 line limit; longer display values are cut
MAX_FILENAME = 120

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_UNFOLD = re.compile(r"\r?\n(?=[ \t])")  # RFC 5322 unfolding: drop the CRLF, keep the WSP
_NEWLINES = re.compile(r"\s*[\r\n]+\s*")
_MESSAGE_ID = re.compile(r"<[^<>\s]+>")


@dataclass(frozen=True)
class Attachment:
    index: int
    filename: str  # safe to use as a file name
    original_filename: str  # for display only
    content_type: str
    size: int
    sha256: str

    def as_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class ParsedMail:
    message_id: str | None
    subject: str
    from_address: str
    from_name: str
    to: list[str]
    in_reply_to: str | None
    references: list[str]
    auto_submitted: str | None
    precedence: str | None
    content_type: str
    body_text: str
    attachments: list[Attachment] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def clean_text(value: object, limit: int = MAX_HEADER_TEXT) -> str:
    """A single display-safe line: folded whitespace, no control characters, bounded."""
    text = value if isinstance(value, str) else ("" if value is None else str(value))
    text = text.encode("utf-8", "replace").decode("utf-8")  # lone surrogates -> '?'
    text = _CONTROL.sub("", _NEWLINES.sub(" ", _UNFOLD.sub("", text))).strip()
    return text[:limit]


def _clean_body(text: str) -> str:
    text = text.encode("utf-8", "replace").decode("utf-8").replace("\x00", "")
    return text.replace("\r\n", "\n")


def safe_filename(name: str, index: int) -> str:
    """A file name with no path, no '..', no control characters, bounded length."""
    name = unicodedata.normalize("NFC", clean_text(name, 1000))
    name = name.replace("\\", "/").rsplit("/", 1)[-1]
    name = re.sub(r"[^\w.\- ()+,=@]", "_", name).strip(" .")
    name = re.sub(r"\.{2,}", ".", name)
    if not name:
        return f"attachment-{index}"
    if len(name) > MAX_FILENAME:
        stem, dot, ext = name.rpartition(".")
        ext = ext[:16] if dot else ""
        name = (stem if dot else name)[: MAX_FILENAME - len(ext) - 1] + ("." + ext if ext else "")
    return name


def _decode_header(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, list):  # duplicate headers: the first one counts
        value = value[0] if value else ""
    text = str(value)
    try:
        return str(make_header(decode_header(text)))
    except (LookupError, UnicodeError, ValueError, TypeError, AssertionError):
        return text


def _message_ids(value: str) -> list[str]:
    return _MESSAGE_ID.findall(value or "")


def _first_message_id(value: str | None) -> str | None:
    ids = _message_ids(value or "")
    if ids:
        return clean_text(ids[0], 500)
    text = clean_text(value or "", 500)
    return f"<{text.strip('<>')}>" if text and " " not in text else None


def _html_to_text(html: str) -> str:
    converter = html2text.HTML2Text()
    converter.ignore_images = True
    converter.body_width = 0
    return converter.handle(html)


def _header(message: Message | None, name: str) -> str:
    if message is None:
        return ""
    try:
        value = message.get(name)
    except Exception:  # a hostile header must not take the whole parse down
        return ""
    return "" if value is None else str(value)


def _decoded_attachment(entry: dict) -> bytes:
    payload = entry.get("payload") or ""
    if entry.get("binary"):
        try:
            return base64.b64decode(payload)
        except (binascii.Error, ValueError):
            return payload.encode("utf-8", "replace")
    return payload.encode("utf-8", "replace") if isinstance(payload, str) else bytes(payload)


def parse(raw: bytes) -> ParsedMail:
    """Parse *raw*; whatever happens, return a ParsedMail (warnings say what went wrong)."""
    warnings: list[str] = []
    try:
        mail = mailparser.parse_from_bytes(raw)
        message = mail.message
        subject_value = mail.subject
        body = "\n".join(mail.text_plain)
        if not body.strip() and mail.text_html:
            body = _html_to_text("\n".join(mail.text_html))
        attachments_raw = list(mail.attachments)
        if mail.has_defects:
            warnings.append("MIME defects: " + ", ".join(sorted(mail.defects_categories)))
    except Exception as exc:  # noqa: BLE001 - mail-parser raises outside its hierarchy
        warnings.append(f"mail-parser failed ({type(exc).__name__}); fell back to the stdlib parser")
        message, subject_value, body, attachments_raw = _fallback(raw, warnings)

    from_name, from_address = _guarded(lambda: parseaddr(_decode_header(_header(message, "From"))), ("", ""),
                                       "From", warnings)
    to = _guarded(lambda: [addr for _, addr in getaddresses([_header(message, "To")]) if addr], [], "To", warnings)
    attachments = []
    for index, entry in enumerate(attachments_raw, start=1):
        data = _decoded_attachment(entry)
        original = clean_text(entry.get("filename") or "", 255)
        attachments.append(
            Attachment(
                index=index,
                filename=safe_filename(original, index),
                original_filename=original,
                content_type=clean_text(entry.get("mail_content_type") or "application/octet-stream", 255),
                size=len(data),
                sha256=hashlib.sha256(data).hexdigest(),
            )
        )
    references = [clean_text(r, 500) for r in _message_ids(_header(message, "References"))]
    return ParsedMail(
        message_id=_first_message_id(_header(message, "Message-ID")),
        subject=clean_text(_stdlib_subject(raw, subject_value, warnings)),
        from_address=clean_text(from_address, 320),
        from_name=clean_text(from_name, 200),
        to=[clean_text(a, 320) for a in to[:100]],
        in_reply_to=_first_message_id(_header(message, "In-Reply-To")),
        references=references[:100],
        auto_submitted=clean_text(_header(message, "Auto-Submitted"), 100).lower() or None,
        precedence=clean_text(_header(message, "Precedence"), 100).lower() or None,
        content_type=clean_text(_content_type(message), 255),
        body_text=_clean_body(body),
        attachments=attachments,
        warnings=warnings,
    )


def _stdlib_subject(raw: bytes, parsed_value: object, warnings: list[str]) -> str:
    """The subject decoded as the stdlib's modern policy does it (RFC 2047, charset fallbacks
    with U+FFFD); mail-parser's value where that parser gives up."""
    try:
        headers = BytesHeaderParser(policy=email.policy.default).parsebytes(raw)
        value = headers["Subject"]
        return "" if value is None else str(value)
    except Exception as exc:  # noqa: BLE001 - hostile headers break the stdlib in many ways
        warnings.append(f"Subject decoded by the fallback decoder ({type(exc).__name__})")
        return _decode_header(parsed_value)


def _guarded(read: Callable[[], T], default: T, name: str, warnings: list[str]) -> T:
    """Read one header-derived value; the stdlib's address parser can recurse itself to death."""
    try:
        return read()
    except Exception as exc:  # noqa: BLE001 - RecursionError, IndexError, ... on hostile headers
        warnings.append(f"{name} header could not be parsed ({type(exc).__name__})")
        return default


def _content_type(message: Message | None) -> str:
    try:
        return message.get_content_type() if message is not None else "text/plain"
    except Exception:  # noqa: BLE001
        return "text/plain"


def _fallback(raw: bytes, warnings: list[str]) -> tuple[Message | None, str, str, list[dict]]:
    try:
        message = email.message_from_bytes(raw, policy=email.policy.compat32)
    except Exception as exc:  # noqa: BLE001
        warnings.append(f"stdlib parser failed too ({type(exc).__name__}); stored raw only")
        return None, "", raw.decode("utf-8", "replace"), []
    texts: list[str] = []
    try:
        for part in message.walk():
            if part.get_content_maintype() == "text" and not part.get_filename():
                payload = part.get_payload(decode=True) or b""
                charset = part.get_content_charset() or "utf-8"
                try:
                    texts.append(payload.decode(charset, "replace"))
                except LookupError:
                    texts.append(payload.decode("utf-8", "replace"))
    except Exception as exc:  # noqa: BLE001
        warnings.append(f"body could not be read ({type(exc).__name__})")
    return message, message.get("Subject", ""), "\n".join(texts), []
