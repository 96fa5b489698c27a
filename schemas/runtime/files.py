"""Putting a file or a folder into place atomically: readers see the old one or the complete new one, never a
half-written one, and the move survives a crash (the data and the rename are fsynced).

The one definition both packages use: the trainer's manifests, datasets, reports and adapters, and the broker
helper's private files (secrets, certificates).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (POSIX: the directory entry lives in the directory's inode)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: a temp file in the same folder (created 0600, so never readable by
    others in between), fsync, ``os.replace``, fsync the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def move_into_place(src: Path, dest: Path) -> Path:
    """Move a finished file or folder ``src`` to ``dest`` with one rename, then fsync ``dest``'s folder. An
    existing ``dest`` (a previous attempt) is renamed away first and deleted, so ``dest`` either does not exist
    or is complete. ``src`` must be on the same file system as ``dest``."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists():
        trash = dest.with_name(f".{dest.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(dest, trash)
        if trash.is_dir():
            shutil.rmtree(trash, ignore_errors=True)
        else:
            trash.unlink(missing_ok=True)
    os.replace(src, dest)
    fsync_dir(dest.parent)
    return dest
