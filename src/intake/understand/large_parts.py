"""Large base64 attachments read straight from the raw message, never held decoded beside it.

A 25 MB message with an 18 MB attachment used to cost the parse helper about nine times its size:
the feed parser splits the 24 MB of base64 into 330,000 line strings and joins them again, mail-parser
hands the text on, and decoding it builds two more copies before the 18 MB of bytes. The reader
(:mod:`intake.understand.mime_reader`) instead leaves such a part's body in the raw bytes, puts a
placeholder in the tree, and keeps what the rest of parsing needs of it: the size and SHA-256 of
its decoded bytes, computed here a slice at a time. The bytes themselves are decoded again from
the raw message only when they are asked for (``intake attachment``, a maintainer's reply).

Decoding is mail-parser's (``mailparser.utils.decode_base64_payload``, what a mail client does),
done in slices: every byte outside the base64 alphabet is dropped, the first ``=`` ends the data, a
lone trailing character is dropped and the last group is padded. Base64 decodes four characters at
a time, so the slices decode to the same bytes as the whole.
"""

from __future__ import annotations

import binascii
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass

# A part whose body (its encoded text) is at least this long is read as large.
LARGE_PART = 1024 * 1024
_SLICE = 256 * 1024  # encoded bytes decoded at a time
_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/="
_NOT_ALPHABET = bytes(sorted(set(range(256)) - set(_ALPHABET)))
# A part carrying one is kept in the tree: OpenPGP keys are read from attachments' bytes.
_KEY_BLOCK = b"-----BEGIN PGP PUBLIC KEY BLOCK-----"


@dataclass(frozen=True)
class LargePart:
    """A base64 body left in the raw message: its encoded text is ``data[start:end]``, and it
    decodes to *size* bytes with this *sha256*; *blank* if those are all whitespace (or none)."""

    start: int
    end: int
    size: int
    sha256: str
    blank: bool


def digest(data: bytes, start: int, end: int) -> LargePart | None:
    """The base64 body ``data[start:end]`` read as large, or None if it must stay in the tree:
    it holds bytes outside ASCII (mail-parser then decodes it another way) or an OpenPGP key."""
    sha256 = hashlib.sha256()
    size, blank, tail = 0, True, b""
    for piece in _decoded_slices(data, start, end):
        if piece is None or _KEY_BLOCK in tail + piece:
            return None
        sha256.update(piece)
        size += len(piece)
        blank = blank and not piece.strip()
        tail = (tail + piece)[-len(_KEY_BLOCK):]
    return LargePart(start, end, size, sha256.hexdigest(), blank)


def decoded(data: bytes, part: LargePart) -> bytes:
    """The decoded bytes of *part* (of *data*, the message it was read from)."""
    return b"".join(piece or b"" for piece in _decoded_slices(data, part.start, part.end))


def _decoded_slices(data: bytes, start: int, end: int) -> Iterator[bytes | None]:
    """``data[start:end]`` decoded a slice at a time; None (and the end) at a byte outside ASCII."""
    view = memoryview(data)
    pending, ended = b"", False
    for position in range(start, end, _SLICE):
        encoded = bytes(view[position:min(position + _SLICE, end)])
        if not encoded.isascii():
            yield None
            return
        if ended:
            continue
        pending += encoded.translate(None, _NOT_ALPHABET)
        padding = pending.find(b"=")
        if padding >= 0:  # padding ends the data, as RFC 2045 requires and mail clients do
            pending, ended = pending[:padding], True
            continue
        whole = len(pending) - len(pending) % 4
        yield binascii.a2b_base64(pending[:whole])
        pending = pending[whole:]
    if len(pending) % 4 == 1:  # a lone character carries no complete byte
        pending = pending[:-1]
    yield binascii.a2b_base64(pending + b"=" * (-len(pending) % 4))
