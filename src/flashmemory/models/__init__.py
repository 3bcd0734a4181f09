"""Backbone models: offline loading of packaged GGUF models, adapters, and tiny random models for tests.

Exports resolve lazily: the adapter is needed without transformers' model classes (backbone-free training).
"""

from importlib import import_module

_EXPORTS = {
    "ModelLoadError": ".loader",
    "ModelSource": ".loader",
    "load_model": ".loader",
    "model_fingerprint": ".loader",
    "models_cache_dir": ".loader",
    "prepare_model_folder": ".loader",
    "resolve_model_source": ".loader",
    "DEFAULT_MODEL": ".registry",
    "PACKAGED_MODELS": ".registry",
    "PackagedModel": ".registry",
    "TINY_FAMILIES": ".tiny",
    "tiny_model": ".tiny",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module 'flashmemory.models' has no attribute {name!r}")
