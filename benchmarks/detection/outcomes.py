"""What the detection benchmark records per run and per workload."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class Outcome:
    """One candidate on one (workload, seed): every method's detection step (None: passed)."""

    workload: str
    seed: int
    label: str
    kind: str
    region: str
    candidate: str
    not_applicable: str | None = None
    steps: dict[str, int | None] = dataclasses.field(default_factory=dict)
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)
    first_violation: dict[str, object] | None = None
    worst: dict[str, object] | None = None
    worst_ratio: float = 0.0
    violations: int = 0
    checks: int = 0
    global_logm_gap: float = 0.0
    global_logm_gap_limit: float = 0.0
    default_region_step: int | None = None
    default_region_first: dict[str, object] | None = None
    assert_close_message: str = ""
    # Parameters with at least one violation, in order of their first violation.
    violated: list[str] = dataclasses.field(default_factory=list)
    # For bugs with known affected parameters: does the first violation / any violation hit one?
    first_on_affected: bool | None = None
    any_on_affected: bool | None = None


@dataclasses.dataclass
class WorkloadCost:
    workload: str
    default_calibration: float
    # Every known-good candidate region the workload's rows need (suite.KNOWN_GOOD).
    candidate_calibration: float
    paper_calibration: float
    reference_runs: float
    paper_diverged_runs: int = 0
    default_region: str = ""
    candidate_regions: str = ""
