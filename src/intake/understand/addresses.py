"""Address headers (From, To, Cc) split by a small linear parser of our own.

The stdlib's recurses per group member and per nested comment, and misattributes crafted
addresses (CVE-2023-27043).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from intake import patterns
from intake.understand.header_text import clean_text, decode_8bit, display_value, warn

MAX_LISTED_ADDRESSES = 100  # addresses kept in ParsedMail.to / .cc (recipient_count counts them all)

_ADDRESS_TOKEN = patterns.compile(r'"(?:[^"\\]|\\.)*"|\\.|[()<>,:;"]|[^"()<>,:;\\]+', dotall=True)


@dataclass
class _AddressList:
    mailboxes: list[tuple[str, str]] = field(default_factory=list)  # (display name as written, address)
    empty_group: bool = False  # e.g. "undisclosed-recipients:;"
    malformed: str | None = None  # why the header could not be read


class _AddressListReader:
    """Splits an RFC 5322 address list in one linear pass: quoted strings, nested comments (dropped;
    a comment stands in for a missing display name, as in 'bob@example.org (Bob)'), angle
    addresses (source routes dropped) and groups. Unbalanced quotes, comments or angle brackets
    make the whole header malformed rather than guessed at: guessing is how CVE-2023-27043
    attributes a crafted address to the wrong mailbox. ';' outside a group separates like ','."""

    def __init__(self) -> None:
        self.result = _AddressList()
        self._phrase: list[str] = []
        self._angle: list[str] = []
        self._comment: list[str] = []
        self._has_angle = False
        self._in_angle = False
        self._comment_depth = 0
        self._group_members: int | None = None  # None outside a group

    def read(self, value: str) -> _AddressList:
        for match in _ADDRESS_TOKEN.finditer(value):
            if not self._take(match.group()):
                return self.result
        if self._comment_depth or self._in_angle:
            self._fail("a comment or angle address is not closed")
            return self.result
        self._end_mailbox()
        self._end_group()  # a missing ';' after a group is common and harmless
        return self.result

    def _take(self, token: str) -> bool:
        if self._comment_depth:
            if token == "(":
                self._comment_depth += 1
            elif token == ")":
                self._comment_depth -= 1
            else:
                self._comment.append(token)
            return True
        if token == "(":
            self._comment_depth = 1
        elif token in (')', '"'):
            return self._fail(f"unbalanced {token!r}")
        elif self._in_angle:
            if token == "<":
                return self._fail("'<' inside an angle address")
            if token == ">":
                self._in_angle = False
            else:
                self._angle.append(token)
        elif token == "<":
            if self._has_angle:
                return self._fail("two angle addresses in one mailbox")
            self._in_angle = self._has_angle = True
        elif token == ">":
            return self._fail("unbalanced '>'")
        elif token == ",":
            self._end_mailbox()
        elif token == ":" and self._group_members is None:
            self._group_members = 0
            self._phrase, self._comment = [], []  # the group's name is not an address
        elif token == ";":
            self._end_mailbox()
            self._end_group()
        else:
            self._phrase.append(token)
        return True

    def _end_mailbox(self) -> None:
        if self._has_angle:
            address = "".join(self._angle).strip().rsplit(":", 1)[-1].strip()  # drop a source route
            name = _unquote("".join(self._phrase))
        else:
            address = "".join(self._phrase).strip()
            name = ""
        name = name or _unquote("".join(self._comment))
        if address or (self._has_angle and name):  # 'MAILER DAEMON <>' still names its sender
            self.result.mailboxes.append((name, address))
        if address and self._group_members is not None:
            self._group_members += 1
        self._phrase, self._angle, self._comment, self._has_angle = [], [], [], False

    def _end_group(self) -> None:
        if self._group_members == 0:
            self.result.empty_group = True
        self._group_members = None

    def _fail(self, reason: str) -> bool:
        self.result = _AddressList(malformed=reason)
        return False


_QUOTED_STRING = patterns.compile(r'"((?:[^"\\]|\\.)*)"', dotall=True)
_QUOTED_PAIR = patterns.compile(r"\\(.)", dotall=True)


def _unquote(text: str) -> str:
    """A display name without its quotes and backslash escapes, whitespace collapsed."""
    words = _QUOTED_STRING.sub(lambda m: _QUOTED_PAIR.sub(r"\1", m.group(1)), text)
    return " ".join(words.split())


def _read_addresses(values: list[str], name: str, warnings: list[str]) -> _AddressList:
    """The mailboxes of every *name* header (one *values* entry each); malformed ones are skipped."""
    combined = _AddressList()
    for value in values:
        addresses = _AddressListReader().read(decode_8bit(value))
        if addresses.malformed:
            warn(warnings, f"{name} header is malformed ({addresses.malformed}); its addresses were ignored")
        combined.mailboxes += addresses.mailboxes
        combined.empty_group |= addresses.empty_group
    return combined


def sender(values: list[str], warnings: list[str]) -> tuple[str, str]:
    """(display name, address) of the first From mailbox, display-safe."""
    mailboxes = _read_addresses(values, "From", warnings).mailboxes
    name, address = mailboxes[0] if mailboxes else ("", "")
    return display_value(name, 200), clean_text(address, 320)


@dataclass(frozen=True)
class _Recipients:
    to: list[str]
    cc: list[str]
    count: int  # distinct addresses in To and Cc
    undisclosed: bool


def recipients(to_values: list[str], cc_values: list[str], warnings: list[str]) -> _Recipients:
    to = _read_addresses(to_values, "To", warnings)
    cc = _read_addresses(cc_values, "Cc", warnings)
    addresses = [address for _, address in to.mailboxes + cc.mailboxes if address]
    return _Recipients(
        to=[clean_text(a, 320) for _, a in to.mailboxes if a][:MAX_LISTED_ADDRESSES],
        cc=[clean_text(a, 320) for _, a in cc.mailboxes if a][:MAX_LISTED_ADDRESSES],
        count=len({address.casefold() for address in addresses}),
        # An empty group ("undisclosed-recipients:;"), or no To/Cc content at all: Bcc-style delivery.
        undisclosed=to.empty_group or cc.empty_group or not any(v.strip() for v in to_values + cc_values),
    )
