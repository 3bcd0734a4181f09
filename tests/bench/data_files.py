"""Writing a data file for a loader test and reading back the loader's refusal."""

import pytest


def load_error(load, path, content: str | None) -> str:
    """The message with which ``load`` refuses ``path`` after ``content`` is written there (``None``: no file)."""
    if content is not None:
        path.write_text(content)
    with pytest.raises((ValueError, FileNotFoundError)) as err:
        load(path)
    return str(err.value)
