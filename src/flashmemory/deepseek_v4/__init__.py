"""DeepSeek-V4 backend: LSA over the CSA layers' compressed entries, with the native lightning indexer.

Exports resolve lazily: the Memory Indexer module is loaded by the backbone-free trainer, which must not import
model classes.
"""

from importlib import import_module

_EXPORTS = {
    "DeepseekV4Spec": ".spec",
    "deepseek_v4_spec": ".spec",
    "is_deepseek_v4": ".spec",
    "DeepseekV4LSACache": ".cache",
    "deepseek_v4_lsa_config": ".cache",
    "DeepseekV4MemoryIndexer": ".memory_indexer",
    "DeepseekV4IndexerSpec": ".memory_indexer",
    "EntryStore": ".entry_store",
    "KVBytes": ".accounting",
    "full_cache_bytes": ".accounting",
    "lsa_cache_bytes": ".accounting",
    "plan_reserve": ".accounting",
    "generate_ids": ".generate",
    "generate": ".generate",
    "flash_config": ".configs",
    "tiny_deepseek_v4": ".configs",
    "tiny_deepseek_v4_config": ".configs",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module 'flashmemory.deepseek_v4' has no attribute {name!r}")
