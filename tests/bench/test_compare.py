"""bench-compare pairs two folders' rows by sample and scores them as the bench summary does."""

import json

import pytest
from typer.testing import CliRunner

from flashmemory.bench.compare import compare_folders, comparison_markdown
from flashmemory.cli import app

CONFIG = {"taskset_family": "ruler", "model": "m", "seed": 0, "budget": 0.15, "protocol": "single-prefill"}


def write_folder(path, rows, **lsa):
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({**CONFIG, "lsa": {"chunk_size": 16, **lsa}, "commit": "abc"}))
    lines = [
        json.dumps({"task": t, "length": n, "sample": i, "method": m, "score": s, "prompt_tokens": n - 100})
        for t, n, i, m, s in rows
    ]
    (path / "results.jsonl").write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def folders(tmp_path):
    base = write_folder(
        tmp_path / "base",
        [
            ("a", 4096, 0, "lsa", 0.0),
            ("a", 4096, 1, "lsa", 100.0),
            ("b", 4096, 0, "lsa", 50.0),
            ("a", 4096, 0, "full", 100.0),
            ("a", 4096, 1, "full", 100.0),
            ("b", 4096, 0, "full", 100.0),
            ("a", 8192, 0, "lsa", 0.0),  # no full row: left out
            ("b", 4096, 1, "lsa", 0.0),  # not in the other folder: left out
        ],
        first_boundary_keys="chunk",
    )
    other = write_folder(
        tmp_path / "other",
        [
            ("a", 4096, 0, "lsa", 100.0),
            ("a", 4096, 1, "lsa", 100.0),
            ("b", 4096, 0, "lsa", 0.0),
            ("a", 8192, 0, "lsa", 0.0),
        ],
        first_boundary_keys="token",
    )
    return base, other


def test_rows_pair_by_sample_and_lengths_average_task_means(folders):
    result = compare_folders(*folders)
    assert result["pairs"] == 3
    (row,) = result["per_length"]
    # task a: 50 -> 100, task b: 50 -> 0; a length's score is the mean of its task means
    assert (row["length"], row["pairs"], row["base"], row["other"], row["full"]) == (4096, 3, 50.0, 50.0, 100.0)
    assert [(r["task"], r["delta"]) for r in result["per_task"]] == [("b", -50.0), ("a", 50.0)]
    assert result["changes"] == ["first_boundary_keys: 'chunk' -> 'token'"]
    text = comparison_markdown(result)
    assert "| 4096 | 3 | 50.0 | 50.0 | +0.0 | 100.0 |" in text and "| b | 1 | 50.0 | 0.0 | -50.0 | 100.0 |" in text


def test_without_a_reference_every_shared_sample_counts(folders):
    result = compare_folders(*folders, references=())
    assert result["pairs"] == 4 and "full" not in result["per_length"][0]  # now with the 8K sample
    assert [r["length"] for r in result["per_length"]] == [4096, 8192]


def test_folders_of_other_samples_are_refused(folders, tmp_path):
    base, other = folders
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "seed": 1}))
    with pytest.raises(ValueError, match="ran different samples.*seed"):
        compare_folders(base, other)
    (other / "config.json").write_text(json.dumps(config))
    rows = (other / "results.jsonl").read_text().replace('"prompt_tokens": 3996', '"prompt_tokens": 3990', 1)
    (other / "results.jsonl").write_text(rows)
    with pytest.raises(ValueError, match="do not hold the same samples"):
        compare_folders(base, other)
    with pytest.raises(ValueError, match="no sample of method 'quest'"):
        compare_folders(base, other, method="quest")


def test_cli_writes_the_tables_and_rejects_a_missing_folder(folders, tmp_path):
    out = tmp_path / "cmp" / "lsa.md"
    res = CliRunner().invoke(app, ["bench-compare", *map(str, folders), "--reference", "full,lsa", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "| length | samples | base | other | delta | full | lsa |" in out.read_text()
    assert json.loads(out.with_suffix(".json").read_text())["pairs"] == 3
    res = CliRunner().invoke(app, ["bench-compare", str(folders[0]), str(tmp_path / "none")])
    assert res.exit_code == 2 and "bench output folder" in res.output
