"""``intake storage``: encryption at rest (see :mod:`intake.store.sealing`): make a storage key,
see what is encrypted under which key, re-wrap every data key under a new key, encrypt content
stored before a key was set."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import click

from intake.cli.common import JSON_OPTION, Context, emit_json, fail
from intake.display import echo


@click.group("storage")
def storage_group() -> None:
    """Encryption at rest: keygen, status, rotate, encrypt-existing."""


@storage_group.command("keygen")
@click.argument("path", type=click.Path(path_type=Path, dir_okay=False))
def keygen(path: Path) -> None:
    """Write a new storage key to PATH (mode 0600); never replaces a file."""
    from intake.store import key_rotation

    try:
        key = key_rotation.write_storage_key(path)
    except FileExistsError:
        fail(f"{path} exists: a storage key is never overwritten (the content it opens would be lost)")
    except OSError as exc:
        fail(f"cannot write {path}: {exc.strerror}")
    echo(f"wrote storage key {key.id} to {path} (mode 0600); set [storage] key_file to it, keep a copy offline")


@storage_group.command("status")
@JSON_OPTION
@click.pass_obj
def status(obj: Context, as_json: bool) -> None:
    """Data keys per storage key, and rows whose content is still unencrypted."""
    from intake.store import key_rotation

    found = key_rotation.status(obj.engine(check_keys=False), obj.keyring)
    if as_json:
        emit_json(found)
        return
    echo(f"encryption {'on, storage key ' + found['current_key'] if found['enabled'] else 'off (no storage key set)'}")
    for row in found["data_keys"]:
        state = "current" if row["current"] else ("loaded" if row["loaded"] else "NOT LOADED")
        echo(f"  {row['count']} data key(s) under storage key {row['storage_key']} ({state})")
    for column, count in found["plaintext_rows"].items():
        echo(f"  {column}: {count} unencrypted row(s)")


@storage_group.command("rotate")
@click.option("--new-key", "new_key", type=click.Path(path_type=Path, dir_okay=False, exists=True),
              help="The storage key to re-wrap under (default: [storage] key_file); the configured keys "
                   "are read as the old ones.")
@click.option("--batch-size", default=500, show_default=True, type=click.IntRange(1, 100_000),
              help="Data keys per committed transaction.")
@click.pass_obj
def rotate(obj: Context, new_key: Path | None, batch_size: int) -> None:
    """Re-wrap every data key under the new storage key, a batch per transaction: safe to stop and
    run again, and while intake runs (both keys must be readable meanwhile: see README)."""
    from intake.store import key_rotation, sealing

    configured = obj.keyring
    if new_key is not None:
        try:
            target = key_rotation.read_storage_key(new_key)
        except sealing.SealingError as exc:
            fail(str(exc), 78)
        keyring = sealing.Keyring(target, tuple(k for k in (configured.current, *configured.previous)
                                                if k is not None and k.id != target.id))
    elif configured.enabled:
        keyring = configured
    else:
        fail("no storage key: give --new-key PATH or set [storage] key_file", 78)
    engine = sealing.attach(obj.engine(check_keys=False), keyring)
    try:
        done = key_rotation.rotate(engine, keyring, batch_size,
                              progress=lambda count: echo(f"re-wrapped {count} data key(s)"))
    except sealing.SealingError as exc:
        fail(str(exc), 78)
    echo(f"re-wrapped {done.rewrapped} data key(s) under storage key {keyring.current.id}; "
         f"{done.remaining} remain under other keys")
    if done.remaining:  # made under an old key meanwhile: a node still writes with it
        fail("some data keys are still under an old key (intake still writes with it?): set [storage] key_file "
             "to the new key on every node, then run this again")


@storage_group.command("encrypt-existing")
@click.option("--batch-size", default=200, show_default=True, type=click.IntRange(1, 100_000),
              help="Rows per committed transaction.")
@click.pass_obj
def encrypt_existing(obj: Context, batch_size: int) -> None:
    """Encrypt the content stored before a storage key was set, a batch per transaction: safe to
    stop and run again, and while intake runs."""
    from intake.store import key_rotation, sealing

    if not obj.keyring.enabled:
        fail("no storage key set ([storage] key_file): nothing to encrypt with", 78)
    try:
        done = key_rotation.encrypt_existing(obj.engine(), datetime.now(timezone.utc), batch_size)
    except sealing.SealingError as exc:
        fail(str(exc), 78)
    for column, count in done.items():
        echo(f"{column}: encrypted {count} row(s)")
