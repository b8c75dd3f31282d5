"""Small generic helpers shared by the rest of the package."""

from rankmoe.utils.registry import Registry

__all__ = ["Registry"]
