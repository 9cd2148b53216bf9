"""Files and folders no other user can read, whatever the umask: the database, the outbox,
backups, attachments and drafts written by the CLI all hold reports.

The systemd unit sets ``UMask=0007``; ``scripts/serve``, a cron job or a maintainer's shell
usually has 022, under which a plain ``open`` makes 0644 files. So everything intake creates
that holds mail gets an explicit mode (set again with ``chmod``, as a umask can take bits away
from the mode given to ``open``):

* private, 0600 files in 0700 folders: the outbox Maildir, attachments and drafts the CLI writes;
* shared with the group, 0660 files in 0770 folders: the SQLite database (its -wal and -shm take
  its mode), its writer lock and backups, so maintainers in the service's group (``intake``) run
  the CLI from their own accounts. Such a file takes its folder's group, as in a setgid folder.

Files and folders that exist already keep the mode their owner gave them.
"""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Iterable
from pathlib import Path

FILE_MODE = 0o600
DIRECTORY_MODE = 0o700
SHARED_FILE_MODE = 0o660
SHARED_DIRECTORY_MODE = 0o770


def private_directory(path: Path, mode: int = DIRECTORY_MODE) -> None:
    """Create *path*, and any missing parents, with *mode* (0700, or 0770 for shared ones)."""
    missing = []
    for folder in [path, *path.parents]:
        if folder.is_dir():
            break
        missing.append(folder)
    for folder in reversed(missing):
        try:
            folder.mkdir(mode)
        except FileExistsError:
            continue  # another process made it meanwhile
        os.chmod(folder, mode)


def shared_directory(path: Path) -> None:
    """Create *path*, and any missing parents, 0770: for the database and backups."""
    private_directory(path, SHARED_DIRECTORY_MODE)


def create_shared_file(path: Path) -> None:
    """Create *path* empty, 0660 and of its folder's group, unless it exists: before SQLite opens a
    database, which it would create 0644 under umask 022 (its -wal and -shm files are given the
    database file's mode); the database's writer lock; a backup."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, SHARED_FILE_MODE)
    except FileExistsError:
        return
    try:
        os.fchmod(fd, SHARED_FILE_MODE)
        _take_folder_group(fd, path)
    finally:
        os.close(fd)


def _take_folder_group(fd: int, path: Path) -> None:
    """Give the file *fd* its folder's group (a maintainer's primary group is not the service's):
    allowed to its owner when a member of that group; otherwise it keeps the owner's group."""
    group = os.stat(path.parent).st_gid
    if os.fstat(fd).st_gid != group:
        give_group(fd, group)


def write_private(path: Path, data: bytes, *, replace: bool, staging: Path | None = None) -> None:
    """Write *data* to *path*, 0600, never through a symbolic link (see :func:`write_new_file`)."""
    write_new_file(path, data, replace=replace, staging=staging)


def write_new_file(path: Path, data: bytes, *, replace: bool, mode: int = FILE_MODE, group: int | None = None,
                   staging: Path | None = None) -> bool:
    """Write *data* to *path* with *mode*, never through a symbolic link; returns whether the file
    was given *group* (possible for root, or a member of it; otherwise it keeps the writer's).

    The bytes go to a new file beside *path* (or in *staging*, a folder on the same file system:
    a Maildir's tmp/), fsync'd, then take its name: renamed over an existing file
    when *replace* (the old file's mode and links are not kept), else linked, which fails with
    :class:`FileExistsError` if *path* exists. A symbolic link at *path* is refused
    (:class:`SymlinkRefused`), even when *replace*; one put there meanwhile is replaced, not
    followed: neither ``rename`` nor ``link`` follows a link at the new name."""
    if path.is_symlink():
        raise SymlinkRefused(f"{path} is a symbolic link (not followed, not replaced)")
    fd, temporary = tempfile.mkstemp(dir=staging or path.parent, prefix=f".{path.name}.", suffix=".partial")
    grouped = False
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), mode)
            grouped = group is not None and give_group(handle.fileno(), group)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if replace:
            os.replace(temporary, path)
        else:
            os.link(temporary, path)
    finally:
        Path(temporary).unlink(missing_ok=True)
    return grouped


def give_group(target: Path | int, group: int) -> bool:
    """Give the file or folder *target* (a path or an open descriptor) *group*; False when the
    writer may not (neither root nor a member of it)."""
    try:
        os.chown(target, -1, group)
    except PermissionError:
        return False
    return True


def exposed(paths: Iterable[Path]) -> list[str]:
    """A warning for each of *paths* (shared with the group) that exists and that other users may
    use: made by an earlier intake, or under a umask, before intake set modes itself."""
    warnings = []
    for path in paths:
        try:
            mode = stat.S_IMODE(path.stat().st_mode)
        except FileNotFoundError:
            continue
        if mode & 0o007:
            warnings.append(f"{path} is open to other users (mode {mode:04o}) and holds reports: chmod o= {path}")
    return warnings


class SymlinkRefused(OSError):
    """The file to write is a symbolic link."""
