"""Named registries (workloads, candidates) with errors that list what is known.

A registry can also be given *sources*: ``"module:function"`` names of functions that register
items, called once, the first time a lookup needs them. Whoever needs a catalogue (the plugin,
the CLI, a benchmark) adds its source; the registry itself imports none, and a source travels
to a worker process as a string.
"""

from __future__ import annotations

import difflib
import importlib
from typing import Generic, TypeVar

__all__ = ["Registry"]

T = TypeVar("T")


class Registry(Generic[T]):
    """Items by name; a duplicate name is refused unless replacing is asked for."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}
        self._sources: list[str] = []
        self._loaded: set[str] = set()

    def register(self, name: str, item: T, *, replace_existing: bool = False) -> T:
        if name in self._items and not replace_existing:
            raise ValueError(
                f"a {self.kind} named {name!r} is already registered; pass "
                "replace_existing=True to replace it"
            )
        self._items[name] = item
        return item

    def __contains__(self, name: object) -> bool:
        """Registered now, sources not loaded: what a source checks before it registers."""
        return name in self._items

    def get(self, name: str) -> T:
        if name not in self._items:
            self.load_sources()
        try:
            return self._items[name]
        except KeyError:
            names = self.names()
            close = difflib.get_close_matches(name, names, n=3)
            guess = f"did you mean {' or '.join(map(repr, close))}? " if close else ""
            raise ValueError(
                f"unknown {self.kind} {name!r}; {guess}registered {self.kind}s: "
                f"{', '.join(names) or 'none'}"
            ) from None

    def names(self) -> list[str]:
        self.load_sources()
        return sorted(self._items)

    def add_source(self, source: str) -> None:
        """Call ``source`` (``"package.module:function"``) the first time a lookup needs it."""
        module, _, function = source.partition(":")
        if not module or not function:
            raise ValueError(f"a {self.kind} source is 'package.module:function', got {source!r}")
        if source not in self._sources:
            self._sources.append(source)

    def sources(self) -> tuple[str, ...]:
        return tuple(self._sources)

    def load_sources(self) -> None:
        """Call every source not called yet (each once, even when it fails)."""
        for source in self._sources:
            if source in self._loaded:
                continue
            self._loaded.add(source)
            module, _, function = source.partition(":")
            try:
                register = getattr(importlib.import_module(module), function)
            except (ImportError, AttributeError) as error:
                raise ValueError(
                    f"{self.kind} source {source!r} cannot be loaded: {error}"
                ) from error
            register()
