"""How checks and baselines hold up: reruns, recordings killed midway, hostile baseline files.

The figures of docs/reliability.md ("Checks and baselines") come from this script:

    OMP_WAIT_POLICY=PASSIVE python benchmarks/baseline_reliability.py reruns --reruns 20
    OMP_WAIT_POLICY=PASSIVE python benchmarks/baseline_reliability.py kills --kills 30
    OMP_WAIT_POLICY=PASSIVE python benchmarks/baseline_reliability.py hostile

``reruns`` checks a few candidates against the committed baselines again and again (a fresh
checker each time) and counts distinct outcomes: verdict, worst ratio to the last bit, first
violation. ``kills`` SIGKILLs recordings at random moments, both whole ``pytest
--convergence-record`` runs and a process that does nothing but re-record a large baseline (so
most kills land inside the write), and reads the baseline back after every kill. ``hostile``
writes damaged, misleading or dangerous baseline files and records what a check does with
each: which error, whether it names the file, whether anything hung or passed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TINY = """
from torch import nn
from pytest_convergence.workloads import Workload, register_workload, sgd, synthetic_classification

def tiny():
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))

register_workload(
    Workload(
        name="tiny",
        model_factory=tiny,
        batches=synthetic_classification((8,), 4, batch_size=8),
        optimizer_factory=sgd(lr=0.1),
        steps=3,
    ),
    replace_existing=True,
)
"""
TINY_TEST = """
import pytest
from pytest_convergence.candidates import Candidate

@pytest.mark.convergence(workload="tiny")
def test_identity(convergence):
    convergence.check(Candidate("identity", gradient_transform=lambda n, s: None))
"""


# --- reruns ---------------------------------------------------------------------------------


def reruns(count: int) -> None:
    import torch

    from pytest_convergence import zoo
    from pytest_convergence.checks import ConvergenceChecker
    from pytest_convergence.config import ConvergenceConfig
    from pytest_convergence.errors import ConvergenceError
    from pytest_convergence.workloads import add_workload_source
    from pytest_convergence.zoo.candidates import foreach_sgd, scaled_layer_gradient, wrong_momentum

    add_workload_source(zoo.SOURCE)
    torch.set_num_threads(1)  # the committed baselines' thread count
    checks = [
        ("lenet5", foreach_sgd()),
        ("lenet5", scaled_layer_gradient("conv1.weight", 0.9)),
        ("vgg16-mini", foreach_sgd()),
        ("vgg16-mini", wrong_momentum()),
    ]
    print(f"# {count} reruns of each check, a fresh checker each, torch threads 1")
    print(
        f"  {'workload':<12} {'candidate':<26} {'outcomes':>8}  verdict  {'worst ratio':>11}  "
        "seconds min/median/max"
    )
    for workload, candidate in checks:
        outcomes = set()
        seconds = []
        for _ in range(count):
            checker = ConvergenceChecker(ConvergenceConfig(ROOT / "baselines", threads=1))
            start = time.perf_counter()
            with contextlib.suppress(ConvergenceError):
                checker.check(candidate, workload)
            seconds.append(time.perf_counter() - start)
            result = checker.results[-1]
            outcomes.add((result.verdict, result.worst_ratio.hex(), result.first_violation))
        verdict = "/".join(sorted({outcome[0] for outcome in outcomes}))
        worst = "/".join(sorted({f"{float.fromhex(outcome[1]):.4g}" for outcome in outcomes}))
        timing = f"{min(seconds):.2f}/{statistics.median(seconds):.2f}/{max(seconds):.2f}"
        print(
            f"  {workload:<12} {candidate.name:<26} {len(outcomes):>8}  {verdict:<7}  "
            f"{worst:>11}  {timing}"
        )


# --- kills ----------------------------------------------------------------------------------


def kills(count: int, seed: int) -> None:
    from pytest_convergence.baselines import load_baseline

    chooser = random.Random(seed)
    with tempfile.TemporaryDirectory() as folder:
        project = Path(folder)
        (project / "conftest.py").write_text(TINY)
        (project / "test_tiny.py").write_text(TINY_TEST)
        (project / "pytest.ini").write_text("[pytest]\n")
        baseline = project / "baselines" / "tiny.json"
        environ = {k: v for k, v in os.environ.items() if k != "CI"}
        environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), environ.get("PYTHONPATH", "")])
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
        command += ["--convergence", "--convergence-record", "--convergence-threads", "1"]
        start = time.perf_counter()
        subprocess.run(
            [*command, "--convergence-seed", "0"],
            cwd=project,
            env=environ,
            check=True,
            capture_output=True,
        )
        whole = time.perf_counter() - start
        print(f"# whole recordings killed at a uniform random moment of their {whole:.1f} s")
        tally = {"old": 0, "new": 0, "torn": 0, "temp files left": 0}
        moments: dict[str, list[float]] = {"old": [], "new": [], "torn": []}
        for run in range(1, count + 1):
            before = baseline.read_bytes()
            process = subprocess.Popen(
                [*command, "--convergence-seed", str(run)],
                cwd=project,
                env=environ,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            moment = chooser.uniform(0.0, whole)
            time.sleep(moment)
            process.send_signal(signal.SIGKILL)
            process.wait()
            found = _read_back(load_baseline, baseline, before)
            tally[found] += 1
            moments[found].append(moment)
            tally["temp files left"] += len(_temp_files(baseline.parent))
        print(f"  {count} kills: " + ", ".join(f"{name} {n}" for name, n in tally.items()))
        for found, times in moments.items():
            if times:
                print(f"  {found}: killed {min(times):.1f}-{max(times):.1f} s after the start")
        _writer_kills(count, chooser, project)


def _read_back(load: Callable[[Path], Any], path: Path, before: bytes) -> str:
    try:
        load(path)
    except Exception:
        return "torn"
    return "old" if path.read_bytes() == before else "new"


def _temp_files(folder: Path) -> list[Path]:
    return [path for path in folder.iterdir() if path.name.endswith(".tmp")]


WRITER = """
import sys
from dataclasses import replace
from pathlib import Path
from pytest_convergence.baselines import Provenance, record_baseline
from pytest_convergence.regions import Calibration, ParameterRegion, Region

steps = 64
calibration = Calibration("candidate", "writer", None, 1, "w", (0, 1), steps)
def region(scale):
    parameters = {
        f"block{i}.weight": ParameterRegion(
            name=f"block{i}.weight", count=1000 + i,
            bias_center=tuple(scale * (i + s) for s in range(steps)), bias_spread=0.1 * scale,
            bias_z_limit=6.0, radial_center=tuple(-scale * s for s in range(steps)),
            radial_spread=0.2, radial_z_limit=7.0,
            error_scale=tuple(scale * (s + 1) / 9 for s in range(steps)),
            noise_scale=tuple(scale * (s + 1) / 10 for s in range(steps)),
            noise_limit=tuple(scale * (s + 1) / 7 for s in range(steps)),
            noise_log_spread=0.5,
            noise_z_limit=6.0,
            zero_change_limit=1, logm_gap_limit=0.1,
            rounding_scale=tuple(scale * 1e-6 for s in range(steps)),
        )
        for i in range(64)
    }
    return Region(calibration, parameters, (-0.1, 0.1), 0.2)
created = "2026-01-01T00:00:00+00:00"
provenance = Provenance("big", None, "float32", "cpu", "2.13.0", "0", 1, created)
path = Path(sys.argv[1])
regions = [region(1.0), region(2.0)]
print("ready", flush=True)
turn = 0
while True:
    record_baseline(path, regions[turn % 2], provenance)
    turn += 1
"""


def _writer_kills(count: int, chooser: random.Random, project: Path) -> None:
    from pytest_convergence.baselines import load_baseline, save_baseline

    folder = project / "big"
    folder.mkdir()
    path = folder / "big.json"
    writer = project / "writer.py"
    writer.write_text(WRITER)
    environ = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run(
        [sys.executable, "-c", WRITER.replace("while True:", "for _ in range(20):"), str(path)],
        env=environ,
        check=True,
        capture_output=True,
    )
    size = path.stat().st_size
    # Time one write, to report how much of the writer's loop a write takes.
    loaded = load_baseline(path)
    begin = time.perf_counter()
    for _ in range(5):
        save_baseline(folder / "timing.json", loaded.region, loaded.provenance)
    write_ms = (time.perf_counter() - begin) / 5 * 1000
    (folder / "timing.json").unlink()
    (folder / "timing.json.lock").unlink()
    tally = {"region 1": 0, "region 2": 0, "torn": 0, "temp files left": 0}
    for _ in range(count):
        process = subprocess.Popen(
            [sys.executable, str(writer), str(path)],
            env=environ,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert process.stdout is not None
        assert process.stdout.readline().strip() == "ready"
        time.sleep(chooser.uniform(0.05, 0.6))
        process.send_signal(signal.SIGKILL)
        process.wait()
        try:
            region = load_baseline(path).region
        except Exception:
            tally["torn"] += 1
        else:
            scale = region.parameters["block0.weight"].bias_spread / 0.1
            tally["region 1" if math.isclose(scale, 1.0) else "region 2"] += 1
        left = _temp_files(folder)
        tally["temp files left"] += len(left)
        for stale in left:
            stale.unlink()
    print(
        f"# a process re-recording a {size / 1000:.0f} kB baseline in a loop (one write "
        f"{write_ms:.0f} ms), killed 0.05-0.6 s after it started"
    )
    print(f"  {count} kills: " + ", ".join(f"{name} {n}" for name, n in tally.items()))


# --- hostile files --------------------------------------------------------------------------


class NoAnswer(Exception):
    """A check that did not answer in time (not an OSError: readers turn those into errors)."""


@contextmanager
def _deadline(seconds: int) -> Iterator[None]:
    def expired(signum: int, frame: object) -> None:
        raise NoAnswer(f"no answer within {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def hostile() -> None:
    import torch

    from pytest_convergence.candidates import Candidate
    from pytest_convergence.checks import ConvergenceChecker
    from pytest_convergence.config import ConvergenceConfig

    exec(TINY, {})  # registers "tiny"
    torch.set_num_threads(1)
    identity = Candidate("identity", gradient_transform=lambda named, step: None)
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        folder = root / "baselines"
        ConvergenceChecker(ConvergenceConfig(folder, record=True, threads=1)).check(
            identity, "tiny"
        )
        path = folder / "tiny.json"
        valid = path.read_text()
        (root / "secret.json").write_text(valid)
        print(f"  {'file':<44} {'outcome':<40} names the file")
        for label, write, options in _hostile_cases(path, root, valid):
            _reset(path)
            write()
            if options.get("read_only"):
                path.chmod(0o444)
            config = ConvergenceConfig(folder, record=bool(options.get("record")), threads=1)
            checker = ConvergenceChecker(config)
            try:
                with _deadline(30):
                    checker.check(identity, "tiny", baseline=options.get("baseline"))
            except NoAnswer as error:
                print(f"  {label:<44} {error!s:<40} -")
            except Exception as error:
                names = str(path) in str(error) or "baseline=" in str(error)
                print(f"  {label:<44} {type(error).__name__:<40} {'yes' if names else 'no'}")
            else:
                print(f"  {label:<44} {'passed (no error)':<40} -")
        _reset(path)
        secret = (root / "secret.json").read_text()
        print(f"  the file outside the folder unchanged: {secret == valid}")


def _hostile_cases(
    path: Path, root: Path, valid: str
) -> list[tuple[str, Callable[[], None], dict[str, Any]]]:
    """(what, how to write it at ``path``, check options) for every hostile file tried."""

    def document(change: Callable[[dict[str, Any]], None]) -> Callable[[], None]:
        def write() -> None:
            parsed = json.loads(valid)
            change(parsed)
            path.write_text(json.dumps(parsed, indent=1))

        return write

    def literal(change: Callable[[dict[str, Any]], None], raw: str) -> Callable[[], None]:
        """The document with ``change``, its one "@" string replaced by raw JSON ``raw``."""

        def write() -> None:
            document(change)()
            path.write_text(path.read_text().replace('"@"', raw, 1))

        return write

    def parameter(key: str, value: object) -> Callable[[dict[str, Any]], None]:
        def change(parsed: dict[str, Any]) -> None:
            parsed["parameters"]["2.weight"][key] = value

        return change

    def text(content: str | bytes) -> Callable[[], None]:
        def write() -> None:
            if isinstance(content, bytes):
                path.write_bytes(content)
            else:
                path.write_text(content)

        return write

    def replaced_by(make: Callable[[], None]) -> Callable[[], None]:
        def write() -> None:
            path.unlink(missing_ok=True)
            make()

        return write

    def link_to(target: Path) -> Callable[[], None]:
        return replaced_by(lambda: path.symlink_to(target))

    def extra_parameter(parsed: dict[str, Any]) -> None:
        parsed["parameters"]["9.weight"] = parsed["parameters"]["2.weight"]

    secret = root / "secret.json"
    return [
        ("empty file", text(""), {}),
        ("truncated half-way", text(valid[: len(valid) // 2]), {}),
        ("not UTF-8", text(b"\xff\xfe{}"), {}),
        ("UTF-8 byte-order mark", text("\ufeff" + valid), {}),
        ("JSON nested 100000 deep", text("[" * 100_000 + "]" * 100_000), {}),
        ("duplicate key", text(valid.replace('"schema"', '"schema": "x", "schema"', 1)), {}),
        ("another file kind", text('{"schema": "pytest-convergence/trace"}'), {}),
        ("newer schema_version", document(lambda d: d.update(schema_version=99)), {}),
        ("older schema_version", document(lambda d: d.update(schema_version=3)), {}),
        ("NaN limit", document(parameter("logm_gap_limit", math.nan)), {}),
        ("1e400 (infinite) limit", literal(parameter("bias_z_limit", "@"), "1e400"), {}),
        ("negative spread", document(parameter("bias_spread", -1.0)), {}),
        ("zero spread", document(parameter("bias_spread", 0.0)), {}),
        ("negative zero spread", document(parameter("radial_spread", -0.0)), {}),
        ("zero z limit", document(parameter("bias_z_limit", 0.0)), {}),
        ("per-step list too short", document(parameter("noise_limit", [0.1])), {}),
        ("count of a narrower layer", document(parameter("count", 32)), {}),
        ("count 10^400", document(parameter("count", 10**400)), {}),
        ("parameter removed", document(lambda d: d["parameters"].pop("2.bias")), {}),
        ("parameter the model lacks", document(extra_parameter), {}),
        ("another workload's", document(lambda d: d["provenance"].update(workload="mlp")), {}),
        ("a folder", replaced_by(path.mkdir), {}),
        ("a named pipe", replaced_by(lambda: os.mkfifo(path)), {}),
        ("a link to /dev/zero", link_to(Path("/dev/zero")), {}),
        ("a link out of the folder", link_to(secret), {}),
        ("baseline='../secret.json'", text(valid), {"baseline": "../secret.json"}),
        ("baseline=<absolute path>", text(valid), {"baseline": str(secret)}),
        ("recording onto a folder", replaced_by(path.mkdir), {"record": True}),
        (
            "recording onto a read-only file (changed)",
            document(lambda d: d.update(global_logm_gap_limit=1.0)),
            {"record": True, "read_only": True},
        ),
        ("recording through a link out", link_to(secret), {"record": True}),
    ]


def _reset(path: Path) -> None:
    """Remove whatever the last case left at ``path``."""
    if path.is_dir() and not path.is_symlink():
        path.rmdir()
    elif path.is_symlink() or path.exists():
        path.unlink()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    rerun = commands.add_parser("reruns", help="checks run again and again")
    rerun.add_argument("--reruns", type=int, default=5)
    kill = commands.add_parser("kills", help="recordings SIGKILLed at random moments")
    kill.add_argument("--kills", type=int, default=30)
    kill.add_argument("--seed", type=int, default=0)
    commands.add_parser("hostile", help="damaged, misleading and dangerous baseline files")
    args = parser.parse_args()
    if args.command == "reruns":
        reruns(args.reruns)
    elif args.command == "kills":
        kills(args.kills, args.seed)
    else:
        hostile()
    return 0


if __name__ == "__main__":
    sys.exit(main())
