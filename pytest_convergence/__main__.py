"""``python -m pytest_convergence``: the same command as the ``pytest-convergence`` script."""

from __future__ import annotations

from pytest_convergence.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
