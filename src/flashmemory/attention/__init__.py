"""transformers Cache integration of LSA."""

from .cache import LSACache, LSALayer

__all__ = ["LSACache", "LSALayer"]
