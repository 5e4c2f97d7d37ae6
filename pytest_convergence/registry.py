"""Named registries (workloads, candidates) with errors that list what is known."""

from __future__ import annotations

from typing import Generic, TypeVar

__all__ = ["Registry"]

T = TypeVar("T")


class Registry(Generic[T]):
    """Items by name; a duplicate name is refused unless replacing is asked for."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str, item: T, *, replace_existing: bool = False) -> T:
        if name in self._items and not replace_existing:
            raise ValueError(
                f"a {self.kind} named {name!r} is already registered; pass "
                "replace_existing=True to replace it"
            )
        self._items[name] = item
        return item

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            known = ", ".join(self.names()) or "none"
            raise ValueError(
                f"unknown {self.kind} {name!r}; registered {self.kind}s: {known}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._items)
