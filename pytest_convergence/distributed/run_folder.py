"""A distributed run's folder (rendezvous, batches, the workers' reports), which never outlives it.

The caller creates it and removes it when the run ends. A caller that is killed (a CI timeout's
SIGKILL) runs no cleanup: its workers then remove the folder as they exit
(:mod:`~pytest_convergence.distributed.supervision` has them watch the caller), and should they
be killed too, the next run removes every folder whose owner is gone.

Who owns a folder is an advisory lock (``flock``) on its ``owner.lock``, which the caller holds
for the length of the run: the kernel releases it when the caller dies, whatever kills it. No
pid is compared, so a reused pid, or another container sharing ``/tmp`` with pids of its own,
can never make a live run's folder look abandoned. Without ``fcntl`` (Windows) no lock is taken
and no folder is ever judged abandoned: the workers' own cleanup still applies.
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

__all__ = ["OWNER_FILE", "PREFIX", "remove_abandoned_folders", "remove_run_folder", "run_folder"]

PREFIX = "pytest-convergence-ddp-"
OWNER_FILE = "owner.lock"
# A worker still writing its last report while a peer removes the folder can leave it non-empty
# for a moment: a few tries, milliseconds apart.
_REMOVE_TRIES = 5


@contextlib.contextmanager
def run_folder() -> Iterator[Path]:
    """A fresh folder for one run, owned (locked) by this process until the block ends, then
    removed. Folders of runs whose owner died are removed first."""
    remove_abandoned_folders()
    folder = Path(tempfile.mkdtemp(prefix=PREFIX))
    owner = _take_ownership(folder)
    try:
        yield folder
    finally:
        # Removed while still locked, so that no other process's sweep races this one.
        remove_run_folder(folder)
        if owner is not None:
            os.close(owner)


def remove_run_folder(folder: Path) -> None:
    """Remove ``folder`` and everything in it, tolerating files that vanish or appear meanwhile."""
    for attempt in range(_REMOVE_TRIES):
        shutil.rmtree(folder, ignore_errors=True)
        if not folder.exists():
            return
        time.sleep(0.01 * (attempt + 1))


def remove_abandoned_folders(parent: Path | None = None) -> list[Path]:
    """Remove the run folders under ``parent`` (the temporary folder) whose owner is gone; those
    removed. A folder without an owner file (an older version's, or one being created) is left
    alone: nothing says its owner died."""
    if sys.platform == "win32":
        return []
    removed = []
    for folder in Path(parent or tempfile.gettempdir()).glob(PREFIX + "*"):
        try:
            lock = os.open(folder / OWNER_FILE, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # its owner holds the lock: the run is alive
        else:
            remove_run_folder(folder)
            removed.append(folder)
        finally:
            os.close(lock)
    return removed


def _take_ownership(folder: Path) -> int | None:
    """Lock ``folder``'s owner file for as long as the returned descriptor stays open.

    The file is locked under another name and then renamed, so that a sweep never finds an
    owner file that is not locked yet.
    """
    if sys.platform == "win32":
        return None
    partial = folder / (OWNER_FILE + ".partial")
    # Not inherited by subprocesses (PEP 446): only this process's death releases the lock.
    lock = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(lock, f"{os.getpid()}\n".encode())  # for a person looking at the folder
    os.replace(partial, folder / OWNER_FILE)
    return lock
