"""The command line a recorded result names must reproduce the run."""

from pathlib import Path

from flashmemory.bench.record import command_line


def test_command_line_repeats_list_flags_and_drops_unset_ones():
    args = {"model": "smollm2-135m", "max_new_tokens": 16, "ckpt": [Path("ck_a"), Path("ck_b")], "out": None, "x": []}
    assert command_line("bench.py", args) == (
        "python bench.py --model smollm2-135m --max-new-tokens 16 --ckpt ck_a --ckpt ck_b"
    )


def test_command_line_writes_switches_bare_and_leaves_out_those_off():
    args = {"models": "llama3-8b", "compile": True, "fuse_projections": False, "contexts": "131072"}
    assert command_line("speed.py", args) == "python speed.py --models llama3-8b --compile --contexts 131072"
