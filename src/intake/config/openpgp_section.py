"""``[openpgp]``: the organisation's OpenPGP key (:mod:`intake.openpgp` loads and uses it)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field


class OpenPgpSection(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # The organisation's secret key file (armored or binary); unset: the openpgp-key credential,
    # and without that OpenPGP is off.
    key_file: Path | None = None
    # A file holding the key's passphrase, if it is protected; unset: the openpgp-passphrase credential.
    passphrase_file: Path | None = None
    # Where the public key is published (https URL) for security.txt's Encryption line; unset:
    # "openpgp4fpr:<fingerprint>".
    key_url: str | None = Field(default=None, pattern=r"^https://\S+$")
    # Largest encrypted part decrypted (bytes); a larger one stays ciphertext, with a warning.
    max_ciphertext: int = Field(default=25 * 1024 * 1024, ge=1024)
