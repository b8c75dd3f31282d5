"""A tiny name -> object registry used for routers and balancing losses."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps lower-case names to objects (classes or functions).

    Each registry is an instance owned by the module that defines it, so there is no hidden
    module-level state beyond these explicit, documented tables.

    Args:
        kind: What the registry holds, used in error messages (for example ``"router"``).

    Example:
        >>> reg = Registry("widget")
        >>> @reg.register("blue")
        ... class Blue: ...
        >>> reg.get("blue") is Blue
        True
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Return a decorator that registers its target under ``name``.

        Args:
            name: Non-empty lower-case identifier; must not be registered already.

        Raises:
            ValueError: If ``name`` is not a non-empty lower-case string or is already taken.
        """
        if not isinstance(name, str) or not name or name != name.lower() or not name.replace("_", "").isalnum():
            raise ValueError(
                f"{self.kind} name must be a non-empty lower-case identifier (letters, digits, '_'), got {name!r}"
            )

        def decorator(obj: T) -> T:
            if name in self._entries:
                raise ValueError(
                    f"a {self.kind} named {name!r} is already registered ({self._entries[name]!r}); "
                    f"choose another name"
                )
            self._entries[name] = obj
            return obj

        return decorator

    def unregister(self, name: str) -> None:
        """Remove ``name`` (mainly for tests that register temporary entries).

        Raises:
            KeyError: If ``name`` is not registered.
        """
        if name not in self._entries:
            raise KeyError(f"no {self.kind} named {name!r} is registered")
        del self._entries[name]

    def get(self, name: str) -> T:
        """Look ``name`` up.

        Raises:
            ValueError: If ``name`` is unknown; the message lists the registered names.
        """
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise ValueError(
                f"unknown {self.kind} {name!r}; registered {self.kind}s: {', '.join(self.names())}"
            ) from None

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, names={self.names()})"
