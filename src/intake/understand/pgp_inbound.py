"""Encrypted reports opened at parse time: PGP/MIME (RFC 3156) and inline armored blocks.

Runs where parsing runs (the parse helper process, within its time and CPU bounds), with the
organisation's key handed over as bytes (:class:`Decryption`). The stored raw message is never
changed: a PGP/MIME report is parsed as the message its outer header block and decrypted entity
make, and :func:`intake.understand.content.extract_attachment` opens it again the same way, so an
attachment is re-read from the ciphertext each time. Inline blocks in the text are replaced by
their plaintext. Whatever fails (not our key, damaged, too large) leaves the ciphertext as it
was, with a warning: the report still becomes a ticket.

Signatures inside the encryption are checked against the public keys the report itself carries
(:func:`public_keys`); :func:`verify_with_known` checks them again against a reporter's stored
keys, from the processor, which has the database.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

from email.message import Message
from email.utils import collapse_rfc2231_value

from intake import openpgp
from intake.understand.body_text import body_text
from intake.understand.content import Content, extract_content
from intake.understand.header_text import clean_text, warn
from intake.understand.mime_reader import MimePart, read_mime
from intake.understand.parsed_mail import ParsedMail, PgpStatus

if TYPE_CHECKING:  # not imported at run time: the parse helper decrypts without the settings' models
    from intake.config.settings import Settings

ARMOR_BEGIN = "-----BEGIN PGP MESSAGE-----"
ARMOR_END = "-----END PGP MESSAGE-----"
KEY_BEGIN = "-----BEGIN PGP PUBLIC KEY BLOCK-----"
KEY_END = "-----END PGP PUBLIC KEY BLOCK-----"
MAX_INLINE_BLOCKS = 8  # armored blocks decrypted in one message's text
MAX_PUBLIC_KEYS = 3  # public keys kept from one message
ATTACHED = "key attached to the report"
KNOWN = "known reporter key"
_CONTENT_FIELDS = ("content-", "mime-version")


@dataclass(frozen=True)
class Decryption:
    """What decrypting needs: the organisation's key and the largest ciphertext to try."""

    key: openpgp.OrgKey
    max_ciphertext: int


def decryption(settings: Settings) -> Decryption | None:
    """What decrypting needs under *settings*, or None when OpenPGP is off."""
    key = openpgp.org_key(settings)
    return Decryption(key, settings.openpgp.max_ciphertext) if key else None


def is_pgp_mime(part: Message) -> bool:
    """RFC 3156: multipart/encrypted; protocol="application/pgp-encrypted"."""
    if part.get_content_type() != "multipart/encrypted":
        return False
    protocol = part.get_param("protocol")
    text = collapse_rfc2231_value(protocol) if isinstance(protocol, tuple) else (protocol or "")
    return clean_text(text, 255).lower() == "application/pgp-encrypted"


def _ciphertext(root: MimePart) -> bytes | None:
    """The encrypted part of a PGP/MIME message: its second part (application/octet-stream)."""
    parts = root.get_payload() if root.is_multipart() else []
    if len(parts) < 2 or parts[1].is_multipart():
        return None
    return parts[1].get_payload(decode=True) or None


def _outer_header_block(raw: bytes) -> bytes:
    """*raw*'s header block without its MIME fields (the decrypted entity brings its own), folded
    lines kept with their field, ending in a line break."""
    end = min((at for at in (raw.find(b"\r\n\r\n"), raw.find(b"\n\n")) if at >= 0), default=len(raw))
    kept, keep = [], True
    for line in raw[:end].splitlines(keepends=True):
        if line[:1] not in (b" ", b"\t"):
            keep = not line.decode("latin-1").lower().startswith(_CONTENT_FIELDS)
        if keep:
            kept.append(line)
    block = b"".join(kept)
    return block if block.endswith(b"\n") else block + b"\r\n"


@dataclass(frozen=True)
class Opened:
    """A PGP/MIME message opened: the message to parse in its place (None when it could not be
    opened), its ciphertext, and why not."""

    raw: bytes | None
    ciphertext: bytes | None
    failure: str | None = None
    entity: bytes = b""  # the decrypted MIME entity


def open_pgp_mime(raw: bytes, root: MimePart, decryption: Decryption) -> Opened:
    """The message *raw* (whose MIME tree is *root*, a PGP/MIME entity) carries encrypted: its
    outer header block with the decrypted MIME entity."""
    ciphertext = _ciphertext(root)
    if ciphertext is None:
        return Opened(None, None, "encrypted report not decrypted: no encrypted part (RFC 3156 needs two parts)")
    if len(ciphertext) > decryption.max_ciphertext:
        return Opened(None, ciphertext, f"encrypted report not decrypted: {len(ciphertext)} bytes of ciphertext, "
                                        f"over openpgp.max_ciphertext ({decryption.max_ciphertext})")
    try:
        plaintext = openpgp.decrypt(ciphertext, decryption.key, []).plaintext
    except openpgp.OpenPgpError as exc:
        return Opened(None, ciphertext, f"encrypted report not decrypted: {exc}")
    return Opened(_outer_header_block(raw) + b"MIME-Version: 1.0\r\n" + plaintext, ciphertext, entity=plaintext)


def opened_message(raw: bytes, decryption: Decryption | None) -> bytes:
    """*raw* as it is parsed: decrypted if it is PGP/MIME to our key, else unchanged."""
    if decryption is None:
        return raw
    root = read_mime(raw).root
    if not is_pgp_mime(root):
        return raw
    return open_pgp_mime(raw, root, decryption).raw or raw


def decrypted_mail(mail: ParsedMail, opened: Opened, decryption: Decryption) -> ParsedMail:
    """The mail parsed from a decrypted PGP/MIME message, marked so, its signature checked
    against the keys it carries: one inside the encryption (RFC 3156 section 6.2), else a
    multipart/signed entity that was encrypted (section 6.1)."""
    warnings = [*mail.warnings, "encrypted: pgp-mime (decrypted; ciphertext kept as received)"]
    try:
        status = _status(openpgp.decrypt(opened.ciphertext, decryption.key, mail.public_keys), warnings)
    except openpgp.OpenPgpError:
        status = PgpStatus(decrypted=True)
    if not status.signed:
        status = _signed_entity(opened.entity, mail.public_keys) or status
    return dataclasses.replace(mail, encrypted="pgp-mime", pgp=status, warnings=warnings)


def _signed_entity(entity: bytes, candidates: list[str]) -> PgpStatus | None:
    """The signature of *entity* if it is multipart/signed (RFC 3156 section 5): its first part,
    exactly as it stands (CRLF line endings), checked against the detached signature of its second."""
    root = read_mime(entity).root
    parts = root.get_payload() if root.is_multipart() else []
    if root.get_content_type() != "multipart/signed" or len(parts) < 2 or not root.get_boundary():
        return None
    text = entity.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    delimiter = b"--" + root.get_boundary().encode("ascii", "replace")
    start = text.find(delimiter + b"\r\n")
    end = text.find(b"\r\n" + delimiter, start + len(delimiter))
    if start < 0 or end < 0:
        return None
    signed = text[start + len(delimiter) + 2:end]
    signer, verified = openpgp.verify_detached(signed, parts[1].get_payload(decode=True) or b"", candidates)
    return PgpStatus(True, True, signer, verified, ATTACHED if verified else None)


def _status(found: openpgp.Decrypted, warnings: list[str]) -> PgpStatus:
    """What a decryption says of the message's signature (a warning when it could not be checked)."""
    if found.unchecked:
        warn(warnings, f"signature not checked: {found.unchecked}")
    return PgpStatus(True, found.signed, found.signer, found.verified, ATTACHED if found.verified else None)


def decrypt_inline(body: str, decryption: Decryption, candidates: list[str],
                   warnings: list[str]) -> tuple[str, PgpStatus]:
    """*body* with its armored PGP messages replaced by their plaintext (at most
    MAX_INLINE_BLOCKS), and what the first one's signature said. A block that cannot be
    decrypted stays as it is, with a warning."""
    pieces, rest, status = [], body, PgpStatus(decrypted=False)
    for _ in range(MAX_INLINE_BLOCKS):
        start = rest.find(ARMOR_BEGIN)
        end = rest.find(ARMOR_END, start)
        if start < 0 or end < 0:
            break
        end += len(ARMOR_END)
        block = rest[start:end].encode("utf-8")
        pieces.append(rest[:start])
        rest = rest[end:]
        if len(block) > decryption.max_ciphertext:
            warn(warnings, f"inline PGP block not decrypted: over openpgp.max_ciphertext ({decryption.max_ciphertext})")
            pieces.append(block.decode())
            continue
        try:
            found = openpgp.decrypt(block, decryption.key, candidates)
        except openpgp.OpenPgpError as exc:
            warn(warnings, f"inline PGP block not decrypted: {exc}")
            pieces.append(block.decode())
            continue
        pieces.append(found.plaintext.decode("utf-8", "replace").replace("\r\n", "\n").replace("\x00", ""))
        if not status.decrypted:
            status = _status(found, warnings)
    return "".join(pieces) + rest, status


def public_keys(content: Content, body: str) -> list[str]:
    """The OpenPGP public keys the mail carries (application/pgp-keys attachments, armored key
    blocks in attachments or the text), armored, at most MAX_PUBLIC_KEYS, revoked ones left out."""
    blocks: list[bytes] = [data for attachment, data in content.attachments
                           if attachment.content_type == "application/pgp-keys" or KEY_BEGIN.encode() in data]
    start = body.find(KEY_BEGIN)
    if start >= 0 and (end := body.find(KEY_END, start)) >= 0:
        blocks.append(body[start:end + len(KEY_END)].encode("utf-8"))
    found: list[str] = []
    for block in blocks:
        try:
            key = openpgp.read_public_key(block)
        except openpgp.OpenPgpError:
            continue
        if key.armored not in found:
            found.append(key.armored)
        if len(found) == MAX_PUBLIC_KEYS:
            break
    return found


def verify_with_known(raw: bytes, mail: ParsedMail, decryption: Decryption, known: list[str],
                      known_fingerprints: set[str]) -> ParsedMail:
    """*mail* with its signature checked against the reporter's stored keys *known* (armored,
    their fingerprints *known_fingerprints*): a signature the report's own keys verified, by a
    key on file, is marked so; one they could not verify is checked against the stored keys."""
    status = mail.pgp
    if status is None or not status.decrypted or not status.signed or not known:
        return mail
    if status.verified:
        if status.signer in known_fingerprints:
            return dataclasses.replace(mail, pgp=dataclasses.replace(status, verified_with=KNOWN))
        return mail
    ciphertexts = _ciphertexts(raw, mail)
    for ciphertext in ciphertexts:
        if len(ciphertext) > decryption.max_ciphertext:
            continue
        try:
            found = openpgp.decrypt(ciphertext, decryption.key, known)
        except openpgp.OpenPgpError:
            continue
        signer, verified = found.signer, found.verified
        if not found.signed and (entity := _signed_entity(found.plaintext, known)) is not None:
            signer, verified = entity.signer, entity.verified
        if verified:
            return dataclasses.replace(mail, pgp=PgpStatus(True, True, signer, True, KNOWN))
    return mail


def _ciphertexts(raw: bytes, mail: ParsedMail) -> list[bytes]:
    """The ciphertext(s) of *raw*: its PGP/MIME encrypted part, else the armored blocks of its text."""
    root = read_mime(raw).root
    if mail.encrypted == "pgp-mime":
        ciphertext = _ciphertext(root) if is_pgp_mime(root) else None
        return [ciphertext] if ciphertext else []
    text = body_text(extract_content(root, []), [], [])
    start = text.find(ARMOR_BEGIN)
    end = text.find(ARMOR_END, start)
    return [text[start:end + len(ARMOR_END)].encode()] if start >= 0 and end >= 0 else []
