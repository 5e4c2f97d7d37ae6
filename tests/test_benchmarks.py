"""The benchmark scripts still run against the library and print their tables.

Smoke runs on the smallest sizes: no timing is asserted (these machines are shared and noisy;
targets are checked by running the benchmarks themselves, see docs/performance.md).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
NUMBER = r"\d+\.\d+"


def run_benchmark(script: str, *arguments: str) -> str:
    if not (BENCHMARKS / script).exists():
        pytest.skip(f"benchmarks/{script} is not in this checkout")
    completed = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *arguments],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    return completed.stdout


def test_tracing_overhead_prints_whole_step_and_alone_ratios() -> None:
    out = run_benchmark("tracing_overhead.py", "mlp", "--rounds", "1", "--block", "3")
    ms, ratio = rf"\s+{NUMBER}", rf"\s+-?{NUMBER}%"
    assert re.search(rf"^  mlp{ms}{ms}{ms}{ratio}{ratio}{ms}{ratio}$", out, re.M)
    assert re.search(rf"worst ratio -?{NUMBER}% \(target <= 10%\): (met|MISSED)", out)
    assert re.search(rf"worst ratio with the gradient copy -?{NUMBER}%", out)
    assert re.search(rf"worst ratio of the tracing timed alone -?{NUMBER}%", out)


def test_convergence_test_time_records_and_checks_a_workload() -> None:
    out = run_benchmark("convergence_test_time.py", "mlp", "--repeats", "1")
    assert re.search(
        rf"^  mlp\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}x  (met|MISSED)$", out, re.M
    )


def test_judge_cost_times_the_judge_with_and_without_the_noise_check() -> None:
    out = run_benchmark("judge_cost.py", "mlp", "--repeats", "1")
    assert re.search(rf"^  mlp\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}\s+-?{NUMBER}%$", out, re.M)


def test_logm_throughput_compares_every_method_on_a_small_vector() -> None:
    out = run_benchmark("logm_throughput.py", "--size", "100000", "--repeats", "1")
    for row in (
        "pytest_convergence.logm(w) ",
        "naive numpy",
        "floor: float(w.sum())",
        "logm's exact tensor path",
        "pytest_convergence.logm(w), half of w zeroed",
    ):
        assert re.search(rf"^  {re.escape(row)}.*\s{NUMBER}\s+{NUMBER}$", out, re.M), row
    for target in ("speed-up over naive numpy", "time over the sum floor", "extra peak memory"):
        assert re.search(rf"^  {target}: {NUMBER}.*target .* (met|MISSED)$", out, re.M), target


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from /proc")
def test_killed_caller_counts_what_a_killed_ddp_caller_leaves() -> None:
    out = run_benchmark(
        "killed_caller.py", "--runs", "1", "--moments", "hung", "--start-methods", "forkserver"
    )
    seconds = rf"\s+{NUMBER}\s+{NUMBER}"
    row = rf"^forkserver\s+hung\s+1\s+2{seconds}{seconds}{seconds}\s+0 \(0\)\s+0$"
    assert re.search(row, out, re.M), out
    assert "folders left after the kills: 0; removed by the next run: 0" in out


def test_baseline_reliability_refuses_every_hostile_file_naming_it() -> None:
    out = run_benchmark("baseline_reliability.py", "hostile")
    rows = [line for line in out.splitlines() if line.startswith("  ") and "file" not in line[:8]]
    assert len(rows) >= 30
    assert not [row for row in rows if row.endswith(" no") or "passed" in row or "answer" in row]
    assert "the file outside the folder unchanged: True" in out


def test_baseline_reliability_reruns_a_check_to_one_outcome() -> None:
    out = run_benchmark("baseline_reliability.py", "reruns", "--reruns", "2")
    assert re.search(r"^  lenet5\s+sgd-foreach\s+1  passed", out, re.M)


def test_recording_time_sets_the_ladder_beside_the_calibration() -> None:
    out = run_benchmark("recording_time.py", "mlp", "--repeats", "1")
    seconds = rf"\s+{NUMBER}s"
    assert re.search(rf"^mlp{seconds}{seconds}{seconds}\s+{NUMBER}x\s+{NUMBER}x$", out, re.M)


def test_power_verification_reruns_every_claim_of_a_baseline_alone() -> None:
    out = run_benchmark("power_verification.py", "symmetric-mlp", "--held-out", "100")
    assert re.search(
        r"^symmetric-mlp\.json: (\d+) claims; report's seed 0: caught \1/\1, at the claimed "
        r"step \1; held out: seed 100 \d+/\1 \(\d+ s\)$",
        out,
        re.M,
    )
