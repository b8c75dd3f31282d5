"""The router registry: routers are chosen by name in :class:`~rankmoe.RankMoEConfig`."""

from __future__ import annotations

from collections.abc import Callable

from rankmoe.routers.base import Router
from rankmoe.utils.registry import Registry

ROUTERS: Registry[type[Router]] = Registry("router")
"""Registered router classes by name (``linear``, ``pooled``, ``condition``, ``static`` and user routers)."""


def register_router(name: str) -> Callable[[type[Router]], type[Router]]:
    """Class decorator registering a :class:`~rankmoe.routers.Router` subclass under ``name``.

    Register before building a config that names the router; the name is stored in the saved config,
    so the registering code must also be imported before loading such an adapter.

    Args:
        name: Lower-case identifier, unique among routers.

    Raises:
        ValueError: If the name is taken or malformed, or the class is not a ``Router`` subclass.

    Example:
        >>> import torch
        >>> from rankmoe.routers import Router, register_router, unregister_router
        >>> @register_router("first_feature")
        ... class FirstFeatureRouter(Router):
        ...     level = "sample"
        ...     def forward(self, inputs):
        ...         first = inputs.x.reshape(inputs.batch_size, -1)[:, :1]
        ...         return first.expand(-1, self.layout.num_slots)
        >>> unregister_router("first_feature")
    """
    register = ROUTERS.register(name)

    def decorator(cls: type[Router]) -> type[Router]:
        if not (isinstance(cls, type) and issubclass(cls, Router)):
            raise ValueError(f"register_router({name!r}) expects a subclass of rankmoe.routers.Router, got {cls!r}")
        if cls.level not in ("token", "sample"):
            raise ValueError(f"{cls.__name__}.level must be 'token' or 'sample', got {cls.level!r}")
        return register(cls)

    return decorator


def unregister_router(name: str) -> None:
    """Remove a router registered with :func:`register_router`.

    Raises:
        KeyError: If no router of that name is registered.
    """
    ROUTERS.unregister(name)


def get_router_class(name: str) -> type[Router]:
    """Return the router class registered as ``name``.

    Raises:
        ValueError: If ``name`` is unknown; the message lists the registered routers.
    """
    return ROUTERS.get(name)
