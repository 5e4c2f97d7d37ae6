"""SIGKILL the caller of a DDP co-simulation at chosen moments: how long until its processes are
gone, and whether its run folder is left behind.

Each run starts a fresh caller process (a CI job's pytest, in small) that runs a two-rank gloo
co-simulation of a 212-weight model, waits for the chosen moment, SIGKILLs the caller, and
watches every process that was below it (the fork server, the ranks, multiprocessing's
resource tracker) until all have ended, and the run's ``pytest-convergence-ddp-*`` folder until
it is gone. Moments:

- ``starting``: the folder exists, nothing is launched yet (the caller saving the batches);
- ``launching``: the fork server, or under spawn the ranks' interpreters, started and still
  importing torch; no rank has said anything yet;
- ``joining``: a rank is joining the process group or building its models;
- ``training``: both ranks past step 2 of a long run (every rank's hook sleeps 50 ms a step);
- ``hung``: rank 1 sleeping forever in its hook at step 1, rank 0 waiting for it in the
  all-reduce, as a CI timeout finds a hung run.

Afterwards, what is left in the runs' temporary folder is given to the sweep every run starts
with (``remove_abandoned_folders``), and what it removed is counted. The sweep removes a
half-made folder (a caller killed in the microseconds between making its folder and locking
it) only once it is a minute old; here, where the caller is known to be dead, it is run
without that wait.

    python benchmarks/killed_caller.py                      # 5 runs a moment, both start methods
    python benchmarks/killed_caller.py --runs 1 --moments hung --start-methods forkserver

Linux only: processes are read from /proc. Every process a run started is SIGKILLed at the end,
whatever happened.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch._C._distributed_c10d import GradBucket
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from pytest_convergence.distributed import DistributedHook, cosimulate_distributed
from pytest_convergence.distributed.run_folder import (
    HALF_MADE_PREFIX,
    PREFIX,
    remove_abandoned_folders,
)
from pytest_convergence.workloads import Workload, synthetic_classification

MOMENTS = ("starting", "launching", "joining", "training", "hung")
START_METHODS = ("forkserver", "spawn")
GONE_WITHIN_S = 30.0  # give up watching after this long


# --- the caller's side: a run to be killed ------------------------------------------------------


def tiny_model() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def _slow_hook(state: dict[str, Any], bucket: GradBucket) -> torch.futures.Future[torch.Tensor]:
    time.sleep(state["sleep_s"] if dist.get_rank() in state["ranks"] else 0.0)
    return default_hooks.allreduce_hook(state["group"], bucket)


def _slow_factory(
    group: dist.ProcessGroup, *, sleep_s: float, ranks: tuple[int, ...]
) -> tuple[object, Any]:
    return {"group": group, "sleep_s": sleep_s, "ranks": ranks}, _slow_hook


def call(moment: str, start_method: str) -> None:
    """The caller: a run that lasts long enough to be killed at ``moment``."""
    if moment == "hung":
        hook = DistributedHook(
            "sleeps-on-rank-1", functools.partial(_slow_factory, sleep_s=3600, ranks=(1,))
        )
    else:
        hook = DistributedHook(
            "sleeps-50ms", functools.partial(_slow_factory, sleep_s=0.05, ranks=(0, 1))
        )
    workload = Workload(
        name="killed-caller-tiny",
        model_factory=tiny_model,
        batches=synthetic_classification((8,), 4, batch_size=8),
        optimizer_factory=functools.partial(torch.optim.SGD, lr=0.1),
        steps=400,
    )
    cosimulate_distributed(workload, hook, timeout_s=600, start_method=start_method)


# --- the measuring side ---------------------------------------------------------------------------


def _stat(pid: int) -> tuple[str, int, str] | None:
    """State, parent pid and start time of a process (None when it is gone), from /proc."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text(encoding="ascii")
    except OSError:
        return None
    state, ppid, *rest = text.rsplit(")", 1)[1].split()
    return state, int(ppid), rest[17]


def _descendants(root: int) -> dict[int, str]:
    """Every process below ``root`` now, with its start time (pids are reused)."""
    stats = {int(p.name): _stat(int(p.name)) for p in Path("/proc").iterdir() if p.name.isdigit()}
    found: dict[int, str] = {}
    parents = {root}
    while parents:
        children = {pid: st for pid, st in stats.items() if st and st[1] in parents}
        found.update({pid: st[2] for pid, st in children.items()})
        parents = set(children) - {root}
        stats = {pid: st for pid, st in stats.items() if pid not in found}
    return found


def _running(processes: dict[int, str]) -> list[int]:
    """Those still running (a zombie has ended; it only waits to be reaped)."""
    return [
        pid
        for pid, started in processes.items()
        if (st := _stat(pid)) is not None and st[2] == started and st[0] not in "ZX"
    ]


def _with_environment(entry: str) -> dict[int, str]:
    """The processes whose environment holds ``entry``, with their start times."""
    found = {}
    for path in Path("/proc").iterdir():
        if not path.name.isdigit():
            continue
        try:
            environment = (path / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if entry.encode() in environment and (st := _stat(int(path.name))) is not None:
            found[int(path.name)] = st[2]
    return found


def _roles(caller: int, processes: dict[int, str]) -> dict[int, str]:
    """Which of ``processes`` are ranks: not the fork server or the resource tracker."""
    roles = {}
    for pid in processes:
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            command = ""
        st = _stat(pid)
        if "resource_tracker" in command:
            roles[pid] = "resource tracker"
        elif "forkserver" in command and st is not None and st[1] == caller:
            roles[pid] = "fork server"
        else:
            roles[pid] = "rank"
    return roles


def _progress(tmp: Path) -> list[str]:
    texts = []
    for path in tmp.glob(f"{PREFIX}*/progress-*.txt"):
        with contextlib.suppress(OSError):
            texts.append(path.read_text(encoding="utf-8"))
    return texts


def _step(text: str) -> int:
    return int(text.split()[1].rstrip(":")) if text.startswith("step ") else 0


def _launched(caller: int) -> bool:
    """Whether the caller has started a fork server or a spawned rank."""
    for pid in _descendants(caller):
        with contextlib.suppress(OSError):
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
            if b"forkserver" in command or b"spawn_main" in command:
                return True
    return False


def _reached(moment: str, tmp: Path, caller: int) -> bool:
    folders, progress = list(tmp.glob(f"{PREFIX}*")), _progress(tmp)
    if moment == "starting":
        return bool(folders)
    if moment == "launching":
        return bool(folders) and not progress and _launched(caller)
    if moment == "joining":
        return any(t in ("joining the process group", "building the models") for t in progress)
    if moment == "training":
        return len(progress) == 2 and all(_step(t) > 2 for t in progress)
    return len(progress) == 2 and all(t.startswith("step 1: candidate") for t in progress)


def measure(moment: str, start_method: str, tmp: Path) -> dict[str, Any]:
    """One run killed at ``moment``: what was below the caller, and how long until it ended."""
    env = dict(os.environ, TMPDIR=str(tmp))
    here = Path(__file__).resolve().parent
    code = f"import sys; sys.path.insert(0, {str(here)!r}); import killed_caller; "
    code += f"killed_caller.call({moment!r}, {start_method!r})"
    with (tmp / "caller.log").open("w") as log:
        caller = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=log, stderr=log)
    processes: dict[int, str] = {}
    try:
        deadline = time.monotonic() + 300
        while not _reached(moment, tmp, caller.pid):
            if caller.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{moment}: never reached\n{(tmp / 'caller.log').read_text()}")
            time.sleep({"starting": 0.005, "launching": 0.02, "joining": 0.005}.get(moment, 0.05))
        processes = _descendants(caller.pid)
        roles = _roles(caller.pid, processes)
        caller.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        caller.wait()
        ended: dict[int, float] = {}
        folder_gone_after = None
        for polls in itertools.count():
            now = time.monotonic() - killed
            if now > GONE_WITHIN_S:
                break
            if polls % 20 == 0:
                # Started by the caller after the look above, since reparented: it has the
                # caller's environment.
                late = _with_environment(f"TMPDIR={tmp}")
                processes.update({pid: st for pid, st in late.items() if pid not in processes})
            still = set(_running(processes))
            ended.update({pid: now for pid in processes if pid not in still and pid not in ended})
            if folder_gone_after is None and not list(tmp.glob(f"{PREFIX}*")):
                folder_gone_after = now
            last = max(ended.values(), default=0.0)
            if not still and (folder_gone_after is not None or now > last + 1.0):
                break  # everything ended, and the folder is gone or nobody is left to remove it
            time.sleep(0.01)
        ranks = [pid for pid, role in roles.items() if role == "rank"]
        return {
            "ranks": len(ranks),
            "ranks_gone_after": max((ended.get(pid, math.inf) for pid in ranks), default=None),
            "all_gone_after": max((ended.get(pid, math.inf) for pid in processes), default=0.0),
            "folder_gone_after": folder_gone_after,
            "left": len(list(tmp.glob(f"{PREFIX}*"))),
            "half_made": len(list(tmp.glob(f"{HALF_MADE_PREFIX}*"))),
        }
    finally:
        processes = processes or _descendants(caller.pid)  # failed before it looked
        caller.kill()
        caller.wait()
        for pid in _running(processes):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _seconds(values: list[float]) -> str:
    if not values:
        return f"{'-':>6} {'-':>6}"
    return f"{statistics.median(values):>6.2f} {max(values):>6.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="runs per moment and start method")
    parser.add_argument("--moments", nargs="+", choices=MOMENTS, default=list(MOMENTS))
    parser.add_argument(
        "--start-methods", nargs="+", choices=START_METHODS, default=list(START_METHODS)
    )
    arguments = parser.parse_args()
    if not Path("/proc/self/stat").exists():
        sys.exit("reads processes from /proc: Linux only")
    print("seconds from the SIGKILL until the ranks, then every process below the caller, had")
    print("ended, and until the run's folder was gone (median, max; inf: still running after")
    print(f"{GONE_WITHIN_S:g} s; -: none); folders left once every process had ended (of which")
    print("half-made), and how many of them the sweep a run starts with removed")
    print(
        f"{'start method':<12} {'moment':<9} {'runs':>4} {'ranks':>5}  {'ranks gone':>13}  "
        f"{'all gone':>13}  {'folder gone':>13}  {'left (half-made)':>16}  swept"
    )
    total_left = total_swept = 0
    for start_method in arguments.start_methods:
        for moment in arguments.moments:
            results = []
            swept = 0
            for _ in range(arguments.runs):
                with tempfile.TemporaryDirectory(prefix="killed-caller-") as name:
                    results.append(measure(moment, start_method, Path(name)))
                    swept += len(remove_abandoned_folders(Path(name), half_made_after_s=0))
            left = sum(r["left"] for r in results)
            half_made = sum(r["half_made"] for r in results)
            ranks = sorted({r["ranks"] for r in results})
            rank_times = [r["ranks_gone_after"] for r in results if r["ranks"]]
            folder_times = [
                r["folder_gone_after"] for r in results if r["folder_gone_after"] is not None
            ]
            print(
                f"{start_method:<12} {moment:<9} {len(results):>4} "
                f"{'/'.join(map(str, ranks)):>5}  {_seconds(rank_times)}  "
                f"{_seconds([r['all_gone_after'] for r in results])}  "
                f"{_seconds(folder_times)}  {f'{left} ({half_made})':>16}  {swept:>5}",
                flush=True,
            )
            total_left, total_swept = total_left + left, total_swept + swept
    print(f"folders left after the kills: {total_left}; removed by the next run: {total_swept}")


if __name__ == "__main__":
    main()
