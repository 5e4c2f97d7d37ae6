"""The HTML report's section on what the baseline can catch: its power report
(:mod:`pytest_convergence.power`) as the summary lines and a per-layer table, each cell the
smallest fault size caught on that layer and the step it is caught at.

A verdict of "passed" means only as much as the region's power: the section sits right after
the verdict so that a reader sees both together. Importing this module does not import torch.
"""

from __future__ import annotations

import html

from pytest_convergence.power import PowerReport, power_lines

__all__ = ["power_section"]


def power_section(report: PowerReport | None) -> str:
    """The section, or a line saying the baseline has no power report."""
    if report is None:
        return (
            '<section class="power"><h2>What this baseline catches</h2><p class="note">The '
            "baseline has no power report (recorded before power reports existed, with "
            "convergence_power = false, or by a DDP check); re-record it to measure one."
            "</p></section>"
        )
    summary = "\n".join(power_lines(report))
    return (
        '<section class="power"><h2>What this baseline catches</h2>'
        f"<pre>{_e(summary)}</pre>{_layer_table(report)}</section>"
    )


def _layer_table(report: PowerReport) -> str:
    faults = report.layer_faults
    if not faults:
        return ""
    head = "".join(f"<th>{_e(power.fault)}</th>" for power in faults)
    rows = []
    for target in report.targets:
        cells = [f'<td class="name">{_e(target)}</td>']
        for power in faults:
            catch = power.caught.get(target)
            if catch is None:
                title = "not caught at twice a limit at any size"
                cells.append(f'<td class="out" title="{title}">blind</td>')
            else:
                title = f"caught from size {catch.size:g} at step {catch.step}, {catch.ratio:.3g}x"
                cells.append(
                    f'<td title="{_e(title)}">{catch.size:g} <span class="note">step '
                    f"{catch.step}</span></td>"
                )
        rows.append(f"<tr>{''.join(cells)}</tr>")
    return (
        '<table class="data power-layers"><thead><tr><th>parameter</th>'
        f"{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
        '<p class="hint">Each cell: the smallest fault size from which every larger size of '
        "the ladder fails the check by at least twice a limit, and the step it first does so."
        "</p>"
    )


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)
