"""Placeholder: being written (issue 6)."""

__all__: list[str] = []
