"""Divergence regions: calibration from legitimate runs, and verdicts against them.

Why not the paper's region alone: at CI scale, seed-to-seed variation of the global LoGM delta
swamps a subtle bug (measurements, section 1), and in co-simulation a correct lossy candidate
moves global LoGM as much as a buggy one (section 2). What separates them is statistics across
steps and weights (section 5): unbiased noise changes sign and averages out, a bug pushes one way
every step; a large tensor holds much evidence, a tiny bias vector little.

So each re-synced step splits a parameter's update error into a **bias** (its projection on the
reference update: the candidate moved (1 + bias) times as far along the reference's direction)
and **noise** (the rest, relative to the update's norm). A region holds, per parameter:

- the distribution of bias per unit of noise under legitimate variation (its center and spread,
  pooled over steps, seeds and draws), tested per step and cumulatively over steps as z-scores;
- the largest noise seen at each step under legitimate variation, times a margin;
- the typical noise at each step and the spread of its logarithm, so that noise which stays
  above the typical level step after step adds up to evidence, as a bias does;
- the largest change in zero count (pruning masks, dead weights).

"Legitimate variation" is either the reference under gradient perturbations at a stated relative
tolerance (any implementation at least as precise passes) or a named known-good candidate (a
correct lossy compression), whose later versions are then held to its own behaviour. The paper's
per-iteration global LoGM-delta region is recorded too and reported beside the verdict.

Length: calibration and the verdict share each statistic's definition (the normalized bias,
the log noise ratio, the floors under them); apart, each would import the other's private
helpers, and a change to one statistic would have to be made in two modules.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TypeAlias

from pytest_convergence.candidates import Candidate, arithmetic_noise
from pytest_convergence.cosim import cosimulate, cosimulate_many
from pytest_convergence.power import PowerReport
from pytest_convergence.precision import DEFAULT_POLICY, POLICIES, get_policy
from pytest_convergence.student_t import gaussian_two_sided_tail, limit_with_tail
from pytest_convergence.traces import CoSimulation, ParameterComparison
from pytest_convergence.workloads import Workload

__all__ = [
    "DEFAULT_CANDIDATE_CALIBRATION_SEEDS",
    "DEFAULT_DRAWS",
    "DEFAULT_GRADIENT_TOLERANCE",
    "DEFAULT_TOLERANCE",
    "MIN_BIAS_SPREAD",
    "MIN_NOISE_LOG_SPREAD",
    "NOISE_MARGIN",
    "NOISE_SCORE_CAP",
    "Z_LIMIT",
    "Calibration",
    "CheckRow",
    "ParameterRegion",
    "Region",
    "Verdict",
    "Violation",
    "calibrate",
    "check_rows",
    "judge",
    "prediction_limit",
    "ratio",
    "require_candidate_seeds",
]

# By default an implementation is legitimate when every operation is at least as accurate as fp16
# rounding (2^-11: other kernels, summation orders, Winograd tiles, memory formats) and its
# gradient exchange at least as accurate as bf16 rounding (2^-8: fp16 or bf16 exchanges pass).
# Operation noise is amplified through deep nets; at 2^-8 on every layer's output a plain VGG's
# updates already differ by ~15% at step 1, hiding real bugs in the noise.
DEFAULT_TOLERANCE = POLICIES[DEFAULT_POLICY].tolerance  # 2^-11
DEFAULT_GRADIENT_TOLERANCE = POLICIES[DEFAULT_POLICY].gradient_tolerance  # 2^-8
DEFAULT_DRAWS = 4
DEFAULT_CALIBRATION_SEEDS = 3
# A known-good candidate runs once per seed (no draws), and its spread is the seed-to-seed
# variation around each step's center: 6 seeds over 8 steps leave 40 degrees of freedom, a z
# limit of 8.3 (3 seeds: 16, a limit of 13.9; see prediction_limit).
DEFAULT_CANDIDATE_CALIBRATION_SEEDS = 6
# Bias z-scores beyond 6 have probability 2e-9 each under a Gaussian null: a family of a few
# thousand checks per test keeps false alarms near one in a hundred thousand runs, with room for
# tails heavier than Gaussian. Spreads estimated from few samples make the scores t-distributed;
# each limit is then the t quantile with this same tail probability (see prediction_limit).
Z_LIMIT = 6.0
FALSE_ALARM_PER_CHECK = gaussian_two_sided_tail(Z_LIMIT)
# A candidate may be up to this many times noisier than the noisiest legitimate run seen...
NOISE_MARGIN = 2.0
# ...or than a log-normal fit of the calibration's noise extrapolated to the same tail,
# whichever is larger: a few dozen samples of a heavy-tailed noise (a small tensor's share of a
# lossy compression) do not show its tail, and twice their maximum is not a bound.
MIN_NOISE_SAMPLES_FOR_FIT = 3
# Spread floor: a perfectly repeatable calibration must not turn rounding noise into a verdict.
MIN_BIAS_SPREAD = 1e-6
# Update noise that returns every step adds up, as a bias does: each step scores the log of the
# noise over the calibration's typical noise at that step, in units of the calibration's spread
# of that log, and the scores combine over steps (Stouffer). One step counts for at most this
# many units either way, so a legitimate one-step spike (a near-zero gradient's sign flip, a
# ReLU boundary, Adam normalizing a tiny gradient) moves the combined score by at most
# CAP / sqrt(steps), while an error that returns every step grows it with sqrt(steps): a
# direction-only error under Adam, a dropped or stale slice of a gradient, a kernel computing a
# slightly other function.
NOISE_SCORE_CAP = 4.0
# A calibration whose noise barely varies must not make a 10% difference in noise evidence.
MIN_NOISE_LOG_SPREAD = 0.1
# Error scale floor, about float32's resolution: an exact calibration has no error at all.
NOISE_FLOOR = 1e-7
# Two correct implementations may round each weight differently after a step: an error of a
# few units in the last place of the weights, which relative to the update is
# unit roundoff x |w| / |u| (the parameter's "rounding scale"). A region whose calibration saw
# no error at all on a parameter (a bias all-reduced uncompressed, a small tensor on a
# stochastic-rounding grid) would otherwise flag the first rounding difference with an
# arbitrary z-score. Noise up to this many rounding scales is rounding.
ROUNDING_NOISE_MARGIN = 16.0
UNIT_ROUNDOFF = {"float64": 2.0**-53, "float32": 2.0**-24, "float16": 2.0**-11, "bfloat16": 2.0**-8}
# The check of NaN and Inf weights, by name (pytest_convergence.report words it apart).
NON_FINITE_CHECK = "non-finite weights"
# Exact zeros come and go legitimately in small numbers (a zero-initialized bias whose quantized
# gradient rounds to zero stays zero); masks that stop applying or dead units move them wholesale.
ZERO_SLACK_FRACTION = 0.01


@dataclass(frozen=True)
class Calibration:
    """What a region was calibrated against, so a reader knows what it tolerates."""

    kind: str  # "reference-perturbation" or "candidate"
    description: str
    tolerance: float | None
    draws: int
    candidate: str | None
    seeds: tuple[int, ...]
    steps: int
    gradient_tolerance: float | None = None
    # The perturbed runs also drew their random numbers from other streams (other dropout
    # masks): the region admits a candidate that draws them otherwise.
    random_stream: bool = False
    # The precision policy whose accuracy the perturbations stand for.
    precision: str = DEFAULT_POLICY


@dataclass(frozen=True)
class ParameterRegion:
    """One parameter's legitimate behaviour; per-step lists are indexed by step - 1."""

    name: str
    count: int
    bias_center: tuple[float, ...]
    bias_spread: float
    bias_z_limit: float
    radial_center: tuple[float, ...]
    radial_spread: float
    radial_z_limit: float
    error_scale: tuple[float, ...]
    noise_scale: tuple[float, ...]
    noise_limit: tuple[float, ...]
    # The spread of log(noise / typical noise) under legitimate variation, and the limit of
    # the noise's z-score combined over steps.
    noise_log_spread: float
    noise_z_limit: float
    zero_change_limit: int
    logm_gap_limit: float
    rounding_scale: tuple[float, ...]


@dataclass(frozen=True)
class Region:
    """A workload's divergence region, per parameter and global."""

    calibration: Calibration
    parameters: dict[str, ParameterRegion]
    global_logm_delta: tuple[float, float]
    global_logm_gap_limit: float
    # What the region catches (pytest_convergence.power), measured when it is recorded.
    power: PowerReport | None = None


@dataclass(frozen=True)
class Violation:
    """One check that left the region: ``value`` beside the ``limit`` it broke."""

    step: int
    parameter: str
    check: str
    value: float
    limit: float

    @property
    def ratio(self) -> float:
        return ratio(self.value, self.limit)


@dataclass
class Verdict:
    """Every check of one co-simulation against one region."""

    checks: int
    violations: list[Violation] = field(default_factory=list)
    worst: Violation | None = None
    global_logm_gap: float = 0.0
    global_logm_gap_limit: float = math.inf
    # The first step after which the candidate's global LoGM was undefined (NaN or Inf
    # weights) where the reference's was not: the gap is not 0 from there on, it is unknown.
    global_logm_undefined_from: int | None = None

    @property
    def passed(self) -> bool:
        return not self.violations

    @property
    def first_violation(self) -> Violation | None:
        return self.violations[0] if self.violations else None

    @property
    def worst_ratio(self) -> float:
        return self.worst.ratio if self.worst is not None else 0.0

    @property
    def violating_pairs(self) -> int:
        """(step, parameter) pairs with at least one violation: several checks of one pair
        often break together, and a reader counts places, not checks."""
        return len({(v.step, v.parameter) for v in self.violations})


def calibrate(
    workload: Workload,
    *,
    candidate: Candidate | None = None,
    seeds: Sequence[int] | None = None,
    tolerance: float | None = None,
    gradient_tolerance: float | None = None,
    draws: int = DEFAULT_DRAWS,
    precision: str | None = None,
    random_stream: bool = False,
) -> Region:
    """Calibrate a region from legitimate runs of ``workload``.

    Without ``candidate``: the reference against itself under ``draws`` perturbations of every
    module output (relative ``tolerance``) and every gradient (``gradient_tolerance``), by default
    the accuracy of the ``precision`` policy (the workload's own by default); with
    ``random_stream`` each perturbed run also draws its random numbers from a stream of its own.
    With ``candidate``: that known-good candidate against the reference. Each over several
    seeds, so the region does not fit one trajectory.
    """
    policy = get_policy(precision or workload.precision)
    tolerance = policy.tolerance if tolerance is None else tolerance
    if gradient_tolerance is None:
        gradient_tolerance = policy.gradient_tolerance
    if seeds is None:
        count = (
            DEFAULT_CALIBRATION_SEEDS if candidate is None else DEFAULT_CANDIDATE_CALIBRATION_SEEDS
        )
        seeds = [workload.seed + offset for offset in range(count)]
    if candidate is not None:
        require_candidate_seeds(workload, candidate.name, seeds)
    runs: list[CoSimulation] = []
    for seed in seeds:
        seeded = workload.with_options(seed=seed)
        if candidate is None:
            runs.extend(
                cosimulate_many(
                    seeded,
                    [
                        arithmetic_noise(
                            tolerance,
                            d,
                            gradient_relative=gradient_tolerance,
                            random_stream=random_stream,
                        )
                        for d in range(draws)
                    ],
                )
            )
        else:
            runs.append(cosimulate(seeded, candidate))
    calibration = Calibration(
        kind="reference-perturbation" if candidate is None else "candidate",
        description=(
            f"reference with module outputs perturbed by relative Gaussian noise "
            f"{tolerance:.3g} and gradients by {gradient_tolerance:.3g}, "
            f"{draws} draws per seed"
            + (", each with a random stream of its own" if random_stream else "")
            + ("" if policy.name == DEFAULT_POLICY else f" (precision policy {policy.name})")
            if candidate is None
            else f"known-good candidate {candidate.name!r}"
            + (f": {candidate.description}" if candidate.description else "")
        ),
        tolerance=tolerance if candidate is None else None,
        gradient_tolerance=gradient_tolerance if candidate is None else None,
        draws=draws if candidate is None else 1,
        candidate=None if candidate is None else candidate.name,
        seeds=tuple(seeds),
        steps=workload.steps,
        random_stream=random_stream and candidate is None,
        precision=policy.name,
    )
    return region_from_runs(runs, calibration)


def require_candidate_seeds(workload: Workload, candidate: str, seeds: Sequence[int]) -> None:
    """Refuse a known-good candidate's calibration that cannot estimate a spread: the candidate
    runs once per seed, so the seed-to-seed variation is all the spread there is."""
    if len(set(seeds)) < 2:
        raise ValueError(
            f"calibrating {workload.name!r} against candidate {candidate!r} needs at least "
            f"2 distinct seeds, got {list(seeds)}"
        )


def region_from_runs(runs: Sequence[CoSimulation], calibration: Calibration) -> Region:
    """The envelope of legitimate co-simulations, per parameter and step."""
    for run in runs:
        for comparison in run.comparisons:
            if comparison.non_finite:
                raise ValueError(
                    f"calibration run of {run.workload!r} (seed {run.seed}, {run.candidate}) "
                    f"produced non-finite weights at step {comparison.step}: a legitimate run "
                    "cannot diverge; check the workload's learning rate or the candidate"
                )
    names = [p.name for p in runs[0].comparisons[0].parameters]
    # Perturbation noise passing through nonlinearities leaves a small systematic bias of its
    # own; a correct implementation has none, so these regions are centered at zero and the
    # perturbations' bias counts as spread.
    centered = calibration.kind == "reference-perturbation"
    parameters = {
        name: _parameter_region(name, runs, index, centered=centered)
        for index, name in enumerate(names)
    }
    deltas = [d for run in runs for d in run.reference.global_logm_deltas()]
    gaps = [
        abs(c.candidate_global_logm - c.reference_global_logm)
        for run in runs
        for c in run.comparisons
        if c.candidate_global_logm is not None and c.reference_global_logm is not None
    ]
    return Region(
        calibration=calibration,
        parameters=parameters,
        global_logm_delta=(min(deltas), max(deltas)) if deltas else (0.0, 0.0),
        global_logm_gap_limit=NOISE_MARGIN * max(gaps, default=0.0),
    )


def _parameter_region(
    name: str, runs: Sequence[CoSimulation], index: int, *, centered: bool
) -> ParameterRegion:
    steps = min(len(run.comparisons) for run in runs)
    per_step = [[run.comparisons[s].parameters[index] for run in runs] for s in range(steps)]
    rounding = _rounding_scale(runs, index, steps)
    error_scale = tuple(
        max(_median(p.relative_error for p in samples), rounding[s])
        for s, samples in enumerate(per_step)
    )
    noise_scale = tuple(_median(p.noise for p in samples) for samples in per_step)
    normalized = [
        [_normalized(sample.bias, error_scale[s]) for sample in samples]
        for s, samples in enumerate(per_step)
    ]
    center, spread, z_limit = _centers_and_pooled_spread(normalized, centered=centered)
    radial_center, radial_spread, radial_z_limit = _centers_and_pooled_spread(
        [
            [_normalized(sample.radial, error_scale[s]) for sample in samples]
            for s, samples in enumerate(per_step)
        ],
        centered=centered,
    )
    # Pooled over steps: a handful of runs per step is too few to set a per-step maximum.
    noises = [_finite(p.noise) for samples in per_step for p in samples]
    pooled_limit = _noise_limit(noises)
    noise_limit = tuple(max(pooled_limit, ROUNDING_NOISE_MARGIN * r) for r in rounding)
    noise_log_spread, noise_z_limit = _noise_log_spread(per_step, noise_scale, rounding)
    gaps = [abs(p.logm_gap) for samples in per_step for p in samples if p.logm_gap is not None]
    return ParameterRegion(
        name=name,
        count=per_step[0][0].count,
        bias_center=center,
        bias_spread=max(spread, MIN_BIAS_SPREAD),
        bias_z_limit=z_limit,
        radial_center=radial_center,
        radial_spread=max(radial_spread, MIN_BIAS_SPREAD),
        radial_z_limit=radial_z_limit,
        error_scale=error_scale,
        noise_scale=noise_scale,
        noise_limit=noise_limit,
        noise_log_spread=noise_log_spread,
        noise_z_limit=noise_z_limit,
        zero_change_limit=_zero_change_limit(per_step),
        logm_gap_limit=NOISE_MARGIN * max(gaps, default=0.0),
        rounding_scale=rounding,
    )


def _rounding_scale(runs: Sequence[CoSimulation], index: int, steps: int) -> tuple[float, ...]:
    """Per step, the median over runs of unit roundoff x |w| / |u| of the reference: the
    relative update error that rounding each weight once more or less would make."""
    scales = []
    for step in range(1, steps + 1):
        samples = []
        for run in runs:
            if step >= len(run.reference.steps):
                continue
            record = run.reference.steps[step].parameters[index]
            roundoff = UNIT_ROUNDOFF.get(run.dtype, UNIT_ROUNDOFF["float32"])
            if record.update_norm > 0 and math.isfinite(record.weight_norm):
                samples.append(roundoff * record.weight_norm / record.update_norm)
        scales.append(_median(samples))
    return tuple(scales)


def _centers_and_pooled_spread(
    per_step: Sequence[Sequence[float | None]], *, centered: bool
) -> tuple[tuple[float, ...], float, float]:
    """Per-step mean of the normalized bias, the spread of samples around their step's mean
    pooled over steps, and the z limit those estimates support.

    Pooled around per-step means: a lossy candidate's bias drifts from step to step in a way
    that repeats across seeds, and that drift is not noise. ``centered``: means fixed at zero.
    """
    centers = []
    squares, degrees = 0.0, 0
    fewest = math.inf
    for samples in per_step:
        usable = [value for value in samples if value is not None]
        center = statistics.fmean(usable) if usable and not centered else 0.0
        centers.append(center)
        squares += sum((value - center) ** 2 for value in usable)
        degrees += max(len(usable) - (0 if centered else 1), 0)
        fewest = min(fewest, len(usable)) if usable else fewest
    spread = math.sqrt(squares / degrees) if degrees else 0.0
    # A new sample's distance from a center estimated from n samples has (1 + 1/n) times the
    # variance of one sample's distance from the true center.
    center_samples = None if centered or math.isinf(fewest) else int(fewest)
    return tuple(centers), spread, prediction_limit(degrees, center_samples)


def prediction_limit(degrees: int, center_samples: int | None = None) -> float:
    """The z limit for a new sample scored against a spread estimated with ``degrees`` degrees
    of freedom (and a center estimated from ``center_samples`` samples, None: known center).

    It has the same false-alarm probability per check as Z_LIMIT under a Gaussian null: Student's
    t quantile, widened by sqrt(1 + 1/n) for an estimated center. Without degrees of freedom
    there is no spread estimate (the floor stands in for it) and Z_LIMIT is kept.
    """
    if degrees < 1:
        return Z_LIMIT
    limit = limit_with_tail(FALSE_ALARM_PER_CHECK, degrees)
    if center_samples is not None:
        limit *= math.sqrt(1.0 + 1.0 / center_samples)
    return limit


def _noise_limit(noises: Sequence[float]) -> float:
    """Largest legitimate update noise: NOISE_MARGIN times the largest seen, or the log-normal
    extrapolation to Z_LIMIT deviations where the samples' spread says the tail is heavy.

    Not widened by Student's t like the z limits: this one-sided bound already extrapolates
    far beyond its samples, and with the few samples of a short calibration a t quantile
    would make it vacuous (5 samples: 340 deviations)."""
    margin = NOISE_MARGIN * max(noises, default=0.0)
    logs = [math.log(noise) for noise in noises if noise > 0]
    if len(logs) < MIN_NOISE_SAMPLES_FOR_FIT:
        return margin
    fitted = math.exp(statistics.fmean(logs) + Z_LIMIT * statistics.stdev(logs))
    return max(margin, fitted)


def _noise_log_spread(
    per_step: Sequence[Sequence[ParameterComparison]],
    noise_scale: Sequence[float],
    rounding: Sequence[float],
) -> tuple[float, float]:
    """The spread of the calibration's log noise ratios (:func:`_log_noise_ratio`) around
    each step's mean, pooled over steps, and the z limit its degrees of freedom support."""
    per_step_logs = [
        [
            _log_noise_ratio(p.noise, noise_scale[s], rounding[s])
            for p in samples
            if p.bias is not None and math.isfinite(p.noise)
        ]
        for s, samples in enumerate(per_step)
    ]
    _, spread, z_limit = _centers_and_pooled_spread(per_step_logs, centered=False)
    return max(spread, MIN_NOISE_LOG_SPREAD), z_limit


def _log_noise_ratio(noise: float, noise_scale: float, rounding_scale: float) -> float:
    """log(noise / typical noise), where rounding sets the least typical noise: a parameter
    whose calibration left it exact (an uncompressed all-reduce of a bias) scores rounding-level
    differences as typical, as its noise limit does."""
    typical = max(noise_scale, ROUNDING_NOISE_MARGIN * rounding_scale, NOISE_FLOOR)
    return math.log(max(noise, NOISE_FLOOR) / typical)


def _zero_change_limit(per_step: Sequence[Sequence[ParameterComparison]]) -> int:
    largest = max(abs(p.zero_change) for samples in per_step for p in samples)
    count = per_step[0][0].count
    return int(NOISE_MARGIN * largest) + max(1, math.ceil(ZERO_SLACK_FRACTION * count))


def _median(samples: Iterable[float]) -> float:
    values = [_finite(value) for value in samples]
    return statistics.median(values) if values else 0.0


def _finite(value: float) -> float:
    return value if math.isfinite(value) else 0.0


def _normalized(component: float | None, error_scale: float) -> float | None:
    """An error component (bias, radial shift) in units of the calibration's typical relative
    error at that step.

    The relative error of an update shrinks over the first steps as momentum builds up, and
    each component shrinks with it; their ratio is roughly stationary, which lets samples pool
    across steps. (The orthogonal noise alone would not do: a pure scale error has none at
    step 1.)
    """
    if component is None:
        return None
    return component / max(error_scale, NOISE_FLOOR)


def judge(run: CoSimulation, region: Region) -> Verdict:
    """Check every (step, parameter) of ``run`` against ``region``; violations in step order.

    Only the rows of :func:`check_rows` that break their limit, and the worst one, become
    :class:`Violation` objects: a passing check of a small model makes a few hundred rows, and
    building each as a frozen dataclass was a measurable share of its time.
    """
    verdict = Verdict(checks=0)
    worst: CheckRow | None = None
    worst_ratio = 0.0
    for row in check_rows(run, region):
        verdict.checks += 1
        row_ratio = ratio(row[3], row[4])
        if worst is None or row_ratio > worst_ratio:
            worst, worst_ratio = row, row_ratio
        if row_ratio > 1.0:
            verdict.violations.append(Violation(*row))
    for comparison in run.comparisons:
        if (
            comparison.candidate_global_logm is not None
            and comparison.reference_global_logm is not None
        ):
            gap = abs(comparison.candidate_global_logm - comparison.reference_global_logm)
            verdict.global_logm_gap = max(verdict.global_logm_gap, gap)
        elif (
            comparison.reference_global_logm is not None
            and verdict.global_logm_undefined_from is None
        ):
            verdict.global_logm_undefined_from = comparison.step
    verdict.worst = Violation(*worst) if worst is not None else None
    verdict.global_logm_gap_limit = region.global_logm_gap_limit
    return verdict


# (step, parameter, check, value, limit): a Violation's fields, before it is one.
CheckRow: TypeAlias = tuple[int, str, str, float, float]


def check_rows(run: CoSimulation, region: Region) -> Iterator[CheckRow]:
    """Every check of ``run`` against ``region`` as a (step, parameter, check, value, limit)
    row, in step order, then model order: what :func:`judge` judges, for anything that must
    agree with its verdict (the report's map of ratios)."""
    cumulative: dict[str, list[float]] = {}
    for comparison in run.comparisons:
        for parameter in comparison.parameters:
            bounds = region.parameters.get(parameter.name)
            if bounds is None:
                raise ValueError(
                    f"parameter {parameter.name!r} of workload {run.workload!r} is not in the "
                    "baseline region: the model changed since it was recorded; re-record it"
                )
            yield from _check(comparison.step, parameter, bounds, cumulative)


def ratio(value: float, limit: float) -> float:
    """How many times its limit ``value`` is; a NaN value is infinitely over (a NaN ratio
    would compare as inside every limit)."""
    if math.isnan(value):
        return math.inf
    if value == 0:
        return 0.0
    if limit == 0:
        return math.inf
    return abs(value) / limit


def _check(
    step: int,
    parameter: ParameterComparison,
    bounds: ParameterRegion,
    cumulative: dict[str, list[float]],
) -> list[CheckRow]:
    """All checks of one parameter at one step, each as value-beside-limit (ratio <= 1: inside)."""
    name = parameter.name
    if parameter.non_finite:
        # How many, where counted (a trace written before counts were kept has none).
        count = parameter.nan_count + parameter.inf_count
        return [(step, name, NON_FINITE_CHECK, count if count else math.inf, 0)]
    index = min(step, len(bounds.noise_limit)) - 1
    outcomes: list[CheckRow] = [
        (step, name, "zero count change", parameter.zero_change, bounds.zero_change_limit),
    ]
    noise_limit = bounds.noise_limit[index]
    if parameter.bias is None:
        # The reference left this parameter unchanged; any candidate update is pure noise.
        moved = parameter.error_norm
        outcomes.append((step, name, "update where the reference has none", moved, 0.0))
        return outcomes
    outcomes.append((step, name, "update noise", parameter.noise, noise_limit))
    if math.isfinite(parameter.noise):
        outcomes.append(_noise_evidence(step, parameter, bounds, index, cumulative))
    error_scale = bounds.error_scale[index]
    normalized = _normalized(parameter.bias, error_scale)
    if normalized is not None:
        # A candidate noisier than calibration fluctuates more: widen the spread by its excess
        # noise (the part of its error off the update's direction), but keep measuring the shift
        # of its center in calibration units, so a deterministic scale error stands out.
        noise_scale = bounds.noise_scale[index]
        excess = max(1.0, parameter.noise / max(noise_scale, NOISE_FLOOR))
        # Rounding-level errors are about one rounding scale either way: no spread is smaller.
        # MIN_BIAS_SPREAD as well: a region built in code may hold a zero spread (a loaded
        # one cannot), and it must not divide by zero.
        floor = max(bounds.rounding_scale[index] / max(error_scale, NOISE_FLOOR), MIN_BIAS_SPREAD)
        spread = max(bounds.bias_spread, floor)
        score = (normalized - bounds.bias_center[index]) / (spread * excess)
        history = cumulative.setdefault(name, [])
        outcomes.extend(
            _z_checks(step, name, "update bias", score, history, limit=bounds.bias_z_limit)
        )
        # The radial shift, in the same units: a weight-decay, clipping or scale error shrinks
        # or grows the weights every step the same way, so it adds up over steps too.
        radial = _normalized(parameter.radial, error_scale)
        if radial is not None:
            radial_spread = max(bounds.radial_spread, floor)
            score = (radial - bounds.radial_center[index]) / (radial_spread * excess)
            history = cumulative.setdefault(f"{name}\0radial", [])
            limit = bounds.radial_z_limit
            outcomes.extend(_z_checks(step, name, "radial shift", score, history, limit=limit))
    return outcomes


def _noise_evidence(
    step: int,
    parameter: ParameterComparison,
    bounds: ParameterRegion,
    index: int,
    cumulative: dict[str, list[float]],
) -> CheckRow:
    """The noise's z-score combined over this parameter's steps so far (Stouffer), each
    step's capped at NOISE_SCORE_CAP either way. One-sided: less noise than calibration is no
    evidence of a bug, so the value is never below 0."""
    log_ratio = _log_noise_ratio(
        parameter.noise, bounds.noise_scale[index], bounds.rounding_scale[index]
    )
    # Capped both ways: a step exact where the candidate is otherwise exact (step 1 of a bug
    # acting from step 2) must not cancel the evidence of the steps after it.
    score = max(-NOISE_SCORE_CAP, min(log_ratio / bounds.noise_log_spread, NOISE_SCORE_CAP))
    history = cumulative.setdefault(f"{parameter.name}\0noise", [])
    history.append(score)
    combined = max(0.0, sum(history) / math.sqrt(len(history)))
    check = f"update noise over steps 1-{step} (z-score)"
    return (step, parameter.name, check, combined, bounds.noise_z_limit)


def _z_checks(
    step: int, name: str, statistic: str, score: float, history: list[float], *, limit: float
) -> list[CheckRow]:
    """A z-score at this step, and combined with this parameter's earlier ones (Stouffer).

    One limit serves both: every score shares the region's spread estimate, so the combination
    is t-distributed with the same degrees of freedom as each score.
    """
    history.append(score)
    combined = sum(history) / math.sqrt(len(history))
    return [
        (step, name, f"{statistic} (z-score)", score, limit),
        (step, name, f"{statistic} over steps 1-{step} (z-score)", combined, limit),
    ]
