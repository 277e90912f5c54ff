"""Writes that a crash cannot tear, and a lock for folders: the one place where dinm replaces files.

* `replacing(path)`: yields a fresh temporary file beside `path`; on success it is given the mode of the file it
  replaces (or the umask's default for a new file), fsync'ed, renamed over `path`, and the folder fsync'ed. On any
  error (or a kill) `path` is untouched; the temporary file is removed, except after a kill -9, when it is left
  under a name that `is_temporary` recognises and the next writer of that folder removes (`remove_stale`).
* `new_folder(path)`: the same for a whole folder, which appears at once and complete or not at all.
* `locked(folder)`: an advisory lock (flock) on the folder itself (no lock file is created), exclusive for a
  writer and shared for a reader; every dinm write to a checkpoint holds it from reading to the commit point.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import secrets
import shutil
import sys
import time
from typing import Callable, Iterator

from .errors import DeltaError

# Crash injection for tests: called with the name of each write step just after it completed.
_after_step: Callable[[str], None] | None = None

_TEMPORARY = re.compile(r"^\..+\.dinm-[0-9a-f]{12}\.tmp$")
LOCK_WAIT = 600.0  # seconds a writer waits for another dinm process to finish with the same folder


def step(name: str) -> None:
    if _after_step is not None:
        _after_step(name)


def is_temporary(name: str) -> bool:
    """Whether a file or folder name is one of the temporary names `replacing` and `new_folder` use."""
    return bool(_TEMPORARY.match(name))


def temporary_beside(path: str) -> str:
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{name}.dinm-{secrets.token_hex(6)}.tmp")


def fsync(path: str) -> None:
    """Flush a file's or a folder's contents to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def mode_of(path: str) -> int | None:
    """The permission bits of `path` (of what a link points to), or None when it does not exist."""
    try:
        return os.stat(path).st_mode & 0o7777
    except FileNotFoundError:
        return None


@contextlib.contextmanager
def replacing(path: str, mode: int | None = None) -> Iterator[str]:
    """Write `path` whole or not at all: write to the yielded path. The result gets `mode`, else the mode of the
    file it replaces, else the default for a new file (0o666 less the umask)."""
    path = os.fspath(path)
    tmp = temporary_beside(path)
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    default = mode_of(tmp)  # 0o666 less the umask (mkstemp's would be 0o600)
    try:
        yield tmp  # (the writer may replace the file itself: the mode is set afterwards)
        for chosen in (mode, mode_of(path), default):
            if chosen is not None:
                os.chmod(tmp, chosen)
                break
        fsync(tmp)
        step("fsync")
        os.replace(tmp, path)  # a link at `path` (a Hugging Face cache snapshot) is replaced, its target kept
        step("replace")
        fsync(os.path.dirname(os.path.abspath(path)))
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def check_new_folder(path: str) -> str:
    """Refuse `path` as a folder to create when it exists or its parent does not (a one-line `DeltaError`);
    return the parent."""
    if os.path.lexists(path):
        raise DeltaError(f"output folder `{path}` exists; choose a new folder")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise DeltaError(f"output folder `{path}`: parent folder `{parent}` does not exist")
    return parent


@contextlib.contextmanager
def new_folder(path: str, mode: int | None = None) -> Iterator[str]:
    """Create the folder `path` whole or not at all: fill the yielded folder. Every file in it is fsync'ed before
    the folder is renamed to `path`; `mode` (else the umask's default) is the folder's."""
    path = os.fspath(path)
    parent = check_new_folder(path)
    tmp = temporary_beside(path)
    os.mkdir(tmp)
    try:
        yield tmp
        if mode is not None:
            os.chmod(tmp, mode)
        for root, _, files in os.walk(tmp):
            for name in files:
                fsync(os.path.join(root, name))
            fsync(root)
        step("fsync")
        if os.path.lexists(path):  # made by someone else meanwhile (rename would replace an empty folder)
            raise DeltaError(f"output folder `{path}` appeared while it was being written; nothing was written")
        os.rename(tmp, path)
        step("rename")
        fsync(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_stale(folder: str) -> list[str]:
    """Remove the temporary files a killed writer left in `folder` (call it only while holding `locked(folder)`,
    so that no live writer's file is taken). Returns their names."""
    removed = []
    for name in os.listdir(folder):
        if is_temporary(name):
            path = os.path.join(folder, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)
            removed.append(name)
    return removed


@contextlib.contextmanager
def locked(folder: str, *, shared: bool = False, wait: float = LOCK_WAIT, what: str = "checkpoint") -> Iterator[None]:
    """Hold an advisory lock on `folder` (exclusive, or `shared` for readers). Waits up to `wait` seconds for
    another process's lock, saying so once on stderr, then raises `DeltaError`."""
    fd = os.open(os.path.realpath(folder), os.O_RDONLY | os.O_DIRECTORY)
    try:
        deadline, said = time.monotonic() + wait, False
        while True:
            try:
                fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise DeltaError(f"{what} `{folder}` is being written by another process (waited {wait:g} s); "
                                     f"try again when it has finished") from None
                if not said:
                    print(f"dinm: waiting for another process writing {what} `{folder}` ...", file=sys.stderr)
                    said = True
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)  # releases the lock
