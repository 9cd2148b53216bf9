"""``[[fetch]]`` sources: hosted IMAP mailboxes intake fetches mail from (:mod:`intake.receive.fetch`).

Only over TLS (IMAPS, or STARTTLS before login), the server's certificate verified. The password
is never in config.toml: it is read from ``$CREDENTIALS_DIRECTORY/fetch-<name>`` (systemd
``LoadCredential=``) or from the file ``password_file`` names.
"""

from __future__ import annotations

import os
import re  # config text only
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
_MOVE = "move:"


class FetchSource(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # Names the source in logs, in stored messages' peer ("imap:<name>") and in its credential file.
    name: str
    host: str
    # 993 for IMAPS, 143 for STARTTLS.
    port: int = Field(default=993, ge=1, le=65535)
    tls: Literal["imaps", "starttls"] = "imaps"
    # PEM CA certificates to verify the server with; unset: the system's.
    ca_file: Path | None = None
    user: str
    # A file holding the password; unset: $CREDENTIALS_DIRECTORY/fetch-<name>.
    password_file: Path | None = None
    folder: str = "INBOX"
    # What is done on the server once a message is committed: "seen" (flag it \\Seen; only unseen
    # messages are fetched), "move:<folder>" or "delete" (then every message in folder is fetched).
    after: str = "seen"
    # Seconds between polls (and at most between IDLE renewals).
    poll_interval: float = Field(default=60.0, ge=1, le=86400)

    @field_validator("name")
    @classmethod
    def _name_is_a_word(cls, value: str) -> str:
        if not _NAME.fullmatch(value):
            raise ValueError(f"{value!r}: use 1-32 of a-z, 0-9, '-' and '_' (it names a credential file)")
        return value

    @field_validator("after")
    @classmethod
    def _after_is_known(cls, value: str) -> str:
        if value in ("seen", "delete") or (value.startswith(_MOVE) and value[len(_MOVE):].strip()):
            return value
        raise ValueError(f"{value!r}: expected 'seen', 'move:<folder>' or 'delete'")

    @property
    def move_to(self) -> str | None:
        """The folder messages are moved to after storing, if ``after`` moves them."""
        return self.after[len(_MOVE):] if self.after.startswith(_MOVE) else None

    @property
    def peer(self) -> str:
        """What stored messages from this source record as their peer."""
        return f"imap:{self.name}"

    def password(self, base_dir: Path, environ: dict[str, str] | None = None) -> str:
        """The password, from ``password_file`` (relative to *base_dir*) or the credential file;
        raises :class:`FileNotFoundError` naming where it looked."""
        environ = os.environ if environ is None else environ
        if self.password_file is not None:
            path = self.password_file if self.password_file.is_absolute() else base_dir / self.password_file
        elif environ.get("CREDENTIALS_DIRECTORY"):
            path = Path(environ["CREDENTIALS_DIRECTORY"]) / f"fetch-{self.name}"
        else:
            raise FileNotFoundError(f"fetch source {self.name!r}: no password_file and no $CREDENTIALS_DIRECTORY "
                                    f"(fetch-{self.name})")
        try:
            return path.read_text(encoding="utf-8").rstrip("\r\n")
        except OSError as exc:
            raise FileNotFoundError(f"fetch source {self.name!r}: cannot read password from {path}: "
                                    f"{exc.strerror}") from None


def check_sources(sources: list[FetchSource]) -> list[FetchSource]:
    """Source names are unique: they key stored messages and credential files."""
    names = [source.name for source in sources]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"fetch: source names must be unique ({', '.join(repeated)} repeated)")
    return sources
