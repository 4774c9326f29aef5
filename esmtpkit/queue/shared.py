"""What a whole process shares: one object per configuration, made on first use, and the reactor unless given one.

The AMQP handler's publishers and the Queue handler's services are made when the first SMTP connection needs them,
which may be before ``twistd`` has installed its reactor: `DefaultReactor` imports the global one only when first
asked for it.
"""

from __future__ import annotations

from typing import Any, Callable, Generic, Hashable, TypeVar

__all__ = ["PerProcess", "DefaultReactor"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class PerProcess(Generic[K, V]):
    """One object per key for the whole process: made on first use, made again once it is no longer usable."""

    def __init__(self) -> None:
        self._found: dict[K, V] = {}

    def get(self, key: K, make: Callable[[], V], usable: Callable[[V], bool] = lambda _: True) -> V:
        """The object kept for ``key``; a new one from ``make`` when there is none or it is not ``usable``."""
        found = self._found.get(key)
        if found is None or not usable(found):
            found = self._found[key] = make()
        return found

    def forget(self, key: K, value: V) -> None:
        """Forget ``value`` (it stopped) if it is still the object kept for ``key``."""
        if self._found.get(key) is value:
            del self._found[key]

    def values(self) -> list[V]:
        """Every object kept, e.g. to stop them all at shutdown."""
        return list(self._found.values())

    def __contains__(self, key: object) -> bool:
        return key in self._found

    def __len__(self) -> int:
        return len(self._found)


class DefaultReactor:
    """An attribute holding the reactor given to the instance, or the global reactor, imported on first read.

    ``reactor = DefaultReactor()`` in the class body, ``self.reactor = reactor`` (None for the global one) in
    ``__init__``.
    """

    def __set_name__(self, owner: type, name: str) -> None:
        self._slot = f"_{name}"

    def __get__(self, instance: object, owner: type | None = None) -> Any:
        if instance is None:
            return self
        found = instance.__dict__.get(self._slot)
        if found is None:
            from twisted.internet import reactor as found

            instance.__dict__[self._slot] = found
        return found

    def __set__(self, instance: object, value: Any) -> None:
        instance.__dict__[self._slot] = value
