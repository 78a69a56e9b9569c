"""Atomic file writes: a reader sees the old file or the new one, never a torn one.

The recipe: write a temp file in the *same* directory (so ``os.replace`` is a rename on one
filesystem, which POSIX makes atomic), flush and fsync it (so the bytes are on disk before
the name points at them), ``os.replace`` it over the target, then fsync the directory (so
the rename itself survives a power cut).

A write that fails because of the machine (disk full, read-only file system, permissions,
file-size limit) raises :class:`StorageError`: the message names the path, the cause and
what to do, and says the previous file is unchanged (it is: the temp file is removed and
the target was never touched).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

# errno -> what the person running the pipeline should do about it.
_ADVICE = {
    errno.ENOSPC: "the disk is full: free space on it, or point RECSYS_HOME at a disk with room, and rerun",
    errno.EDQUOT: "the disk quota is used up: free space, or point RECSYS_HOME elsewhere, and rerun",
    errno.EROFS: (
        "the file system is mounted read-only: remount it read-write, or point RECSYS_HOME at a "
        "writable folder, and rerun"
    ),
    errno.EACCES: (
        "permission denied: give this user write access to the folder, or point RECSYS_HOME at a "
        "folder it owns, and rerun"
    ),
    errno.EPERM: (
        "the operation is not permitted (an immutable file or folder?): lift the restriction, or "
        "point RECSYS_HOME elsewhere, and rerun"
    ),
    errno.EFBIG: "the file-size limit was reached (ulimit -f): raise it and rerun",
    errno.ENOTDIR: "a file stands where a folder is needed: move that file away and rerun",
}
STORAGE_ERRNOS = frozenset(_ADVICE)


class StorageError(OSError):
    """A write failed because of where it writes (full, read-only, not permitted).

    An ``OSError`` (``errno`` is kept), with a message that names the path and the fix.
    """

    def __init__(self, message: str, err: int | None, path: Path | str):
        super().__init__(message)
        self.errno = err
        self.path = str(path)

    def __str__(self) -> str:
        return str(self.args[0])


def storage_error(exc: OSError, path: Path | str, kept: str = "") -> StorageError:
    """Explain ``exc`` (an ``OSError`` of a write to ``path``); ``kept`` says what was left intact."""
    where = exc.filename if exc.filename and str(exc.filename) != str(path) else None
    target = Path(path)
    if where and Path(where).parent == target.parent and Path(where).name.startswith(f".{target.name}."):
        where = None  # our own temp file beside the target: its name would only confuse
    cause = exc.strerror or str(exc)
    advice = _ADVICE.get(exc.errno, "check that the folder exists and is writable, and rerun")
    text = f"Cannot write {path}" + (f" (at {where})" if where else "") + f": {cause}; {advice}."
    return StorageError(text + (f" {kept}" if kept else ""), exc.errno, path)


def is_storage_failure(exc: BaseException) -> bool:
    """True for an ``OSError`` caused by the storage (full, read-only, not permitted...)."""
    return isinstance(exc, OSError) and exc.errno in STORAGE_ERRNOS


# How libraries that wrap the OS error in their own exception (DuckDB, Arrow) word it.
_MESSAGE_ERRNOS = {
    "No space left on device": errno.ENOSPC,
    "Disk quota exceeded": errno.EDQUOT,
    "Read-only file system": errno.EROFS,
    "Permission denied": errno.EACCES,
    "File too large": errno.EFBIG,
}


def storage_errno(exc: BaseException) -> int | None:
    """The errno of a storage failure behind ``exc`` (an ``OSError``, or a DuckDB/Arrow error
    whose message carries the OS's words), else None."""
    if is_storage_failure(exc):
        return exc.errno
    text = str(exc)
    return next((err for words, err in _MESSAGE_ERRNOS.items() if words in text), None)


def wrapped_storage_error(exc: BaseException, path: Path | str, kept: str = "") -> StorageError | None:
    """:func:`storage_error` for a library's exception that hides a storage failure, else None."""
    err = storage_errno(exc)
    if err is None:
        return None
    if is_storage_failure(exc):
        return storage_error(exc, path, kept)
    base = storage_error(OSError(err, os.strerror(err)), path, kept)
    first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
    return StorageError(f"{base} (from {type(exc).__name__}: {first})", err, path)


def fsync_dir(path: Path) -> None:
    """fsync a directory so a rename or create inside it is durable (no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open a directory; the rename is still atomic there
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def umask() -> int:
    """The process's umask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def publishable_mode(fd_or_path: int | str | Path, directory: bool = False) -> None:
    """Give a file or folder made by ``mkstemp``/``mkdtemp`` (0600/0700, private on purpose
    while it is written) the mode an ordinary ``open``/``mkdir`` would have (the umask applies),
    so a serving process running as another user can read what is handed off."""
    mode = (0o777 if directory else 0o666) & ~umask()
    if isinstance(fd_or_path, int):
        os.fchmod(fd_or_path, mode)
    else:
        os.chmod(fd_or_path, mode)


def atomic_write_with(path: Path | str, write: Callable[[BinaryIO], object]) -> Path:
    """Call ``write(handle)`` on a temp file beside ``path``, then move it over ``path`` atomically.

    For writers that stream into a file handle (``torch.save``); creates parent folders.

    Raises:
        StorageError: the disk is full, read-only or not writable; ``path`` is unchanged. A
            library that wraps the ``OSError`` in its own exception (torch wraps a full disk
            in a ``RuntimeError``) is looked through.
    """
    path = Path(path)
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        publishable_mode(fd)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        # The temp file is hidden, but a dead one would still pile up: remove it, re-raise.
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        cause = exc if isinstance(exc, OSError) else exc.__cause__ or exc.__context__
        if cause is not None and is_storage_failure(cause):
            raise storage_error(cause, path, kept=_kept(path)) from exc
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: Path | str, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically, creating parent folders; returns the path.

    Raises:
        StorageError: the disk is full, read-only or not writable; ``path`` is unchanged.
    """
    return atomic_write_with(path, lambda f: f.write(data))


def _kept(path: Path) -> str:
    return f"The previous {path.name} is unchanged." if path.exists() else f"No {path.name} was written."


def atomic_write_text(path: Path | str, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically (see module docstring)."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path | str, obj: Any) -> Path:
    """Write ``obj`` as indented, key-sorted JSON (stable diffs) atomically.

    ``allow_nan=False``: NaN/Infinity are not JSON and other languages' parsers reject them,
    so a NaN metric fails here, loudly, instead of in the serving team's reader.
    """
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n")


# Locks this thread holds, by path: a holder that calls a function which takes the same lock
# again (promote_blessed -> promote) must not wait for itself. Another thread or process opens
# the file anew, and flock() then makes it wait, as it should.
_held = threading.local()


@contextlib.contextmanager
def exclusive_lock(path: Path | str, on_wait: Callable[[str], object] | None = None) -> Iterator[None]:
    """Hold an exclusive OS lock (``flock``) on ``path`` for the ``with`` block.

    The kernel releases it when the holder exits, killed or not, so a dead process never
    blocks the next one. Re-entrant within one thread. ``on_wait`` is told (once) when another
    holder has the lock and this one waits for it.
    """
    lock_path = Path(path)
    key = str(lock_path.resolve())
    held: set[str] = _held.__dict__.setdefault("paths", set())
    if key in held:
        yield
        return
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(lock_path, "a+")  # noqa: SIM115 (closed below)
    except OSError as exc:
        if not is_storage_failure(exc):
            raise
        if not lock_path.is_file():
            # Nothing can be written beside it either (read-only or not ours): the caller's
            # own write fails with a clear StorageError, and there is no writer to exclude.
            yield
            return
        handle = open(lock_path)  # noqa: SIM115 (flock works on a read-only descriptor too)
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait(f"waiting for {lock_path}: another run holds it")
            fcntl.flock(handle, fcntl.LOCK_EX)
        held.add(key)
        try:
            yield
        finally:
            held.discard(key)
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def folder_lock(folder: Path | str, shared: bool = True, wait: bool = True) -> Iterator[bool]:
    """Hold an OS lock (``flock``) on the folder itself for the ``with`` block; yields whether it
    is held.

    Readers and writers of a folder take it shared and coexist; storage retention takes it
    exclusive, without waiting (``wait=False``), before it moves the folder away, and skips the
    folder when it is held. The lock is on the folder's inode, not its name, so once granted the
    name is checked again: False also means the folder does not exist, or was moved or removed
    while this holder waited. The kernel releases the lock when the holder exits, killed or not.
    """
    path = Path(folder)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except (FileNotFoundError, NotADirectoryError):
        yield False
        return
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if wait else fcntl.LOCK_NB))
        except OSError:  # held by another (LOCK_NB), or a file system without locks: not held
            yield False
            return
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except OSError:
            same = False
        yield same
    finally:
        os.close(fd)  # closing the descriptor releases the lock
