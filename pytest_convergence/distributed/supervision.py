"""Worker processes of a distributed run: start them, watch them, stop them, hear from them.

Built to never hang a test session: the parent watches its workers against a deadline, a
worker's exception and warnings come back through files in the run's folder, and stragglers
are terminated, then killed. Workers never fork the caller (its threads, locks and CUDA
context would be copied mid-flight): they come from a fork server that imported torch once,
or are spawned as fresh interpreters.

Workers die with their caller. A caller that is killed (a CI timeout's SIGKILL) runs none of
the above, and a fork server's children are not even its own, so no parent-death signal
reaches them; instead each worker watches the caller, and as soon as it is gone removes the
run's folder and ends itself. The fork server then exits by itself, as it does when its last
client is gone.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing import connection, get_all_start_methods, get_context, parent_process
from multiprocessing.context import ForkServerContext, SpawnContext
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any, TypeVar

from pytest_convergence.distributed.run_folder import remove_run_folder
from pytest_convergence.errors import DistributedRunError, DistributedWorkerWarning

__all__ = [
    "FAILURE_GRACE_S",
    "FORKSERVER_PRELOAD",
    "RESULT_FILE",
    "START_METHODS",
    "TERMINATE_GRACE_S",
    "World",
    "choose_start_method",
    "launch_and_wait",
    "progress_writer",
    "reissue_warnings",
    "write_atomically",
]

_Payload = TypeVar("_Payload")

START_METHODS = ("forkserver", "spawn")
# What a fork server imports once so that its workers start in milliseconds: torch, the
# optimizer machinery an optimizer's first step imports lazily (torch._dynamo: about 4 s of a
# fresh interpreter's start on a loaded machine), DDP and this package.
FORKSERVER_PRELOAD = ("torch", "torch._dynamo", "pytest_convergence.distributed")
# After the first worker fails, how long its peers get to report their own view before they are
# terminated. Peers blocked in a collective with the dead rank usually fail within milliseconds
# (connection closed); what they say is secondary, the first failure is the diagnosis.
FAILURE_GRACE_S = 2.0
# terminate() (SIGTERM), then kill() (SIGKILL) for a worker that ignores it.
TERMINATE_GRACE_S = 5.0
# What rank 0 leaves in the run's folder when it finished.
RESULT_FILE = "result.json"
_POLL_S = 0.5
_TAIL_LINES = 25
_EXCEPTION_LINE = re.compile(r"[A-Za-z_][\w.]*(: |$)")  # "RuntimeError: ...", "SystemExit"
# How often a worker looks for its caller by pid, besides waking the moment the caller's end of
# their pipe closes.
_WATCH_S = 1.0


@dataclass(frozen=True)
class World:
    """The processes of one run: how many, how they start, how long they may take, and the
    folder they report into (``what`` names the run in messages)."""

    folder: str
    world_size: int
    backend: str
    timeout_s: float
    start_method: str
    what: str


def choose_start_method(requested: str | None) -> str:
    """``forkserver`` where the platform has it, else ``spawn``; never ``fork``."""
    available = get_all_start_methods()
    if requested is None:
        return "forkserver" if "forkserver" in available else "spawn"
    if requested not in START_METHODS or requested not in available:
        raise ValueError(
            f"start_method must be one of {', '.join(m for m in START_METHODS if m in available)}"
            f", got {requested!r} (never 'fork': the caller's threads and CUDA context would be "
            "copied into the workers)"
        )
    return requested


def launch_and_wait(world: World, body: Callable[[int, _Payload], None], payload: _Payload) -> None:
    """Run ``body(rank, payload)`` in one process per rank; return when all succeeded, raise
    :class:`DistributedRunError` otherwise. Never leaves a worker running: every path ends with
    stragglers terminated, then killed. ``body`` must be a module-level function."""
    context: ForkServerContext | SpawnContext = (
        get_context("forkserver") if world.start_method == "forkserver" else get_context("spawn")
    )
    if isinstance(context, ForkServerContext):
        # Takes effect when this process first starts its fork server, and then for every
        # later run: the imports a worker needs are paid once per test process, not per rank.
        context.set_forkserver_preload(list(FORKSERVER_PRELOAD))
    processes: list[BaseProcess] = [
        context.Process(
            target=_worker,
            args=(rank, world, body, payload),
            name=f"pytest-convergence-ddp-rank{rank}",
            daemon=True,  # dies with the caller, whatever happens to it
        )
        for rank in range(world.world_size)
    ]
    started, launched_at = time.monotonic(), time.time()
    failed_at: dict[int, float] = {}  # rank -> wall-clock time it failed
    try:
        for process in processes:
            process.start()
        running = set(range(world.world_size))
        give_up_at = started + world.timeout_s
        while running and time.monotonic() < give_up_at:
            ready = connection.wait(
                [processes[rank].sentinel for rank in running],
                timeout=min(_POLL_S, max(0.0, give_up_at - time.monotonic())),
            )
            exited = {rank for rank in running if processes[rank].exitcode is not None}
            if ready and not exited:
                time.sleep(0.01)  # closed its end of the pipe, not reaped yet
            running -= exited
            for rank in exited:
                # Code 0 before the end is a failure too: user code ending its process early.
                if processes[rank].exitcode != 0 or not _finished(world, rank):
                    failed_at[rank] = _failure_time(world, rank, launched_at)
                    give_up_at = min(give_up_at, time.monotonic() + FAILURE_GRACE_S)
        stuck = {rank: _progress_of(world, rank) for rank in sorted(running)}
    finally:
        exitcodes = _stop(processes)
    elapsed = time.monotonic() - started
    if failed_at:
        # The root cause first: the rank that failed earliest; its peers then fail in the
        # collective it left (connection closed by peer) or are terminated.
        order = sorted(failed_at, key=lambda rank: (failed_at[rank], rank))
        raise _failure_error(world, exitcodes, order, stuck)
    if stuck:
        where = "; ".join(f"rank {rank} (at {place})" for rank, place in stuck.items())
        raise DistributedRunError(
            f"{world.what} did not finish within timeout_s={world.timeout_s:g} s "
            f"({world.world_size} ranks, {world.backend}); still running: {where}. "
            "Terminated. A rank waiting forever in a collective usually means another rank "
            "never reached it (a hook that blocks, or ranks issuing collectives in different "
            "orders)."
        )
    if not (Path(world.folder) / RESULT_FILE).exists():
        raise DistributedRunError(
            f"{world.what}: every rank exited cleanly after {elapsed:.1f} s but rank 0 sent "
            "no result",
            rank=0,
        )


def _failure_error(
    world: World,
    exitcodes: Sequence[int | None],
    failures: Sequence[int],
    stuck: dict[int, str],
) -> DistributedRunError:
    first = failures[0]
    exitcode = exitcodes[first]
    worker_error = _error_text(world, first)
    lines = [
        f"{world.what} failed: rank {first} {_describe_exit(exitcode)} "
        f"(at {_progress_of(world, first)})",
    ]
    if worker_error:
        lines.append(f"rank {first} raised:")
        lines.extend("  " + line for line in _tail(worker_error))
    elif exitcode == 0:
        lines.append(
            f"rank {first} sent no exception text: code running in it ended its process "
            "(os._exit(0), say)"
        )
    else:
        lines.append(f"rank {first} sent no exception text (killed, or crashed in native code)")
    for rank in failures[1:]:
        summary = _exception_line(_error_text(world, rank))
        last = f": {summary}" if summary else ""
        lines.append(f"then rank {rank} {_describe_exit(exitcodes[rank])}{last}")
    for rank, place in stuck.items():
        lines.append(f"rank {rank} was terminated (at {place})")
    return DistributedRunError(
        "\n".join(lines), rank=first, exitcode=exitcode, worker_error=worker_error
    )


def _error_record(world: World, rank: int) -> dict[str, Any]:
    text = _read(Path(world.folder) / f"error-{rank}.json")
    if not text:
        return {}
    record: dict[str, Any] = json.loads(text)
    return record


def _error_text(world: World, rank: int) -> str:
    return str(_error_record(world, rank).get("traceback", ""))


def _failure_time(world: World, rank: int, launched_at: float) -> float:
    """When ``rank`` failed: when it raised (its error file says), or, when it ended without a
    word (killed, crashed in native code, ``os._exit``), its last sign of life.

    Not the moment this process noticed a silent end: the peers notice it first, as their
    connection to the rank closes, and may have raised and written their error files by then.
    A silent end makes every peer raise after the last thing the silent rank wrote; a peer's
    exception, in turn, makes the others raise or wait until terminated, not vanish.
    """
    record = _error_record(world, rank)
    if "time" in record:
        return float(record["time"])
    try:
        return (Path(world.folder) / f"progress-{rank}.txt").stat().st_mtime
    except OSError:
        return launched_at


def _finished(world: World, rank: int) -> bool:
    """Whether ``rank``'s body returned (rather than its process ending in the middle)."""
    return (Path(world.folder) / f"finished-{rank}").exists()


def _describe_exit(exitcode: int | None) -> str:
    if exitcode is None:
        return "did not exit"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"was killed by {name}"
    if exitcode == 0:
        return "exited with code 0 before it finished"  # a failure only ever ends so early
    return f"exited with code {exitcode}"


def _stop(processes: Sequence[BaseProcess]) -> list[int | None]:
    """Terminate, then kill, every worker still running; reap them all; their exit codes."""
    alive = [p for p in processes if p.pid is not None and p.exitcode is None]
    for process in alive:
        process.terminate()
    deadline = time.monotonic() + TERMINATE_GRACE_S
    for process in alive:
        process.join(max(0.0, deadline - time.monotonic()))
    for process in alive:
        if process.exitcode is None:
            process.kill()
            process.join(TERMINATE_GRACE_S)
    # Not closed: Process.close() races with another thread's Process.start(), which polls
    # every child of this process; the objects release their pipes when collected.
    return [p.exitcode for p in processes]


def reissue_warnings(folder: Path, world_size: int) -> None:
    """Warnings raised in workers, issued here once each, naming the ranks that saw them."""
    seen: dict[tuple[str, str, str, int], list[int]] = {}
    for rank in range(world_size):
        path = folder / f"warnings-{rank}.json"
        if not path.exists():
            continue
        for category, message, filename, lineno in json.loads(path.read_text(encoding="utf-8")):
            seen.setdefault((category, message, filename, int(lineno)), []).append(rank)
    for (category, message, filename, lineno), ranks in seen.items():
        where = f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}"
        warnings.warn(
            DistributedWorkerWarning(f"{where}: {category}: {message} ({filename}:{lineno})"),
            stacklevel=3,
        )


def _progress_of(world: World, rank: int) -> str:
    return _read(Path(world.folder) / f"progress-{rank}.txt") or "starting the interpreter"


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8").strip()
    except OSError:
        return ""


def _tail(text: str, lines: int = _TAIL_LINES) -> list[str]:
    return [line for line in text.splitlines() if line.strip()][-lines:]


def _exception_line(traceback_text: str) -> str:
    """A traceback's last ``SomeError: message`` line, not its last line: torch ends some
    messages with an ``At:`` list of frames (a peer's lost connection, for one)."""
    lines = [line for line in traceback_text.splitlines() if line.strip()]
    for line in reversed(lines):
        if _EXCEPTION_LINE.match(line) and not line.startswith("Traceback "):
            return line
    return lines[-1] if lines else ""


def write_atomically(path: Path, text: str) -> None:
    """A worker's report file: its readers see all of it or none."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)


def progress_writer(world: World, rank: int) -> Callable[[str], None]:
    """Where ``rank`` says what it is doing, for the message if it hangs or dies."""

    def progress(text: str) -> None:
        write_atomically(Path(world.folder) / f"progress-{rank}.txt", text)

    return progress


def _worker(
    rank: int, world: World, body: Callable[[int, _Payload], None], payload: _Payload
) -> None:
    """Entry point of a worker: run, and report an exception and warnings as files."""
    folder = Path(world.folder)
    _die_with_the_caller(folder)
    with warnings.catch_warnings(record=True) as caught:
        # Every warning is recorded (once per place, as Python shows them) and handed to the
        # caller, whose filters then decide: nothing is silenced here.
        warnings.simplefilter("default")
        failed = False
        try:
            body(rank, payload)
        except BaseException:
            failed = True
            record = {"time": time.time(), "traceback": traceback.format_exc()}
            write_atomically(folder / f"error-{rank}.json", json.dumps(record))
        records = [[w.category.__name__, str(w.message), w.filename, w.lineno] for w in caught]
    write_atomically(folder / f"warnings-{rank}.json", json.dumps(records))
    if not failed:
        write_atomically(folder / f"finished-{rank}", "")
    # Everything the caller needs is on disk. Skip interpreter finalization: with torch loaded
    # it takes seconds (measured 2-4 s per worker on a loaded 2-core machine), and a spawned
    # child would otherwise pay it through ``sys.exit`` in ``multiprocessing.spawn``.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1 if failed else 0)


def _die_with_the_caller(folder: Path) -> None:
    """Watch the caller from a thread; once it is gone, remove the run's folder and end this
    worker (the caller's own cleanup will never run).

    Multiprocessing hands every worker the read end of a pipe whose write end the caller holds
    (the parent process's sentinel; under a fork server too, the caller being the parent it
    names). The kernel closes that end when the caller dies, however it dies, and the thread
    wakes at once. A parent-death signal would not do: a fork server's children are the fork
    server's. Checking the caller's pid every second (POSIX) also covers a caller whose end of
    the pipe lives on in a process it forked.
    """
    caller = parent_process()
    if caller is None:  # not started by multiprocessing: nobody to die with
        return

    def watch() -> None:
        while caller.is_alive() and _pid_alive(caller.pid):
            caller.join(_WATCH_S)
        remove_run_folder(folder)
        os._exit(1)

    threading.Thread(target=watch, name="pytest-convergence-caller-watch", daemon=True).start()


def _pid_alive(pid: int | None) -> bool:
    if pid is None or sys.platform == "win32":  # there, os.kill would end the process
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
