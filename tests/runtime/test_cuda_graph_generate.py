"""``generate_ids(cuda_graph=True)``: decode steps replayed from a captured CUDA graph inside the decode loop."""

import sys

import pytest
import torch

from flashmemory.config import LSAConfig
from flashmemory.models.tiny import tiny_model
from flashmemory.runtime.ask import ask_file
from flashmemory.runtime.generate import generate_ids
from flashmemory.runtime.graph_step import choose_graph_replay

from ..conftest import SMALL_LSA


def _forward_counter(model) -> list[int]:
    calls = [0]
    model.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_cuda_graph_is_refused_before_the_prefill_off_cuda():
    model = tiny_model("llama")
    calls = _forward_counter(model)
    ids = torch.randint(3, 250, (1, 64))
    lsa = LSAConfig(budget=None, max_pages=2, attention_backend="torch", **SMALL_LSA)
    with pytest.raises(ValueError, match="CUDA device"):
        generate_ids(model, ids, lsa=lsa, max_new_tokens=4, cuda_graph=True)
    assert calls[0] == 0  # nothing was computed and thrown away


def test_ask_refuses_cuda_graph_with_full_attention_before_loading(tmp_path):
    context = tmp_path / "doc.txt"
    context.write_text("some text", encoding="utf-8")
    with pytest.raises(ValueError, match="--method lsa"):
        ask_file("no-such-model", context, "what?", method="full", cuda_graph=True)


class _UncapturedStep:
    """What the graph replays, run eagerly: the model without the attention mask, as ``GraphDecodeStep`` calls it."""

    def __init__(self, model, cache):
        self.model, self.cache, self.calls = model, cache, 0

    @property
    def replays(self) -> int:
        return self.calls

    def __call__(self, input_ids, position_ids):
        self.calls += 1
        out = self.model(input_ids=input_ids, position_ids=position_ids, past_key_values=self.cache, use_cache=True)
        return out.logits[:, -1]


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_the_graph_branch_decodes_like_eager_steps_on_a_padded_batch(family, monkeypatch):
    # Off CUDA the loop's graph branch runs with the step uncaptured: the padding must come from the resident set,
    # since the replayed step gets no attention mask.
    steps = []
    gen = sys.modules["flashmemory.runtime.generate"]
    monkeypatch.setattr(
        gen, "GraphDecodeStep", lambda model, cache: steps.append(_UncapturedStep(model, cache)) or steps[-1]
    )
    torch.manual_seed(0)
    model = tiny_model(family)
    ids = torch.randint(3, 250, (2, 240))
    mask = torch.ones_like(ids)
    mask[1, :37] = 0
    lsa = LSAConfig(budget=None, max_pages=5, attention_backend="torch", **SMALL_LSA)
    eager, eager_stats = generate_ids(model, ids, mask, lsa=lsa, max_new_tokens=50)
    branch, branch_stats = generate_ids(model, ids, mask, lsa=lsa, max_new_tokens=50, cuda_graph=True)
    assert steps[0].calls == 50 and torch.equal(branch, eager)
    assert branch_stats.boundaries == eager_stats.boundaries >= 3


@pytest.mark.cuda
def test_cuda_graph_is_refused_for_a_full_cache_and_the_masked_path_cuda():
    model = tiny_model("llama").cuda()
    ids = torch.randint(3, 250, (1, 64), device="cuda")
    with pytest.raises(ValueError, match="method 'lsa' on the fast path"):
        generate_ids(model, ids, method="full", max_new_tokens=4, cuda_graph=True)
    lsa = LSAConfig(budget=None, max_pages=2, attention_backend="mask", **SMALL_LSA)
    with pytest.raises(ValueError, match="fast path"):
        generate_ids(model, ids, lsa=lsa, max_new_tokens=4, cuda_graph=True)


@pytest.mark.cuda
@pytest.mark.parametrize("warmup", [(), (1, 2, 5)], ids=["no-warmup", "warmup"])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_cuda_graph_decoding_equals_eager_decoding_on_a_padded_batch_cuda(family, warmup):
    torch.manual_seed(0)
    model = tiny_model(family).cuda()
    ids = torch.randint(3, 250, (2, 240), device="cuda")
    mask = torch.ones_like(ids)
    mask[1, :37] = 0  # left padding: the second sequence is shorter
    # warm-up boundaries fall between replayed steps: the graph must be left for them and taken up again after
    lsa = LSAConfig(budget=None, max_pages=5, attention_backend="triton", warmup_steps=warmup, **SMALL_LSA)
    runs = {}
    for graph in (False, True):
        runs[graph] = generate_ids(model, ids, mask, lsa=lsa, max_new_tokens=50, cuda_graph=graph)
    (eager, eager_stats), (replayed, replayed_stats) = runs[False], runs[True]
    assert torch.equal(replayed, eager)
    assert replayed_stats.boundaries == eager_stats.boundaries >= 3 + len(warmup)  # it outlived several recalls
    assert replayed_stats.kv_bytes_device == eager_stats.kv_bytes_device


def test_unset_graph_replay_is_chosen_only_where_it_can_run():
    model = tiny_model("llama")
    lsa = LSAConfig(**SMALL_LSA)
    assert choose_graph_replay(model, lsa, None) is False  # on the CPU
    assert choose_graph_replay(model, lsa, False) is False
    with pytest.raises(ValueError, match="CUDA device"):
        choose_graph_replay(model, lsa, True)


@pytest.mark.cuda
@pytest.mark.parametrize(
    "family, backend, chosen",
    [("llama", "auto", True), ("qwen2", "triton", True), ("llama", "mask", False), ("gemma3", "auto", False)],
)
def test_unset_graph_replay_on_cuda_is_chosen_for_full_attention_layers_on_the_fast_path_cuda(family, backend, chosen):
    model = tiny_model(family).cuda()
    lsa = LSAConfig(attention_backend=backend, **SMALL_LSA)
    assert choose_graph_replay(model, lsa, None) is chosen
    if not chosen:
        with pytest.raises(ValueError, match="graph replay needs"):
            choose_graph_replay(model, lsa, True)


def _spy_steps(monkeypatch, refusal=None) -> list:
    """Replace the graph step with :class:`_UncapturedStep` (recorded) and the refusal with ``refusal``, so the
    loop's choice can be seen off CUDA."""
    steps = []
    gen = sys.modules["flashmemory.runtime.generate"]
    monkeypatch.setattr(
        gen, "GraphDecodeStep", lambda model, cache: steps.append(_UncapturedStep(model, cache)) or steps[-1]
    )
    if refusal is not None:
        monkeypatch.setattr(gen, "graph_replay_refusal", refusal)
    return steps


def test_unset_graph_replay_decodes_eagerly_where_it_cannot_run(monkeypatch):
    steps = _spy_steps(monkeypatch)  # the real refusal: this is a CPU
    model = tiny_model("llama")
    ids = torch.randint(3, 250, (1, 96))
    lsa = LSAConfig(budget=None, max_pages=2, attention_backend="torch", **SMALL_LSA)
    generate_ids(model, ids, lsa=lsa, max_new_tokens=6)
    generate_ids(model, ids, method="full", max_new_tokens=6)
    assert steps == []


def test_unset_graph_replay_is_taken_for_a_fast_path_cache_only(monkeypatch):
    # as if on CUDA: the refusal has nothing to say, so only the cache's kind decides
    steps = _spy_steps(monkeypatch, refusal=lambda *args: None)
    torch.manual_seed(0)
    model = tiny_model("llama")
    ids = torch.randint(3, 250, (1, 200))
    base = dict(budget=None, max_pages=3, **SMALL_LSA)
    eager, eager_stats = generate_ids(
        model, ids, lsa=LSAConfig(attention_backend="torch", **base), max_new_tokens=30, cuda_graph=False
    )
    assert steps == [] and eager_stats.replayed_steps == 0
    chosen, stats = generate_ids(model, ids, lsa=LSAConfig(attention_backend="torch", **base), max_new_tokens=30)
    assert len(steps) == 1 and steps[0].calls == 30 and torch.equal(chosen, eager)
    assert stats.replayed_steps == 30 and stats.to_dict()["replayed_steps"] == 30
    generate_ids(model, ids, lsa=LSAConfig(attention_backend="mask", **base), max_new_tokens=6)
    generate_ids(model, ids, method="full", max_new_tokens=6)
    assert len(steps) == 1  # the masked path and a full cache decode eagerly


@pytest.mark.cuda
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_the_python_api_replays_by_default_on_cuda_with_the_eager_answers_cuda(family, monkeypatch):
    gen = sys.modules["flashmemory.runtime.generate"]
    built = []
    real = gen.GraphDecodeStep
    monkeypatch.setattr(gen, "GraphDecodeStep", lambda model, cache: built.append(real(model, cache)) or built[-1])
    torch.manual_seed(0)
    model = tiny_model(family).cuda()
    ids = torch.randint(3, 250, (2, 240), device="cuda")
    mask = torch.ones_like(ids)
    mask[1, :29] = 0
    lsa = LSAConfig(budget=None, max_pages=5, **SMALL_LSA)
    eager, eager_stats = generate_ids(model, ids, mask, lsa=lsa, max_new_tokens=40, cuda_graph=False)
    assert built == []
    default, default_stats = generate_ids(model, ids, mask, lsa=lsa, max_new_tokens=40)
    assert len(built) == 1 and default_stats.replayed_steps == built[0].replays > 0 == eager_stats.replayed_steps
    assert torch.equal(default, eager) and default_stats.boundaries == eager_stats.boundaries
    generate_ids(model, ids, mask, method="full", max_new_tokens=4)
    generate_ids(
        model,
        ids,
        mask,
        lsa=LSAConfig(budget=None, max_pages=5, attention_backend="mask", **SMALL_LSA),
        max_new_tokens=4,
    )
    assert len(built) == 1  # full attention and the masked path stay eager unasked


@pytest.mark.cuda
def test_unset_graph_replay_is_not_chosen_where_feedback_sends_auto_to_the_masked_path_cuda():
    from ..attention.test_attention_feedback import feedback_indexer

    model = tiny_model("llama").cuda()
    indexer = feedback_indexer(model).cuda()
    lsa = LSAConfig(attention_feedback=True, target_layers=(1,), **SMALL_LSA)
    assert choose_graph_replay(model, lsa, None, indexer) is False
    with pytest.raises(ValueError, match="attention_feedback=True"):
        choose_graph_replay(model, lsa, True, indexer)
    assert choose_graph_replay(model, LSAConfig(target_layers=(1,), **SMALL_LSA), None, indexer) is True
