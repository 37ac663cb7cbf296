"""Name -> object registries filled by decorators (datasets, methods, losses, ...)."""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from fct.errors import FCTError

T = TypeVar("T")


def did_you_mean(name: str, choices: list[str] | tuple[str, ...] | set[str]) -> str:
    """Return ' (did you mean X?)' for the closest choice, or '' when nothing is close."""
    close = difflib.get_close_matches(name, sorted(choices), n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


class Registry(Generic[T]):
    """A decorator-filled dict of named entries; duplicates raise, unknown names hint.

    ``kind`` names what is registered ("method", "dataset") for error messages; ``hint``
    says where the full list is (e.g. "fct list methods").
    """

    def __init__(self, kind: str, hint: str = "") -> None:
        self.kind = kind
        self.hint = hint
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator registering an object under ``name``; a taken name raises."""

        def deco(obj: T) -> T:
            if name in self._entries and self._entries[name] is not obj:
                raise FCTError(f"{self.kind} '{name}' is already registered; choose another name")
            self._entries[name] = obj
            return obj

        return deco

    def get(self, name: str) -> T:
        """The entry registered as ``name``; an unknown name raises FCTError with a hint."""
        if name not in self._entries:
            where = f"; see `{self.hint}`" if self.hint else ""
            raise FCTError(
                f"unknown {self.kind} '{name}'{did_you_mean(name, self._entries)}{where}"
            )
        return self._entries[name]

    def names(self, pattern: str = "*") -> list[str]:
        """Sorted registered names matching a shell-style wildcard ``pattern``."""
        return sorted(n for n in self._entries if fnmatch.fnmatchcase(n, pattern))

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)
