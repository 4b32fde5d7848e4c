"""Registries keyed by exact names: adding a tower or projector is one decorated function."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """A name -> builder map. Lookups are exact; an unknown name lists the known ones."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(item: T) -> T:
            if name in self._items:
                raise KeyError(f"{self.kind} {name!r} is already registered")
            self._items[name] = item
            return item

        return add

    def get(self, name: str) -> T:
        self._load_builtins()
        try:
            return self._items[name]
        except KeyError:
            raise KeyError(f"unknown {self.kind} {name!r}; registered: {sorted(self._items)}") from None

    def __contains__(self, name: object) -> bool:
        self._load_builtins()
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        self._load_builtins()
        return iter(self._items)

    def _load_builtins(self) -> None:
        # Built-in parts register themselves on import; importing here keeps
        # `name in REGISTRY` right even before the model module was imported.
        import llava_lite.projectors  # noqa: F401
        import llava_lite.vision  # noqa: F401


VISION_TOWERS: Registry = Registry("vision tower")
PROJECTORS: Registry = Registry("projector")
