"""Report diagnostics: where the candidate's weights lie on the loss surface, and how per-layer
weight and gradient norms drift apart over training.

A verdict says that, and where, a candidate left its region; a reviewer then asks what kind of
damage it is. Two pictures answer that cheaply:

- A **loss-landscape slice** at the first failing step (Li et al. 2018, "Visualizing the loss
  landscape of neural nets"): the loss on that step's batch along the straight line from the
  reference's weights after the step to the candidate's (alpha 0 to 1, extended on both sides),
  and along filter-normalized random directions around each. A smooth line and random-direction
  curves of the same shape around both points: the candidate drifted inside the reference's
  basin. A barrier between the two, or a different basin around the candidate: it left it.
- The **norm evolution** (the weight-evolution poster, 2017): per-layer L2 norms of weights and
  gradients over free-running training, reference against candidate. A re-synced step shows each
  step's own error; the free-running norms show where errors accumulate: a layer whose weights
  grow or shrink away from the reference's, gradients that explode or die.

Both are bounded in cost and run only when a report folder is written. The slice replays the
reference to the failing step (as :mod:`replay` does), takes one step of each side and, by
default, 86 forward passes without backward on one batch; the norms need one free-running
candidate run (the reference's norms are already in the co-simulation's trace).

The loss of every point is the reference implementation's (its model, forward pass and loss
function): the landscape is one function, and the candidate's weights are a point on it.
"""

from __future__ import annotations

from pytest_convergence.diagnostics.landscape import (
    ALPHAS,
    BETAS,
    DIRECTIONS,
    LandscapeSlice,
    filter_normalized_direction,
    loss_landscape_slice,
    plot_landscape,
)
from pytest_convergence.diagnostics.norms import (
    NormEvolution,
    NormPoint,
    chosen_parameters,
    free_running_norms,
    norm_evolution,
    plot_norm_evolution,
)

__all__ = [
    "ALPHAS",
    "BETAS",
    "DIRECTIONS",
    "LandscapeSlice",
    "NormEvolution",
    "NormPoint",
    "chosen_parameters",
    "filter_normalized_direction",
    "free_running_norms",
    "loss_landscape_slice",
    "norm_evolution",
    "plot_landscape",
    "plot_norm_evolution",
]
