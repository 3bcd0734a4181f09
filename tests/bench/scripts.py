"""The benchmark scripts (``benchmarks/*.py``, outside the package) as modules for their tests."""

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def load_script(name: str, *, register: bool = False) -> ModuleType:
    """``benchmarks/<name>.py`` imported as the module ``name``; ``register`` also puts it in ``sys.modules`` while
    it runs (dataclasses look their module up while being built), which the caller undoes."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    if register:
        sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
