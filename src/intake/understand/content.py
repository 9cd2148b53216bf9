"""The content of a read MIME tree as mail-parser extracts it: body text parts and attachments.

mail-parser (:class:`mailparser.MailParser`) decodes the text of the body parts (charsets), picks
the attachments (which parts, their names, their decoded bytes) and reports MIME defects; the
tree is first labelled so that it gets names and charsets right and stays fast.
"""

from __future__ import annotations

import codecs
import hashlib
import logging
from dataclasses import dataclass, field
from email.message import Message
from typing import Any

from mailparser import MailParser
from mailparser.utils import decode_base64_payload, decode_header_part

from intake.understand import large_parts
from intake.understand.header_text import MAX_DECODED_HEADER, clean_text, guarded, safe_filename, warn
from intake.understand.large_parts import LargePart
from intake.understand.mime_reader import MimePart, read_mime, shown_inline, walk_parts
from intake.understand.parsed_mail import Attachment

# mail-parser logs what it makes of each part, quoting raw header text (line breaks included) at
# ERROR: a sender could forge lines in our log. What matters reaches ParsedMail.warnings instead.
logging.getLogger("mailparser").setLevel(logging.CRITICAL)

_BODY_TEXT_TYPES = ("text/plain", "text/html")
# mail-parser lists a leaf as an attachment when it has a file name. A nameless one it names at
# random or after its Content-ID, or, lacking both, decodes as text it then sets aside: a PoC
# binary sent without a name would drop out of the list. So every leaf that is not body text and
# has no name is given this one first; an attachment listed under it had no name of its own (a
# sender who uses it as a real name only loses it for display).
_UNNAMED = "intake-unnamed-part"
# What mail software means by a label, as browsers read it (WHATWG Encoding): the superset.
# mail-parser decodes by the label as written, so text using a superset's extra characters
# (Outlook's curly quotes in "iso-8859-1", GBK in "gb2312") would come out as control characters
# or U+FFFD, and Python has no codec at all for "iso-8859-8-i".
_CHARSET_SUPERSETS = {
    "iso-8859-1": "cp1252", "latin1": "cp1252", "gb2312": "gb18030", "gbk": "gb18030", "shift_jis": "cp932",
    "euc-kr": "cp949", "ks_c_5601-1987": "cp949", "iso-8859-8-i": "iso-8859-8", "tis-620": "cp874",
}


@dataclass
class Content:
    """What mail-parser extracted: the text of the body parts, and the attachments with their
    decoded bytes, but for those left in the raw bytes (listed in *large* by attachment index,
    with ``b""`` for bytes: nothing parsing reads needs them, see :mod:`intake.understand.large_parts`)."""

    plain: list[str] = field(default_factory=list)
    html: list[str] = field(default_factory=list)
    attachments: list[tuple[Attachment, bytes]] = field(default_factory=list)
    large: dict[int, LargePart] = field(default_factory=dict)


def extract_content(root: MimePart, warnings: list[str], large: dict[str, LargePart] | None = None) -> Content:
    """The content of the tree as mail-parser extracts it, and its MIME defects as a warning. If
    mail-parser fails, the content is left out with a warning: everything else is still read.
    *large* is the reading's parts left in the raw bytes, by their placeholder in the tree.
    It writes into the tree (see _prepare_for_mail_parser): read what else you need first."""
    _prepare_for_mail_parser(root, warnings)
    try:
        extracted = MailParser(_as_only_part(root))
    except Exception as exc:  # noqa: BLE001 - mail-parser raises outside its own hierarchy (AttributeError, TypeError)
        warn(warnings, f"content extraction failed ({type(exc).__name__} in mail-parser); "
                        "body text and attachments are only in the stored raw message")
        return Content()
    if extracted.defects_categories:
        warn(warnings, "MIME defects: " + ", ".join(sorted(extracted.defects_categories)))
    content = Content(plain=extracted.text_plain, html=extracted.text_html)
    _add_attachments(content, extracted.attachments, large or {})
    return content


def _prepare_for_mail_parser(root: MimePart, warnings: list[str]) -> None:
    """State in the tree what mail-parser would otherwise get wrong, or take too long over: a
    name for each nameless attachment, names cut to their start, and how each body text part is
    encoded."""
    for number, (part, _, _) in enumerate(walk_parts(root), start=1):
        if part.is_multipart():
            continue
        name = guarded(lambda: _bounded_file_name(part), "", f"part {number} file name", warnings)
        if part.get_content_type() in _BODY_TEXT_TYPES and shown_inline(part, bool(name)):
            guarded(lambda: _declare_text_encoding(part), None, f"part {number} charset", warnings)
        elif not name:
            _set_file_name(part, _UNNAMED)


def _bounded_file_name(part: Message) -> str:
    """The part's file name as mail-parser decodes it, from its first MAX_DECODED_HEADER
    characters only, which become the name it is given: it decodes a name whole, and encoded
    words decode in quadratic time (a 64 KB name took 70 ms)."""
    name = part.get_filename() or ""
    if len(name) > MAX_DECODED_HEADER:
        name = name[:MAX_DECODED_HEADER]
        _set_file_name(part, name)
    return decode_header_part(name)


def _set_file_name(part: Message, name: str) -> None:
    """Give *part* this file name (it takes precedence over a Content-Type name), keeping its
    disposition; a part with a name and no disposition is offered as a file anyway."""
    _replace_header(part, "Content-Disposition", part.get_content_disposition() or "attachment")
    part.set_param("filename", name, header="Content-Disposition")


def _declare_text_encoding(part: Message) -> None:
    """Label a body text part so that mail-parser decodes it as mail software does: in the
    superset of its charset, and always through that charset. (Text sent without a transfer
    encoding it returns as it stands whenever that is valid UTF-8: ISO-2022-JP, the usual charset
    of Japanese mail, would stay escape sequences. "binary" is the same identity encoding, and
    makes it decode.)"""
    declared = part.get_content_charset()
    superset = _CHARSET_SUPERSETS.get(declared or "")
    if superset:
        part.set_param("charset", superset)
    if str(part.get("Content-Transfer-Encoding", "")).strip().lower() in ("", "7bit", "8bit"):
        _replace_header(part, "Content-Transfer-Encoding", "binary")


def _replace_header(part: Message, name: str, value: str) -> None:
    del part[name]
    part[name] = value


def _as_only_part(root: MimePart) -> Message:
    """*root* as the only part of a bare multipart: what mail-parser is given.

    Of the message it is given, mail-parser reads the whole header block: it parses the addresses
    (with the stdlib's parser, which recurses per nested comment), dates and Received chains, and
    decodes every header twice, most of its time on a 4 KB mail, for values read here already. Of
    a part it reads only the MIME fields, and it extracts the same content. The empty epilogue
    keeps its epilogue recovery idle: that re-parses the epilogue unbounded (the reader recovers
    those parts itself, within the limits), and in mail-parser 4.8 it raises when a nested part
    misses its start boundary and the top-level multipart has no epilogue."""
    wrapper = Message()
    wrapper["Content-Type"] = 'multipart/mixed; boundary="intake-only-part"'
    wrapper.attach(root)
    wrapper.epilogue = ""
    return wrapper


def _add_attachments(content: Content, listed: list[dict[str, Any]], large: dict[str, LargePart]) -> None:
    """mail-parser's attachments with their decoded bytes (or, left in the raw bytes, what
    :mod:`intake.understand.large_parts` read of them), numbered from 1 in document order.

    Left out: the flattened copy it lists of a multipart marked as an attachment (not the bytes
    that were sent; the parts are listed themselves) and nameless parts with nothing in them."""
    for item in listed:
        if not item["binary"]:  # only that flattened copy is not handed over base64-encoded
            continue
        name = "" if item["filename"] == _UNNAMED else item["filename"]
        index = len(content.attachments) + 1
        left = large.get(item["payload"])
        if left is not None:
            if name or not left.blank:
                content.large[index] = left
                content.attachments.append((_attachment(index, name, item["mail_content_type"], left.size,
                                                        left.sha256), b""))
            continue
        data = decode_base64_payload(item["payload"])  # how mail-parser itself writes attachments out
        if name or data.strip():
            content.attachments.append((_attachment(index, name, item["mail_content_type"], len(data),
                                                    hashlib.sha256(data).hexdigest()), data))


def _attachment(index: int, filename: str, content_type: str, size: int, sha256: str) -> Attachment:
    return Attachment(
        index=index,
        filename=safe_filename(filename, index),
        original_filename=clean_text(filename, 255),
        content_type=clean_text(content_type, 255),
        size=size,
        sha256=sha256,
    )


def extract_attachment(raw: bytes, index: int) -> tuple[Attachment, bytes]:
    """The *index*-th attachment (1-based, numbered as in ParsedMail.attachments) and its decoded
    bytes; LookupError if the message has no such attachment."""
    try:
        reading = read_mime(raw)
        content = extract_content(reading.root, [], reading.large_parts)
    except Exception as exc:  # noqa: BLE001 - parse() lists no attachments for a message it cannot read
        raise LookupError(f"the message could not be read ({type(exc).__name__})") from exc
    if not 1 <= index <= len(content.attachments):
        raise LookupError(f"no attachment {index}: the message has {len(content.attachments)}")
    attachment, data = content.attachments[index - 1]
    left = content.large.get(index)
    return attachment, data if left is None else large_parts.decoded(raw.removeprefix(codecs.BOM_UTF8), left)
