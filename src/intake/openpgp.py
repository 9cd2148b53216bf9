"""The organisation's OpenPGP key and the few operations intake does with keys, on pysequoia.

pysequoia (Sequoia-PGP) takes keys and messages as bytes: no gpg-agent, no keyring home
directory, nothing written to disk, so it works under the unit's ProtectHome=/PrivateTmp= and in
the parse helper process. :class:`OrgKey` is plain bytes (picklable, comparable): it is handed
to that helper as it is, and each operation parses it again (microseconds for a Cv25519 key).

Errors from Sequoia come as RuntimeError with a Rust backtrace appended: :func:`reason` keeps
the first line, the part worth showing.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pysequoia

from intake.config import ConfigError

if TYPE_CHECKING:  # not imported at run time: the parse helper decrypts without the settings' models
    from intake.config.settings import Settings

KEY_CREDENTIAL = "openpgp-key"
PASSPHRASE_CREDENTIAL = "openpgp-passphrase"
# Larger key blocks are not keys a reporter sends: ignored rather than parsed.
MAX_KEY_BLOCK = 256 * 1024


class OpenPgpError(Exception):
    """A key or message could not be used; the message says why in one line."""


@dataclass(frozen=True)
class OrgKey:
    """The organisation's secret key (armored or binary) and its passphrase, if protected."""

    secret: bytes
    passphrase: str | None = None

    def _tsk(self) -> pysequoia.Tsk:
        return pysequoia.Tsk.from_bytes(self.secret)

    @property
    def fingerprint(self) -> str:
        return self._tsk().extract_certificate().fingerprint.upper()

    def public_armored(self) -> str:
        """The public key (no secret parts), ASCII-armored: what `intake key export` prints."""
        return str(self._tsk().extract_certificate())

    def decryptor(self) -> pysequoia.PyDecryptor:
        return self._tsk().decryptor(self.passphrase)

    def signer(self) -> pysequoia.PySigner:
        return self._tsk().signer(self.passphrase)


def reason(exc: BaseException) -> str:
    """Sequoia's error in one line, without its backtrace."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


def _credential(name: str) -> Path | None:
    directory = os.environ.get("CREDENTIALS_DIRECTORY")
    candidate = Path(directory) / name if directory else None
    return candidate if candidate is not None and candidate.is_file() else None


def _key_paths(settings: Settings) -> tuple[Path | None, Path | None]:
    """The key file (``[openpgp] key_file``, else the ``openpgp-key`` credential) and the
    passphrase file (``passphrase_file``, else the ``openpgp-passphrase`` credential), if any."""
    section = settings.openpgp
    key_path = settings.resolve_path(section.key_file) if section.key_file else _credential(KEY_CREDENTIAL)
    pass_path = settings.resolve_path(section.passphrase_file) if section.passphrase_file \
        else _credential(PASSPHRASE_CREDENTIAL)
    return key_path, pass_path


def _stamp(path: Path | None) -> int | None:
    try:
        return path.stat().st_mtime_ns if path else None
    except OSError:
        return None


def org_key(settings: Settings) -> OrgKey | None:
    """The organisation's key, or None when OpenPGP is off: read once, and again when a file it
    comes from changes. ConfigError when it is set but cannot be used (see :func:`_read_key`)."""
    key_path, pass_path = _key_paths(settings)
    return _cached_key(key_path, pass_path, _stamp(key_path), _stamp(pass_path)) if key_path else None


@functools.lru_cache(maxsize=4)
def _cached_key(key_path: Path, pass_path: Path | None, key_stamp: int | None, pass_stamp: int | None) -> OrgKey:
    return _read_key(key_path, pass_path)


def _read_key(key_path: Path, pass_path: Path | None) -> OrgKey:
    """The key at *key_path*, with the passphrase at *pass_path*. ConfigError when it cannot be
    used (unreadable, no secret parts, wrong or missing passphrase): a key that silently did
    nothing would leave encrypted reports unread."""
    try:
        secret = key_path.read_bytes()
        passphrase = pass_path.read_text(encoding="utf-8").rstrip("\r\n") if pass_path else None
    except OSError as exc:
        raise ConfigError(f"openpgp: {exc.filename}: cannot read: {exc.strerror}") from None
    key = OrgKey(secret, passphrase)
    try:
        key.decryptor()
        key.signer()
    except (RuntimeError, ValueError) as exc:
        raise ConfigError(f"openpgp: {key_path}: not a usable secret key ({reason(exc)}); "
                          "a protected key needs its passphrase (passphrase_file or the openpgp-passphrase "
                          "credential)") from None
    return key


@functools.lru_cache(maxsize=32)
def _key_file(path: Path, stamp: int) -> str:
    try:
        return read_public_key(path.read_bytes()).armored
    except (OSError, OpenPgpError) as exc:
        raise ConfigError(f"maintainers: openpgp_key {path}: {getattr(exc, 'strerror', None) or exc}") from None


def maintainer_keys(settings: Settings) -> dict[str, str]:
    """The armored key of each maintainer who has ``openpgp_key``, by lowercased address."""
    found = {}
    for maintainer in settings.maintainers:
        if maintainer.openpgp_key is not None:
            path = settings.resolve_path(maintainer.openpgp_key)
            stamp = path.stat().st_mtime_ns if path.exists() else 0
            found[maintainer.email.lower()] = _key_file(path, stamp)
    return found


def check(settings: Settings) -> str | None:
    """What check-config and `intake serve` say of OpenPGP: the organisation's key fingerprint and
    how many maintainers have keys, or None when it is off. ConfigError when a key file is unusable."""
    key = org_key(settings)
    maintainers = maintainer_keys(settings)
    if key is None:
        return None
    return f"OpenPGP key {key.fingerprint}; {len(maintainers)} maintainer key(s)"


@dataclass(frozen=True)
class PublicKey:
    """A certificate someone gave us: its fingerprint (upper-case hex) and armored text."""

    fingerprint: str
    armored: str
    user_ids: tuple[str, ...]


def read_public_key(data: bytes) -> PublicKey:
    """The first certificate in *data* (armored or binary), public parts only; OpenPgpError if
    there is none or it is unusable (revoked, too large)."""
    if len(data) > MAX_KEY_BLOCK:
        raise OpenPgpError(f"key block larger than {MAX_KEY_BLOCK} bytes")
    try:
        certs = pysequoia.Cert.split_bytes(data)
    except (RuntimeError, ValueError) as exc:
        raise OpenPgpError(f"not an OpenPGP key: {reason(exc)}") from None
    if not certs:
        raise OpenPgpError("no OpenPGP key in it")
    cert = certs[0]
    if cert.is_revoked:
        raise OpenPgpError(f"key {cert.fingerprint.upper()} is revoked")
    # str() is the public half only, should someone send their secret key.
    return PublicKey(cert.fingerprint.upper(), str(cert), tuple(str(uid) for uid in cert.user_ids))


def encrypt(data: bytes, recipients: list[str], signer: OrgKey | None) -> bytes:
    """*data* encrypted to every armored certificate of *recipients* (and to the organisation's
    own key when it signs, so the sent copy stays readable to us), armored."""
    certs = [pysequoia.Cert.from_bytes(armored.encode()) for armored in recipients]
    if signer is not None:
        certs.append(pysequoia.Tsk.from_bytes(signer.secret).extract_certificate())
    try:
        return pysequoia.encrypt(data, recipients=certs, signer=signer.signer() if signer else None)
    except (RuntimeError, ValueError) as exc:
        raise OpenPgpError(f"cannot encrypt: {reason(exc)}") from None


@dataclass(frozen=True)
class Decrypted:
    """A message decrypted: its plaintext; whether it was signed, by which key (the certificate's
    fingerprint when verified, else the key id the signature names), whether it verified, and
    why the signature could not be checked at all, if it could not."""

    plaintext: bytes
    signed: bool
    signer: str | None
    verified: bool
    unchecked: str | None = None


def decrypt(ciphertext: bytes, key: OrgKey, candidates: list[str]) -> Decrypted:
    """Decrypt *ciphertext* with *key*, checking any signature inside against *candidates*
    (armored certificates). OpenPgpError if it cannot be decrypted (not to our key, damaged).

    pysequoia fails the whole decryption when its verifier finds no valid signature, so a first
    pass verifies (and records which key ids the message asks for); when that fails, a second
    pass only decrypts, and the ids asked for say whether (and by whom) it was signed. Its
    verifier also refuses a signed message inside a compressed one (what gpg sends by default):
    that is decrypted too, its signature reported as not checked."""
    asked: list[str] = []
    certs = _certs(candidates)

    def store(key_ids: list[str]) -> list[pysequoia.Cert]:
        asked.extend(key_ids)
        return certs

    try:
        result = pysequoia.decrypt(ciphertext, decryptor=key.decryptor(), store=store)
    except (RuntimeError, ValueError) as exc:
        failure = reason(exc)
    else:
        verified = bool(result.valid_sigs)
        signer = result.valid_sigs[0].certificate if verified else (asked[0] if asked else None)
        return Decrypted(result.bytes or b"", bool(asked), signer.upper() if signer else None, verified)
    try:
        result = pysequoia.decrypt(ciphertext, decryptor=key.decryptor())
    except (RuntimeError, ValueError) as exc:
        raise OpenPgpError(reason(exc)) from None
    unchecked = None if "signature" in failure.lower() else failure
    return Decrypted(result.bytes or b"", bool(asked), asked[0].upper() if asked else None, False, unchecked)


def _certs(candidates: list[str]) -> list[pysequoia.Cert]:
    """The certificates among armored *candidates* that parse (a damaged one is skipped)."""
    certs = []
    for armored in candidates:
        try:
            certs.append(pysequoia.Cert.from_bytes(armored.encode()))
        except (RuntimeError, ValueError):
            continue
    return certs


def verify_detached(data: bytes, signature: bytes, candidates: list[str]) -> tuple[str | None, bool]:
    """Who made the detached *signature* over *data* (the certificate's fingerprint when one of
    *candidates* verifies it, else the issuer it names) and whether it verified."""
    try:
        sig = pysequoia.Sig.from_bytes(signature)
    except (RuntimeError, ValueError):
        return None, False
    issuer = (sig.issuer_fingerprint or sig.issuer_key_id or "").upper() or None
    certs = _certs(candidates)
    try:
        result = pysequoia.verify(bytes=data, store=lambda key_ids: certs, signature=sig)
    except (RuntimeError, ValueError):
        return issuer, False
    if not result.valid_sigs:
        return issuer, False
    return result.valid_sigs[0].certificate.upper(), True
