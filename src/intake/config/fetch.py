"""``[[fetch]]`` sources: hosted IMAP mailboxes intake fetches mail from (:mod:`intake.receive.fetch`).

Only over TLS (IMAPS, or STARTTLS before login), the server's certificate verified. The
credential is never in config.toml: a password (``auth = "password"``) or an OAuth2 access token
(``auth = "oauth2"``, sent as SASL XOAUTH2 or OAUTHBEARER) is read from the file
``password_file``/``token_file`` names, else from ``$CREDENTIALS_DIRECTORY/fetch-<name>`` (systemd
``LoadCredential=``), at every login: a hosted provider's token lasts about an hour, and the
refresher that rewrites the file is the operator's (the provider's own tool), not intake's.
"""

from __future__ import annotations

import os
import re  # config text only
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

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
    # How intake logs in: "password" (IMAP LOGIN) or "oauth2" (a bearer access token, SASL).
    auth: Literal["password", "oauth2"] = "password"
    # auth = "password": a file holding the password; unset: $CREDENTIALS_DIRECTORY/fetch-<name>.
    password_file: Path | None = None
    # auth = "oauth2": a file holding the current access token, read again at every login (an
    # external refresher rewrites it); unset: $CREDENTIALS_DIRECTORY/fetch-<name>.
    token_file: Path | None = None
    # auth = "oauth2": the SASL mechanism, XOAUTH2 (Google, Microsoft) or OAUTHBEARER (RFC 7628).
    oauth2_mechanism: Literal["XOAUTH2", "OAUTHBEARER"] = "XOAUTH2"
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

    @model_validator(mode="after")
    def _credential_file_matches_auth(self) -> FetchSource:
        if self.auth == "oauth2" and self.password_file is not None:
            raise ValueError('password_file is for auth = "password"; an OAuth2 token is read from token_file')
        if self.auth == "password" and self.token_file is not None:
            raise ValueError('token_file is for auth = "oauth2" (set auth = "oauth2", or use password_file)')
        return self

    @property
    def move_to(self) -> str | None:
        """The folder messages are moved to after storing, if ``after`` moves them."""
        return self.after[len(_MOVE):] if self.after.startswith(_MOVE) else None

    @property
    def peer(self) -> str:
        """What stored messages from this source record as their peer."""
        return f"imap:{self.name}"

    @property
    def credential_key(self) -> str:
        """The key naming this source's credential file: password_file or token_file."""
        return "token_file" if self.auth == "oauth2" else "password_file"

    def credential_path(self, base_dir: Path, environ: dict[str, str] | None = None) -> Path:
        """Where the password or access token (as ``auth`` says) is read from: its configured file
        (relative to *base_dir*), else the systemd credential; raises :class:`FileNotFoundError`
        naming the key when there is neither."""
        environ = os.environ if environ is None else environ
        configured = self.token_file if self.auth == "oauth2" else self.password_file
        if configured is not None:
            return _resolve(configured, base_dir)
        if environ.get("CREDENTIALS_DIRECTORY"):
            return Path(environ["CREDENTIALS_DIRECTORY"]) / f"fetch-{self.name}"
        raise FileNotFoundError(f"fetch source {self.name!r}: no {self.credential_key} and no "
                                f"$CREDENTIALS_DIRECTORY (fetch-{self.name})")

    def credential(self, base_dir: Path, environ: dict[str, str] | None = None) -> str:
        """The password or access token, read now (a refreshed token is picked up at the next
        login); raises :class:`FileNotFoundError` naming where it looked."""
        path = self.credential_path(base_dir, environ)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            what = "access token" if self.auth == "oauth2" else "password"
            raise FileNotFoundError(f"fetch source {self.name!r}: cannot read the {what} from {path}: "
                                    f"{exc.strerror}") from None
        # A token has no spaces, and refreshers write it with or without a newline; a password
        # may begin or end with a space.
        return text.strip() if self.auth == "oauth2" else text.rstrip("\r\n")


def _resolve(path: Path, base_dir: Path) -> Path:
    return path if path.is_absolute() else base_dir / path


def token_files_exist(sources: list[FetchSource], base_dir: Path) -> None:
    """An OAuth2 source's configured ``token_file`` exists when the configuration is loaded: a
    typo in its path is a configuration error, not an hour of failing logins. (The password and
    the systemd credential are looked for at login: they are not in this process's view before.)"""
    for index, source in enumerate(sources):
        if source.auth == "oauth2" and source.token_file is not None:
            path = _resolve(source.token_file, base_dir)
            if not path.is_file():
                raise ValueError(f"fetch.{index}.token_file: {path} does not exist (the OAuth2 access token "
                                 f"of source {source.name!r}, which your token refresher writes)")


def check_sources(sources: list[FetchSource]) -> list[FetchSource]:
    """Source names are unique: they key stored messages and credential files."""
    names = [source.name for source in sources]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"fetch: source names must be unique ({', '.join(repeated)} repeated)")
    return sources
