"""A distributed run's folder (rendezvous, batches, the workers' reports), which never outlives it.

The caller creates it and removes it when the run ends. A caller that is killed (a CI timeout's
SIGKILL) runs no cleanup: its workers then remove the folder as they exit
(:mod:`~pytest_convergence.distributed.supervision` has them watch the caller), and should they
be killed too, the next run removes every folder whose owner is gone.

Who owns a folder is an advisory lock (``flock``) on its ``owner.lock``, which the caller holds
for the length of the run: the kernel releases it when the caller dies, whatever kills it. No
pid is compared, so a reused pid, or another container sharing ``/tmp`` with pids of its own,
can never make a live run's folder look abandoned. A folder is made under another name and
renamed once its owner file is locked; a half-made one a minute old lost its creator in those
microseconds. Without ``fcntl`` (Windows) no lock is taken and no folder is ever judged
abandoned: the workers' own cleanup still applies.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

if sys.platform != "win32":
    import fcntl

__all__ = [
    "HALF_MADE_AFTER_S",
    "HALF_MADE_PREFIX",
    "OWNER_FILE",
    "PREFIX",
    "remove_abandoned_folders",
    "remove_run_folder",
    "run_folder",
]

PREFIX = "pytest-convergence-ddp-"
OWNER_FILE = "owner.lock"
# Where a folder is made, before it is owned and renamed to PREFIX + the same random part.
# (mkdtemp's random part has no hyphen: no finished folder's name starts with this.)
HALF_MADE_PREFIX = PREFIX + "new-"
# A half-made folder becomes a run's within microseconds, unless its creator died in between:
# one this old was abandoned.
HALF_MADE_AFTER_S = 60.0
# A worker still writing its last report while a peer removes the folder can leave it non-empty
# for a moment: a few tries, milliseconds apart.
_REMOVE_TRIES = 5


@contextlib.contextmanager
def run_folder() -> Iterator[Path]:
    """A fresh folder for one run, owned (locked) by this process until the block ends, then
    removed. Folders of runs whose owner died are removed first."""
    remove_abandoned_folders()
    half_made = Path(tempfile.mkdtemp(prefix=HALF_MADE_PREFIX))
    folder = half_made.with_name(PREFIX + half_made.name[len(HALF_MADE_PREFIX) :])
    path, owner = half_made, None
    try:
        owner = _take_ownership(half_made)
        # Only an owned folder ever has a run's name: a sweep never finds one not locked yet.
        os.rename(half_made, folder)
        path = folder
        yield folder
    finally:
        # Removed while still locked, so that no other process's sweep races this one.
        remove_run_folder(path)
        if owner is not None:
            os.close(owner)


def remove_run_folder(folder: Path) -> None:
    """Remove ``folder`` and everything in it, tolerating files that vanish or appear meanwhile."""
    for attempt in range(_REMOVE_TRIES):
        shutil.rmtree(folder, ignore_errors=True)
        if not folder.exists():
            return
        time.sleep(0.01 * (attempt + 1))


def remove_abandoned_folders(
    parent: Path | None = None, half_made_after_s: float = HALF_MADE_AFTER_S
) -> list[Path]:
    """Remove the run folders under ``parent`` (the temporary folder) whose owner is gone, and
    half-made ones older than ``half_made_after_s``; those removed. A folder without an owner
    file (an older version's) is left alone: nothing says its owner died."""
    if sys.platform == "win32":
        return []
    removed = []
    for folder in Path(parent or tempfile.gettempdir()).glob(PREFIX + "*"):
        if folder.name.startswith(HALF_MADE_PREFIX):
            abandoned = _age_s(folder) > half_made_after_s
        else:
            abandoned = _unlocked(folder / OWNER_FILE)
        if abandoned:
            remove_run_folder(folder)
            removed.append(folder)
    return removed


def _age_s(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return 0.0


def _unlocked(owner_file: Path) -> bool:
    """Whether nobody holds ``owner_file``'s lock (False when there is no such file)."""
    try:
        lock = os.open(owner_file, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False  # its owner holds it: the run is alive
    else:
        return True
    finally:
        os.close(lock)


def _take_ownership(folder: Path) -> int | None:
    """Lock ``folder``'s owner file for as long as the returned descriptor stays open."""
    if sys.platform == "win32":
        return None
    # Not inherited by subprocesses (PEP 446): only this process's death releases the lock.
    lock = os.open(folder / OWNER_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(lock, f"{os.getpid()}\n".encode())  # for a person looking at the folder
    return lock
