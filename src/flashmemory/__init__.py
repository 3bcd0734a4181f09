"""flashmemory: Lookahead Sparse Attention with a trained Memory Indexer for long-context decoding.

Exports resolve lazily, so importing one part (say, the backbone-free trainer) does not import model classes.
"""

from importlib import import_module

_EXPORTS = {
    "LSAConfig": ".config",
    "LSACache": ".attention.cache",
    "MemoryIndexer": ".indexer.memory_indexer",
    "load_indexer": ".indexer.checkpoint",
    "save_indexer": ".indexer.checkpoint",
    "BudgetError": ".memory.layout",
    "DEFAULT_MODEL": ".models.registry",
    "ModelLoadError": ".models.loader",
    "load_model": ".models.loader",
    "model_fingerprint": ".models.loader",
    "GenerationResult": ".runtime.generate",
    "generate": ".runtime.generate",
    "generate_ids": ".runtime.generate",
    "GenerationStats": ".runtime.stats",
    "Sampling": ".runtime.sampling",
    "TextStream": ".runtime.sampling",
    "Session": ".runtime.session",
    "MemoryPlan": ".runtime.plan",
    "plan_memory": ".runtime.plan",
    "load_config": ".runtime.plan",
}

__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module 'flashmemory' has no attribute {name!r}")
