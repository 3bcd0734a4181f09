"""``benchmarks/planted_fact_eval.py``: answers are kept as they are made, and a stopped run resumes."""

import json
import re
from types import SimpleNamespace

import pytest

from flashmemory.bench.runner import read_rows
from flashmemory.config import LSAConfig

from .fake_tokenizers import CharTokenizer
from .scripts import load_script

SETTINGS = {"model": "tiny", "budget": 0.2}


@pytest.fixture(scope="module")
def script():
    return load_script("planted_fact_eval")


@pytest.fixture
def answers(script, monkeypatch):
    """Stand-in decoding: full attention answers correctly, LSA wrongly; every call is counted."""
    calls = []

    def fake_generate(model, tok, prompt, *, method, **_):
        calls.append(method)
        code = re.search(r"access code of the \w+ in \w+ is (\d+)", prompt)[1] if method == "full" else "0000"
        stats = SimpleNamespace(to_dict=lambda: {"kv_ratio": 1.0 if method == "full" else 0.2, "pages_recalled": []})
        return SimpleNamespace(text=f"The code is {code}.", stats=stats)

    monkeypatch.setattr(script, "generate", fake_generate)
    return calls


def grid(script, out, settings=SETTINGS, samples=3):
    methods = {"full": ("full", None), "lsa-zeroshot": ("lsa", None)}
    return script.run(None, CharTokenizer(), methods, LSAConfig(budget=0.2), [512], samples, 7, 8, out, settings)


def test_a_stopped_run_resumes_without_answering_again(script, answers, tmp_path):
    rows = grid(script, tmp_path)
    assert len(answers) == 6 and [r["correct"] for r in rows] == [True, False] * 3
    assert [(r["seed"], r["method"]) for r in rows][:2] == [(7, "full"), (7, "lsa-zeroshot")]
    log = tmp_path / script.ROWS
    lines = log.read_text().splitlines()
    log.write_text("\n".join(lines[:3]) + "\n" + lines[3][:20])  # stopped while writing the fourth answer
    again = grid(script, tmp_path)
    assert len(answers) == 6 + 3  # only the three answers not kept whole are made again
    assert [(r["seed"], r["method"], r["correct"]) for r in again] == [
        (r["seed"], r["method"], r["correct"]) for r in rows
    ]
    assert len(read_rows(log)) == 6  # the cut line is dropped, every new answer has a line of its own
    grid(script, tmp_path)
    assert len(answers) == 9  # nothing left to do


def test_answers_made_with_other_settings_are_not_mixed(script, answers, tmp_path):
    grid(script, tmp_path, samples=1)
    with pytest.raises(SystemExit, match="other settings"):
        grid(script, tmp_path, settings={**SETTINGS, "budget": 0.25}, samples=1)
    assert json.loads((tmp_path / script.SETTINGS).read_text()) == SETTINGS
