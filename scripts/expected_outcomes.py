"""Refuse a main-job run whose outcomes are not the expected ones (``scripts/main-job``).

pytest's exit status already fails on failures, errors and strict xpasses. What it accepts and
CI must not: a test skipped for a reason other than a missing accelerator (a baseline that
quietly stopped being found, an example that stopped running), or a run that ran nothing.
"""

from __future__ import annotations

import re
import sys
from xml.etree import ElementTree

# Skips the main job expects on a machine without a GPU: the CUDA examples.
EXPECTED_SKIP = re.compile(r"^needs CUDA \(device=.*torch\.cuda\.is_available\(\) is False$")


def main(report: str) -> int:
    cases = ElementTree.parse(report).getroot().iter("testcase")
    ran, unexpected = 0, []
    for case in cases:
        ran += 1
        skipped = case.find("skipped")
        if skipped is None or skipped.get("type") == "pytest.xfail":
            continue
        message = skipped.get("message", "")
        if not EXPECTED_SKIP.search(message):
            unexpected.append(f"{case.get('classname')}::{case.get('name')}: skipped, {message}")
    if ran == 0:
        print("main job: no test ran", file=sys.stderr)
        return 1
    for line in unexpected:
        print(f"main job: unexpected outcome: {line}", file=sys.stderr)
    if not unexpected:
        print(f"main job: {ran} tests, every outcome expected")
    return 1 if unexpected else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
