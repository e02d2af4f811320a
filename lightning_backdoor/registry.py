"""A small decorator registry, one per component kind (attacks, models, detectors).

In the manner of timm's ``@register_model`` / ``create_model`` / ``list_models``::

    ATTACKS = Registry("attack")

    @ATTACKS.register("badnets")
    class BadNets(Attack): ...

    ATTACKS.create("badnets", rate=...)   # unknown names list the known ones
    ATTACKS.list("wa*")                   # fnmatch pattern
"""

from __future__ import annotations

import fnmatch
from typing import Any, Callable, Dict, List, TypeVar

T = TypeVar("T")


class Registry:
    """Maps lower-case names to constructors (classes or factory functions)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: Dict[str, Callable[..., Any]] = {}

    def register(self, name: str | None = None) -> Callable[[T], T]:
        """Decorator registering a class or factory under ``name`` (default: its ``__name__`` lower-cased)."""

        def decorator(obj: T) -> T:
            key = (name or obj.__name__).lower()  # type: ignore[attr-defined]
            if key in self._entries and self._entries[key] is not obj:
                raise ValueError(f"{self.kind} {key!r} is already registered")
            self._entries[key] = obj  # type: ignore[assignment]
            return obj

        return decorator

    def get(self, name: str) -> Callable[..., Any]:
        if not isinstance(name, str):
            raise TypeError(f"{self.kind} name must be a str, got {type(name).__name__}: {name!r}")
        key = name.lower()
        if key not in self._entries:
            raise ValueError(
                f"unknown {self.kind} {name!r}; known {self.kind}s: {', '.join(self.list())}"
            )
        return self._entries[key]

    def create(self, name: str, /, **kwargs: Any) -> Any:
        return self.get(name)(**kwargs)

    def list(self, pattern: str = "*") -> List[str]:
        return sorted(k for k in self._entries if fnmatch.fnmatch(k, pattern.lower()))

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._entries

    def __iter__(self):
        return iter(self.list())

    def __len__(self) -> int:
        return len(self._entries)
