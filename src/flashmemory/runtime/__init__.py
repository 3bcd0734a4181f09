"""The LSA decode loop and its accounting."""

from .generate import GenerationResult, generate, generate_ids
from .session import Session
from .stats import GenerationStats

__all__ = ["GenerationResult", "GenerationStats", "Session", "generate", "generate_ids"]
