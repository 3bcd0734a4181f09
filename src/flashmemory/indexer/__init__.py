"""Memory Indexer: frozen chunk keys, trainable query tower, scoring and page selection."""

from .checkpoint import CheckpointError, load_indexer, save_indexer
from .chunk_keys import ChunkKeys, chunk_means
from .memory_indexer import IndexerSpec, MemoryIndexer
from .scoring import chunk_logits, select_pages

__all__ = [
    "CheckpointError",
    "ChunkKeys",
    "IndexerSpec",
    "MemoryIndexer",
    "chunk_logits",
    "chunk_means",
    "load_indexer",
    "save_indexer",
    "select_pages",
]
