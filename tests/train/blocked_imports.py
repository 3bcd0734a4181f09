"""Train an indexer in a fresh interpreter that cannot import any transformers model class."""

import subprocess
import sys
from pathlib import Path

_BLOCK_MODEL_CLASSES = """\
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.startswith("transformers.models") or name == "transformers.modeling_utils":
            raise ImportError("model classes are blocked: " + name)
sys.meta_path.insert(0, Block())
from flashmemory.train.trainer import TrainConfig, train_indexer
"""


def train_without_model_classes(dump_dir: Path, out_dir: Path, config: str, check: str) -> None:
    """Run ``train_indexer`` on ``dump_dir`` with model-class imports blocked, then the assertion ``check``.

    Args:
        config: the ``TrainConfig(...)`` arguments, as source text.
        check: one line of source run after training (it sees ``sys``).
    """
    script = _BLOCK_MODEL_CLASSES + "\n".join(
        [
            f"cfg = TrainConfig({config})",
            f"train_indexer([{str(dump_dir)!r}], {str(out_dir)!r}, cfg, progress=False)",
            check,
            'print("ok")',
        ]
    )
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "ok" in res.stdout
