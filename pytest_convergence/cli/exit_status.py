"""The command's exit statuses, named once for every subcommand and for callers of
``main``."""

from __future__ import annotations

__all__ = ["EXIT_ERROR", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_OUTSIDE"]

EXIT_OK = 0
EXIT_OUTSIDE = 1
EXIT_ERROR = 2
EXIT_INTERRUPTED = 130
