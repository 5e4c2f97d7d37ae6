"""Real multi-process DDP co-simulation: exactness, a real bug, and workers that fail, hang, or
lose their caller.

Nine launches of two workers each (two of them at once, which is also the collision test) on a
two-layer model and three steps, and one more in a caller process that the test kills.
Workers come from a fork server that imports torch once per test process, so a launch costs
about a second after the first; one test spawns fresh interpreters instead (seconds), to cover
that start method too, and the killed caller starts a fork server of its own.
"""

from __future__ import annotations

import contextlib
import functools
import multiprocessing
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch._C._distributed_c10d import GradBucket
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from pytest_convergence.candidates import Candidate, mean_exchange
from pytest_convergence.checks import BoundCheck, ConvergenceChecker
from pytest_convergence.config import ConvergenceConfig
from pytest_convergence.cosim import cosimulate
from pytest_convergence.distributed import (
    DistributedHook,
    DistributedRunError,
    DistributedWorkerWarning,
    allreduce_hook,
    check_distributed,
    cosimulate_distributed,
    fp16_compress_hook,
    int8_hook,
    powersgd_hook,
)
from pytest_convergence.distributed.run_folder import (
    HALF_MADE_AFTER_S,
    HALF_MADE_PREFIX,
    OWNER_FILE,
    PREFIX,
    remove_abandoned_folders,
    run_folder,
)
from pytest_convergence.traces import CoSimulation
from pytest_convergence.workloads import Workload, get_workload, sgd, synthetic_classification
from pytest_convergence.zoo.candidates import last_partition_parameters

Hook = Callable[[dist.ProcessGroup, GradBucket], torch.futures.Future[torch.Tensor]]
STEPS = 3
PARTITIONS = 4
WRONG_SCALE = 1.05


def tiny_model() -> nn.Module:
    """212 weights: 0.weight (128), 0.bias (16), 2.weight (64), 2.bias (4)."""
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


# Module-level factories pickle by reference, so the spawned workers can rebuild the workload.
# Plain SGD (no momentum, no decay): a scaled gradient shows as exactly that bias.
TINY = Workload(
    name="ddp-tiny",
    model_factory=tiny_model,
    batches=synthetic_classification((8,), 4, batch_size=8),
    optimizer_factory=functools.partial(torch.optim.SGD, lr=0.1),
    steps=STEPS,
)


def _raise_on_rank_1(
    group: dist.ProcessGroup, bucket: GradBucket
) -> torch.futures.Future[torch.Tensor]:
    if dist.get_rank() == 1:
        raise RuntimeError("injected failure in the comm hook")
    return default_hooks.allreduce_hook(group, bucket)


def _sleep_on_rank_1(
    group: dist.ProcessGroup, bucket: GradBucket
) -> torch.futures.Future[torch.Tensor]:
    if dist.get_rank() == 1:
        time.sleep(3600)
    return default_hooks.allreduce_hook(group, bucket)


def _raising_factory(group: dist.ProcessGroup) -> tuple[object, Hook]:
    return group, _raise_on_rank_1


def _sleeping_factory(group: dist.ProcessGroup) -> tuple[object, Hook]:
    return group, _sleep_on_rank_1


def _factory_raising_on_rank_1(group: dist.ProcessGroup) -> tuple[object, Hook]:
    if dist.get_rank() == 1:
        raise ValueError("injected failure while building the hook")
    return group, default_hooks.allreduce_hook


RAISING = DistributedHook("raises-on-rank-1", _raising_factory)
SLEEPING = DistributedHook("sleeps-on-rank-1", _sleeping_factory)
RAISING_EARLY = DistributedHook("factory-raises-on-rank-1", _factory_raising_on_rank_1)


def _exit_on_rank_1_at_step_2(
    state: dict[str, Any], bucket: GradBucket
) -> torch.futures.Future[torch.Tensor]:
    state["calls"] += 1  # the tiny model fills one bucket: one call a step
    if dist.get_rank() == 1 and state["calls"] == 2:
        if state["how"] == "os._exit(0)":
            os._exit(0)
        sys.exit(0)
    return default_hooks.allreduce_hook(state["group"], bucket)


def _exiting_factory(group: dist.ProcessGroup, *, how: str) -> tuple[object, Hook]:
    return {"group": group, "how": how, "calls": 0}, _exit_on_rank_1_at_step_2


def _warning_factory(group: dist.ProcessGroup) -> tuple[object, Hook]:
    warnings.warn("this hook is experimental", UserWarning, stacklevel=1)
    return group, default_hooks.allreduce_hook


WARNING = DistributedHook("warns", _warning_factory)


@pytest.fixture(scope="module")
def runs() -> dict[str, CoSimulation]:
    """The exact hook and the paper's bug, launched at once from two threads: four workers and
    two rendezvous folders alive together, as under pytest-xdist."""
    hooks = [allreduce_hook(), int8_hook(PARTITIONS, last_partition_scale=WRONG_SCALE)]
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {
            hook.name: pool.submit(cosimulate_distributed, TINY, hook, timeout_s=120)
            for hook in hooks
        }
        return {name: future.result() for name, future in futures.items()}


def test_two_runs_at_once_do_not_collide(runs: dict[str, CoSimulation]) -> None:
    assert sorted(runs) == ["ddp-allreduce-hook", "ddp-int8-hook-4-last-x1.05"]
    for name, run in runs.items():
        assert run.candidate == name
        assert [c.step for c in run.comparisons] == list(range(1, STEPS + 1))


def test_the_allreduce_hook_has_exactly_zero_error(runs: dict[str, CoSimulation]) -> None:
    run = runs["ddp-allreduce-hook"]
    for comparison in run.comparisons:
        assert comparison.candidate_loss == comparison.reference_loss
        for parameter in comparison.parameters:
            assert (parameter.bias, parameter.noise, parameter.error_norm) == (0.0, 0.0, 0.0)
            assert parameter.reference_update_norm > 0


def test_the_ddp_reference_is_a_mean_exchange_over_two_workers(
    runs: dict[str, CoSimulation],
) -> None:
    """DDP over 2 ranks trains exactly like the single-process mean exchange over 2 virtual
    workers, up to float32 summation order: why the single-process region applies to it."""
    single = cosimulate(TINY, Candidate("mean-2", exchange=mean_exchange, workers=2))
    distributed = runs["ddp-allreduce-hook"]
    assert len(distributed.reference.steps) == len(single.reference.steps) == STEPS + 1
    for ours, theirs in zip(distributed.reference.steps, single.reference.steps, strict=True):
        if theirs.loss is not None:
            assert ours.loss == pytest.approx(theirs.loss, rel=1e-6)
        assert ours.global_logm == pytest.approx(theirs.global_logm, abs=1e-6)
        for a, b in zip(ours.parameters, theirs.parameters, strict=True):
            assert a.name == b.name
            assert a.weight_norm == pytest.approx(b.weight_norm, rel=1e-6)
            assert a.update_norm == pytest.approx(b.update_norm, rel=1e-5, abs=1e-9)
            if b.grad_norm is not None:
                assert a.grad_norm == pytest.approx(b.grad_norm, rel=1e-5)


def test_the_wrong_int8_scale_biases_exactly_the_last_partition(
    runs: dict[str, CoSimulation],
) -> None:
    """The LoGM paper's bug through a real hook: +5% on the parameters of each bucket's last
    partition, nothing elsewhere. DDP's first bucket holds the parameters in model order; from
    step 2 it is rebuilt in the order gradients became ready (reversed), which moves the bug
    from the classifier to the first layer."""
    named = list(tiny_model().named_parameters())
    for comparison in runs["ddp-int8-hook-4-last-x1.05"].comparisons:
        order = named if comparison.step == 1 else named[::-1]
        hit = set(last_partition_parameters(order, PARTITIONS))
        assert hit == ({"2.weight", "2.bias"} if comparison.step == 1 else {"0.weight"})
        for parameter in comparison.parameters:
            assert parameter.bias is not None
            if parameter.name in hit:
                assert 0.01 < parameter.bias < 1.2 * (WRONG_SCALE - 1), parameter
            else:
                assert abs(parameter.bias) < 0.01, parameter


def test_check_distributed_records_and_judges_like_the_fixture(tmp_path: Path) -> None:
    """Under --convergence-record: the default region is calibrated single-process and written
    where ``convergence.check`` writes it; the fp16 hook passes it and is listed like a check."""
    properties: list[tuple[str, object]] = []
    checker = ConvergenceChecker(ConvergenceConfig(baselines_dir=tmp_path, record=True))
    bound = BoundCheck(
        checker=checker,
        defaults={},
        label="test_fp16",
        record_property=lambda name, value: properties.append((name, value)),
    )
    result = check_distributed(bound, fp16_compress_hook(), workload=TINY, timeout_s=120)
    assert result.verdict == "passed"
    assert result.candidate == "ddp-fp16-compress-hook"
    assert 0 < result.worst_ratio < 1
    assert (tmp_path / "ddp-tiny.json").exists()
    assert checker.results == [result]
    assert ("convergence_verdict", "passed") in properties


def test_a_warning_in_the_workers_reaches_the_callers_filters() -> None:
    """Raised once per rank inside the workers, issued once here, naming both ranks."""
    with pytest.warns(DistributedWorkerWarning, match=r"^ranks 0, 1: UserWarning: this hook is "):
        run = cosimulate_distributed(TINY, WARNING, timeout_s=120)
    assert len(run.comparisons) == STEPS


def _leftover_workers() -> list[str]:
    return [p.name for p in multiprocessing.active_children() if p.name.startswith("pytest-conv")]


@pytest.fixture
def private_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Rendezvous folders go here, so a test can see that none is left behind."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


def test_a_worker_that_raises_fails_the_run_naming_the_rank(private_tmp: Path) -> None:
    started = time.monotonic()
    with pytest.raises(DistributedRunError) as caught:
        cosimulate_distributed(TINY, RAISING, timeout_s=60)
    assert time.monotonic() - started < 60
    error = caught.value
    assert error.rank == 1
    assert error.exitcode == 1
    assert "injected failure in the comm hook" in error.worker_error
    message = str(error)
    assert (
        "rank 1 exited with code 1 (at step 1: candidate (comm hook raises-on-rank-1))" in message
    )
    assert "RuntimeError: injected failure in the comm hook" in message
    assert not _leftover_workers()
    assert not list(private_tmp.glob("pytest-convergence-ddp-*"))


@pytest.mark.parametrize("how", ["os._exit(0)", "sys.exit(0)"])
def test_a_rank_that_exits_cleanly_mid_run_is_named_not_its_peer(how: str) -> None:
    """User code ending rank 1 with code 0 in its step-2 hook: rank 0 then raises on the lost
    connection, but rank 1 is the cause. (``sys.exit`` raises ``SystemExit``, which the worker
    reports like any exception; ``os._exit`` leaves no word but its exit code.)"""
    hook = DistributedHook("exits-on-rank-1", functools.partial(_exiting_factory, how=how))
    with pytest.raises(DistributedRunError) as caught:
        cosimulate_distributed(TINY, hook, timeout_s=60)
    error = caught.value
    assert error.rank == 1, str(error)
    message = str(error)
    where = "(at step 2: candidate (comm hook exits-on-rank-1))"
    if how == "os._exit(0)":
        assert error.exitcode == 0
        assert f"failed: rank 1 exited with code 0 before it finished {where}" in message
        assert "rank 1 sent no exception text: code running in it ended its process" in message
    else:
        assert f"failed: rank 1 exited with code 1 {where}" in message
        assert "SystemExit: 0" in message
    # the peer's own view, in one line: its exception, not the frame list torch appends to it
    assert "then rank 0 exited with code 1: RuntimeError: " in message
    assert not _leftover_workers()


def test_spawned_workers_report_a_failure_the_same_way(private_tmp: Path) -> None:
    """Fresh interpreters (``start_method="spawn"``), the other way workers start: rank 1 fails
    while building its hook, before any step, and rank 0 is left waiting in the first
    collective of step 1. (A spawned worker imports torch itself: seconds, hence the early
    failure.)"""
    with pytest.raises(DistributedRunError) as caught:
        cosimulate_distributed(TINY, RAISING_EARLY, timeout_s=60, start_method="spawn")
    assert caught.value.rank == 1
    assert "(at building the models)" in str(caught.value)
    assert "ValueError: injected failure while building the hook" in str(caught.value)
    assert not _leftover_workers()
    assert not list(private_tmp.glob("pytest-convergence-ddp-*"))


def test_a_worker_that_hangs_is_terminated_at_the_deadline(private_tmp: Path) -> None:
    timeout = 10.0
    started = time.monotonic()
    with pytest.raises(DistributedRunError, match=r"did not finish within timeout_s=10 s"):
        cosimulate_distributed(TINY, SLEEPING, timeout_s=timeout)
    # The deadline, plus at most the terminate grace for the stragglers.
    assert time.monotonic() - started < timeout + 6
    assert not _leftover_workers()
    assert not list(private_tmp.glob("pytest-convergence-ddp-*"))


# --- the caller is killed ---------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]
# A caller whose run hangs mid-step (rank 1 sleeps in its hook, rank 0 waits for it in the
# all-reduce), as a CI timeout finds it; its timeout_s is far beyond the test's patience.
_CALLER = (
    "from pytest_convergence.distributed import cosimulate_distributed\n"
    "from tests.test_distributed import SLEEPING, TINY\n"
    "cosimulate_distributed(TINY, SLEEPING, timeout_s=300)\n"
)


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
    """Those still running: a zombie has ended, it only waits for its parent to reap it."""
    return [
        pid
        for pid, started in processes.items()
        if (st := _stat(pid)) is not None and st[2] == started and st[0] not in "ZX"
    ]


def _at(tmp: Path, rank: int, place: str) -> bool:
    """Whether ``rank`` of the run under ``tmp`` says it is at ``place``."""
    return any(
        place in path.read_text(encoding="utf-8")
        for path in tmp.glob(f"pytest-convergence-ddp-*/progress-{rank}.txt")
    )


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from /proc")
def test_workers_and_the_run_folder_die_with_a_killed_caller(tmp_path: Path) -> None:
    """SIGKILL the caller mid-run: nobody runs its cleanup, yet within seconds the fork server,
    both ranks and the rendezvous folder are gone."""
    env = dict(os.environ, TMPDIR=str(tmp_path))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    with (tmp_path / "caller.log").open("w") as log:
        caller = subprocess.Popen(
            [sys.executable, "-c", _CALLER], cwd=ROOT, env=env, stdout=log, stderr=log
        )
    processes: dict[int, str] = {}
    try:
        deadline = time.monotonic() + 120
        while not all(_at(tmp_path, rank, "step 1: candidate") for rank in (0, 1)):
            assert caller.poll() is None, (tmp_path / "caller.log").read_text()
            assert time.monotonic() < deadline, "the run never reached step 1"
            time.sleep(0.1)
        processes = _descendants(caller.pid)
        # the fork server, two ranks, multiprocessing's resource tracker
        assert len(processes) >= 3, processes
        caller.send_signal(signal.SIGKILL)
        caller.wait()
        killed = time.monotonic()
        while (_running(processes) or list(tmp_path.glob("pytest-convergence-ddp-*"))) and (
            time.monotonic() - killed < 10
        ):
            time.sleep(0.05)
        assert not _running(processes), "still running 10 s after the caller was killed"
        assert not list(tmp_path.glob("pytest-convergence-ddp-*"))
    finally:
        processes = processes or _descendants(caller.pid)  # failed before it looked
        caller.kill()
        caller.wait()
        for pid in _running(processes):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.skipif(sys.platform == "win32", reason="no folder is judged abandoned there")
def test_the_next_run_removes_the_folders_of_dead_owners_only(private_tmp: Path) -> None:
    """What a caller and workers all killed at once leave: a folder whose owner file nobody
    locks any more (the kernel released the dead owner's lock); and what a caller killed while
    making one leaves, a half-made folder. A live owner's folder, a half-made folder younger
    than a minute and a folder without an owner file (an older version's) stay."""
    import fcntl

    abandoned, alive, unowned = (private_tmp / f"{PREFIX}{n}" for n in "abc")
    old_half_made, half_made = (private_tmp / f"{HALF_MADE_PREFIX}{n}" for n in "de")
    for folder in (abandoned, alive, unowned, old_half_made, half_made):
        folder.mkdir()
    for folder in (abandoned, alive, unowned):
        (folder / "progress-0.txt").write_text("step 1: reference")
    (abandoned / OWNER_FILE).write_text("12345\n")
    minutes_ago = time.time() - 2 * HALF_MADE_AFTER_S
    os.utime(old_half_made, (minutes_ago, minutes_ago))
    with (alive / OWNER_FILE).open("w") as owner:
        fcntl.flock(owner, fcntl.LOCK_EX)  # as a live caller holds it
        with run_folder() as folder:
            assert folder.name.startswith(PREFIX)
            assert not folder.name.startswith(HALF_MADE_PREFIX)
            assert (folder / OWNER_FILE).exists()
            assert remove_abandoned_folders() == []  # its own is held too
        assert not abandoned.exists()
        assert not old_half_made.exists()
        assert alive.exists()
        assert unowned.exists()
        assert half_made.exists()
        assert not folder.exists()


# --- no processes: argument checks -------------------------------------------------------------


def test_built_in_hooks_pickle_and_have_distinct_names() -> None:
    hooks = [
        allreduce_hook(),
        fp16_compress_hook(),
        powersgd_hook(),
        powersgd_hook(matrix_approximation_rank=2, start_powerSGD_iter=10),
        int8_hook(),
        int8_hook(last_partition_scale=1.05),
    ]
    for hook in hooks:
        restored = pickle.loads(pickle.dumps(hook))
        assert (restored.name, restored.description) == (hook.name, hook.description)
    assert len({hook.name for hook in hooks}) == len(hooks)


def test_a_hook_that_cannot_reach_a_worker_is_refused_up_front() -> None:
    local = DistributedHook("closure", lambda group: (group, default_hooks.allreduce_hook))
    with pytest.raises(ValueError, match=r"module-level function"):
        cosimulate_distributed(TINY, local)


def test_a_workload_that_cannot_reach_a_worker_is_refused_up_front() -> None:
    unregistered = Workload(name="local", model_factory=lambda: nn.Linear(2, 2), batches=[])
    with pytest.raises(ValueError, match=r"cannot be sent to a spawned worker"):
        cosimulate_distributed(unregistered, allreduce_hook())


def test_a_changed_zoo_workload_is_refused_but_its_options_travel() -> None:
    """Zoo workloads hold closures: they travel by name, with steps, seed, dtype and device."""
    changed = get_workload("mlp").with_options(optimizer_factory=sgd(lr=0.01))
    with pytest.raises(ValueError, match=r"not the registered workload"):
        cosimulate_distributed(changed, allreduce_hook())


def test_workers_are_never_forked_from_the_caller() -> None:
    with pytest.raises(ValueError, match=r"never 'fork'"):
        cosimulate_distributed(TINY, allreduce_hook(), start_method="fork")


def test_batches_must_split_evenly_over_the_ranks() -> None:
    with pytest.raises(ValueError, match=r"not divisible by world_size=3"):
        cosimulate_distributed(TINY, allreduce_hook(), world_size=3)


def test_the_error_survives_pickling() -> None:
    error = DistributedRunError("boom", rank=1, exitcode=-9, worker_error="trace")
    copy = pickle.loads(pickle.dumps(error))
    assert (str(copy), copy.rank, copy.exitcode, copy.worker_error) == ("boom", 1, -9, "trace")


@pytest.mark.skipif(
    torch.cuda.is_available() and torch.cuda.device_count() >= 2,
    reason="two CUDA devices: nccl is available here",
)
def test_nccl_without_gpus_is_a_clear_error() -> None:
    with pytest.raises(DistributedRunError, match=r"backend='nccl' needs one CUDA device per"):
        cosimulate_distributed(TINY, allreduce_hook(), backend="nccl")


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2,
    reason="nccl needs two CUDA devices (one per rank)",
)
def test_nccl_on_two_gpus_gives_zero_error_for_the_allreduce_hook() -> None:
    run = cosimulate_distributed(TINY, allreduce_hook(), backend="nccl", timeout_s=300)
    assert run.device == "cuda"
    for comparison in run.comparisons:
        for parameter in comparison.parameters:
            assert parameter.error_norm == 0.0
