"""The LSA decode loop and its accounting."""

from .generate import GenerationResult, generate, generate_ids
from .stats import GenerationStats

__all__ = ["GenerationResult", "GenerationStats", "generate", "generate_ids"]
