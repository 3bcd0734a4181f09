"""The command line a recorded result names must reproduce the run."""

from pathlib import Path

from flashmemory.bench.record import command_line


def test_command_line_repeats_list_flags_and_drops_unset_ones():
    args = {"model": "smollm2-135m", "max_new_tokens": 16, "ckpt": [Path("ck_a"), Path("ck_b")], "out": None, "x": []}
    assert command_line("bench.py", args) == (
        "python bench.py --model smollm2-135m --max-new-tokens 16 --ckpt ck_a --ckpt ck_b"
    )
