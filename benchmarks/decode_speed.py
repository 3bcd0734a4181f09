"""Long-context decode speed: full attention vs LSA, side by side, on random-weight models with real shapes.

For each model shape (Llama-3-8B, Qwen2.5-7B), context (32K, 128K, 512K) and batch (1, and the largest batch that
fits the memory cap for each method) it times decode steps of the whole model (every layer) on a KV state filled
with random values (no prefill: its cost is not what is measured):

- ``full_sdpa``: transformers' own path, ``DynamicCache`` + its sdpa attention (eager; that cache appends by
  concatenation and cannot be graph-captured);
- ``full_kernel``: our paged sparse decode kernel with every page resident (CUDA graph), which isolates what LSA
  changes from what the kernel and the graph change;
- ``lsa``: the LSA reserve at the budget (pages planned by the library's ``plan_layout``), same kernel, eager
  and CUDA graph.

The decode steps run through a small benchmark cache that holds the reserve exactly as the LSA store lays it out
and reaches the same registered attention function; the per-cycle work (Memory Indexer scoring over every chunk
key, page selection, device-side move planning and the page copies from a pinned host mirror) is timed separately
with the library's own functions and amortised over the cycle. The host mirror is one sequence's mirror shared by
all sequences (host RAM cannot hold hundreds of GB of mirrors here); copies read it exactly as they would a
per-sequence mirror.

With ``--compile`` the graph-captured kernel rows are measured once more with every decoder layer compiled by
``torch.compile`` (rows ``full_kernel+compile`` and ``lsa+compile``): Inductor fuses the norms, the rotary
embedding, the residual adds and the MLP's activation, which eager mode runs as dozens of small kernels per layer.

With ``--fuse-projections`` the kernel rows at batch 1 (graph-captured on CUDA) are measured once more with each layer's
q/k/v and gate/up projections fused into one matmul each (``flashmemory.models.fused_projections``; rows with
``+fused``, and ``+fused+compile`` with ``--compile``, the latter also at the largest batch full attention fits): the
short-context probe shows what the dense part of the step gains. ``--autotune`` adds the same rows compiled in
Inductor's ``max-autotune`` mode with coordinate-descent tuning (``+fused+autotune``): it times Triton matmul
configurations against cuBLAS for each shape and keeps the fastest, at the cost of minutes of compiling.
``--compile-whole`` adds them with the decoder stack compiled as one graph instead of one graph per layer
(``+fused+compile-whole``), which lets Inductor fuse across layer boundaries. Both run last in each context, after
the cycle costs: a failed graph capture leaves the device's allocator and random generator in capture mode, so the
run saves what it has and stops there. Every graph is captured only after a warm-up step that compiled nothing.
``--skip-cycle-costs`` leaves the per-boundary costs out.

At batch 1 the per-cycle line also times the prefill's writes of keys and values into the pinned mirror, once as
a single ``copy_`` into a token-axis slice of it and once row by row as the store writes them
(``prefill_write_ms_one_copy``, ``prefill_write_ms_rows``, for every layer's keys and values; CUDA only).

For the graph-captured LSA rows it also times one whole cycle (``interval`` steps) three ways: alone, with the
boundary's page copies started on a side stream together with the steps, and with the copies run first. That shows
how much of the recall the steps hide.

Writes ``decode_speed.json`` and ``decode_speed.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch._dynamo.utils import counters
from transformers import AutoModelForCausalLM, LlamaConfig
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache

from flashmemory.attention.fast_path import SparseDecodeMask, attention_key
from flashmemory.attention.sparse_decode import sparse_decode
from flashmemory.attention.sparse_decode_ref import ResidentSet
from flashmemory.bench.record import provenance
from flashmemory.config import LSAConfig
from flashmemory.indexer.memory_indexer import MemoryIndexer
from flashmemory.indexer.scoring import select_pages
from flashmemory.memory.async_store import plan_moves
from flashmemory.memory.host_rows import copy_to_host_slice
from flashmemory.memory.layout import SequenceBytes, plan_layout
from flashmemory.memory.resident import page_aligned_tail_start
from flashmemory.models.adapter import DEFAULT_PAGE_CHUNKS, backbone_spec
from flashmemory.models.fused_projections import fuse_projections
from flashmemory.models.shapes import SHAPES as MODEL_SHAPES

GiB = 2**30
# the package's architectures (flashmemory.models.shapes), and a tiny one for trying the script on a CPU
SHAPES = {
    **MODEL_SHAPES,
    "tiny": lambda layers=None: LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers or 2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=256,
        max_position_embeddings=1 << 16,
        tie_word_embeddings=False,
    ),
}


@dataclass
class Row:
    model: str
    method: str
    context: int
    batch: int
    graph: bool
    step_ms: float = float("nan")
    tokens_per_s: float = float("nan")
    attention_ms: float = float("nan")
    indexer_ms_per_step: float = 0.0
    recall_ms_per_step: float = 0.0
    peak_device_gib: float = float("nan")
    device_kv_gib: float = float("nan")
    kv_read_gib_per_step: float = float("nan")
    floor_ms: float = float("nan")
    over_floor: float = float("nan")
    cycle_ms: float = float("nan")  # one cycle's `interval` steps, no recall
    cycle_overlap_ms: float = float("nan")  # the same steps with one boundary's recall on a side stream
    cycle_serial_ms: float = float("nan")  # the recall, then the steps
    note: str = ""


@dataclass
class Report:
    device: str
    torch: str
    args: dict
    command: str = ""
    commit: str = ""
    copy_tb_s: float = 0.0
    h2d_gb_s: float = 0.0
    rows: list[dict] = field(default_factory=list)
    recall: list[dict] = field(default_factory=list)
    capacity: list[dict] = field(default_factory=list)
    short_context: list[dict] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


class ReserveLayer(CacheLayerMixin):
    """One layer's reserve ``[B, Hkv, S, D]``; the step's token goes to the slot the device counter names."""

    is_sliding = False
    is_compileable = False

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, state: ResidentSet, slot: torch.Tensor) -> None:
        super().__init__()
        self.keys, self.values, self.state, self.slot = keys, values, state, slot
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        self.keys.index_copy_(2, self.slot, key_states)
        self.values.index_copy_(2, self.slot, value_states)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return 0

    def get_mask_sizes(self, *args, **kwargs) -> tuple[int, int]:
        return self.keys.shape[2], 0

    def get_max_length(self) -> int:
        return -1


class ReserveCache(Cache):
    def __init__(self, layers: list[ReserveLayer]) -> None:
        super().__init__(layers=layers)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, reps: int) -> float:
    """Median milliseconds of ``fn`` (CUDA events on the GPU)."""
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
    times.sort()
    return times[len(times) // 2]


def measure_ceilings(device) -> tuple[float, float]:
    """Device copy bandwidth (bytes read + written, TB/s) and pinned host-to-device bandwidth (GB/s)."""
    if device.type != "cuda":
        return float("nan"), float("nan")
    n = 2 * GiB
    a = torch.empty(n, dtype=torch.uint8, device=device).random_()
    b = torch.empty_like(a)
    ms = timed(lambda: b.copy_(a), device, 10)
    host = torch.empty(GiB, dtype=torch.uint8, pin_memory=True).random_()
    dev = torch.empty(GiB, dtype=torch.uint8, device=device)
    ms_h2d = timed(lambda: dev.copy_(host, non_blocking=True), device, 5)
    return 2 * n / ms / 1e9, GiB / ms_h2d / 1e6


def weight_bytes_read(model) -> int:
    """Bytes of the parameters a decode step reads (the input embedding is only gathered, not read whole)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    emb = model.get_input_embeddings().weight
    return total - emb.numel() * emb.element_size()


def kv_geometry(cfg) -> tuple[int, int, int]:
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return cfg.num_hidden_layers, cfg.num_key_value_heads, head_dim


def lsa_plan(cfg, lsa: LSAConfig, context: int, max_new: int, num_targets: int):
    """The reserve's layout at ``context`` and the chunk keys of ``num_targets`` scored layers."""
    layers, hkv, d = kv_geometry(cfg)
    per_head_token = hkv * d * 2
    seq = SequenceBytes(per_token=2 * per_head_token * layers, per_chunk_key=per_head_token * num_targets)
    layout = plan_layout(lsa, seq, context_len=context, max_len=context + max_new, other_layers_full=0)
    chunk_key_bytes = math.ceil((context + max_new) / lsa.chunk_size) * seq.per_chunk_key
    return layout, seq, chunk_key_bytes


def random_(t: torch.Tensor) -> torch.Tensor:
    return t.normal_(0, 1)


def resident_set(
    lsa: LSAConfig, batch: int, context: int, lsa_pages: int | None, full_tail_cap: int, device
) -> tuple[ResidentSet, int, int]:
    """What ``batch`` reserves at ``context`` hold: every page (``lsa_pages=None``, a tail of ``full_tail_cap`` slots
    for the new tokens) or LSA's layout with ``lsa_pages`` distinct random pages per sequence.

    Returns:
        The resident set, the reserve's slots per sequence and head, and the tokens it holds of each.
    """
    page, sink = lsa.page_size, lsa.sink
    if lsa_pages is None:
        tail_start, num_pages, tail_cap = context, context // page, full_tail_cap
        table = torch.arange(num_pages, device=device).expand(batch, -1).contiguous()
    else:
        tail_start = page_aligned_tail_start(context, lsa.recent, page)
        num_pages, tail_cap = lsa_pages, lsa.tail_capacity
        selectable = tail_start // page
        gen = torch.Generator(device=device).manual_seed(0)
        table = torch.stack(
            [torch.randperm(selectable, device=device, generator=gen)[:num_pages].sort().values for _ in range(batch)]
        )
    i32 = lambda v: torch.full((batch,), v, dtype=torch.int32, device=device)  # noqa: E731
    rs = ResidentSet(table, i32(sink), i32(sink), i32(tail_start), i32(context), sink, page)
    resident = (
        sink + (min(context, tail_start) - sink if lsa_pages is None else num_pages * page) + (context - tail_start)
    )
    return rs, sink + num_pages * page + tail_cap, resident


MAX_EXTRA_WARMUP = 8


class CaptureFailed(RuntimeError):
    """A CUDA graph capture failed; the device's allocator and generator are left in capture mode."""


def dynamo_frames() -> int:
    """Frames Dynamo has compiled so far in this process (it counts only cache misses)."""
    return counters["frames"]["total"]


class Bench:
    def __init__(self, args, device):
        self.args, self.device = args, device
        # one page size for every shape: the kernels are compared at the size their recorded results used
        self.lsa = LSAConfig(budget=args.budget, page_chunks=DEFAULT_PAGE_CHUNKS)
        self.report = Report(
            device=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            torch=torch.__version__,
            args=vars(args),
        )
        self.copy_tb_s, self.h2d_gb_s = measure_ceilings(device)
        self.report.copy_tb_s, self.report.h2d_gb_s = self.copy_tb_s, self.h2d_gb_s
        self.use_graph = device.type == "cuda"
        self.backend = "triton" if device.type == "cuda" else "torch"
        self.warmup_steps = 1
        self.save = lambda: None  # main() puts the writer of the results files here

    # ----- shared pieces
    def floor_ms(self, weight_bytes: int, kv_bytes: float) -> float:
        return (weight_bytes + kv_bytes) / (self.copy_tb_s * 1e12) * 1e3 if self.copy_tb_s == self.copy_tb_s else 0.0

    def decode_steps(self, model, cache, batch, context, hooks_state=None, graph=False, steps=None):
        """Median step time in ms of ``model`` decoding one token per sequence with ``cache``, and the step."""
        steps = steps or self.args.steps
        ids = torch.randint(0, model.config.vocab_size, (batch, 1), device=self.device)
        pos = torch.full((batch, 1), context, device=self.device)

        def step():
            return model(input_ids=ids, position_ids=pos, past_key_values=cache, use_cache=True).logits

        with torch.no_grad():
            self.warm_up(step)
            if not graph:
                return timed(step, self.device, steps), step
            g = torch.cuda.CUDAGraph()
            frames = dynamo_frames()
            try:
                # Only this thread's calls are checked: Inductor's compile and autotuning helpers may touch the
                # device from other threads meanwhile, which in the default (global) mode invalidates the capture.
                with torch.cuda.graph(g, capture_error_mode="thread_local"):
                    step()
            except Exception as e:
                # A failed capture leaves the allocator and the default generator in capture mode: nothing on this
                # device can be trusted afterwards, so the run stops after saving what it has.
                compiled = dynamo_frames() - frames
                why = f"; {compiled} frame(s) compiled inside the capture" if compiled else ""
                raise CaptureFailed(f"{type(e).__name__}: {str(e).splitlines()[0]}{why}") from e

            # The graph reads ids and pos at their addresses: the replay must keep them alive, or the allocator
            # hands their memory to the next tensor and the embedding looks up whatever lands there.
            def replay(_inputs=(ids, pos)):
                g.replay()

            return timed(replay, self.device, steps), replay

    def warm_up(self, step: Callable[[], object]) -> None:
        """At least ``warmup_steps`` steps, then more until one compiles nothing: a kernel compiled or autotuned
        inside the capture would sync the host there and break it."""
        for i in range(self.warmup_steps + MAX_EXTRA_WARMUP):
            frames = dynamo_frames()
            step()  # compiles kernels; autotuned ones also benchmark here, where a host sync is allowed
            if i + 1 >= self.warmup_steps and dynamo_frames() == frames:
                sync(self.device)
                return
        raise RuntimeError(f"still compiling after {self.warmup_steps + MAX_EXTRA_WARMUP} warm-up steps")

    def reserve_state(self, cfg, batch, context, lsa_pages: int | None):
        """Random reserves of every layer plus their resident set (all pages for ``lsa_pages=None``)."""
        layers, hkv, d = kv_geometry(cfg)
        rs, slots, resident = resident_set(self.lsa, batch, context, lsa_pages, self.args.steps * 4 + 8, self.device)
        tail_start = int(rs.tail_start[0])
        slot = torch.tensor([rs.sink + rs.num_pages * rs.page_size + context - 1 - tail_start], device=self.device)
        dtype = self.args.dtype
        res = []
        for _ in range(layers):
            k = random_(torch.empty(batch, hkv, slots, d, dtype=dtype, device=self.device))
            v = random_(torch.empty(batch, hkv, slots, d, dtype=dtype, device=self.device))
            res.append(ReserveLayer(k, v, rs, slot))
        return ReserveCache(res), rs, slot, resident

    def install_hooks(self, model, rs, slot):
        """Forward pre-hooks: advance the device counters per step; hand attention the resident set."""
        mask = SparseDecodeMask(rs, self.backend)

        def on_model(module, args, kwargs):
            rs.seq_len.add_(1)
            slot.add_(1)

        def on_attn(module, args, kwargs):
            kwargs["attention_mask"] = mask
            return args, kwargs

        handles = [model.register_forward_pre_hook(on_model, with_kwargs=True)]
        for layer in model.model.layers:
            handles.append(layer.self_attn.register_forward_pre_hook(on_attn, with_kwargs=True))
        return handles

    # ----- methods
    def run_full_sdpa(self, name, model, batch, context) -> Row:
        cfg = model.config
        layers, hkv, d = kv_geometry(cfg)
        row = Row(name, "full_sdpa", context, batch, graph=False)
        torch.cuda.reset_peak_memory_stats(self.device) if self.device.type == "cuda" else None
        cache = DynamicCache(config=cfg)
        for i in range(layers):
            k = random_(torch.empty(batch, hkv, context, d, dtype=self.args.dtype, device=self.device))
            v = random_(torch.empty(batch, hkv, context, d, dtype=self.args.dtype, device=self.device))
            cache.update(k, v, i)
            del k, v
        kv_bytes = 2 * layers * batch * context * hkv * d * self.args.dtype.itemsize
        row.step_ms, _ = self.decode_steps(model, cache, batch, context)
        q = random_(torch.empty(batch, cfg.num_attention_heads, 1, d, dtype=self.args.dtype, device=self.device))
        k0, v0 = cache.layers[0].keys, cache.layers[0].values
        attn = timed(
            lambda: torch.nn.functional.scaled_dot_product_attention(q, k0, v0, enable_gqa=True), self.device, 10
        )
        row.attention_ms = attn * layers
        row.note = "attention_ms: sdpa only; each step also concatenates the whole cache (DynamicCache)"
        self.finish(row, model, kv_bytes, kv_bytes)
        return row

    def run_kernel(
        self, name, model, batch, context, lsa_pages: int | None, graph: bool, chunk_key_bytes=0, tag="", cycles=True
    ) -> Row:
        cfg = model.config
        layers, hkv, d = kv_geometry(cfg)
        row = Row(name, ("full_kernel" if lsa_pages is None else "lsa") + tag, context, batch, graph=graph)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        cache, rs, slot, resident = self.reserve_state(cfg, batch, context, lsa_pages)
        start = rs.seq_len.clone(), slot.clone()
        handles = self.install_hooks(model, rs, slot)
        try:
            row.step_ms, step = self.decode_steps(model, cache, batch, context, graph=graph)
            # The overlap is measured on the rows that matter (graph-captured on CUDA): 7 cycles per row add minutes.
            if cycles and lsa_pages is not None and (graph or self.device.type != "cuda"):
                recall, _, _ = self.recall_job(cfg, batch, context, lsa_pages, self.args.churn[0])
                row.cycle_ms, row.cycle_overlap_ms, row.cycle_serial_ms = self.cycle_overlap(
                    step, recall, rs, slot, start
                )
        finally:
            for h in handles:
                h.remove()
        k0, v0 = cache.layers[0].keys, cache.layers[0].values
        q = random_(torch.empty(batch, cfg.num_attention_heads, d, dtype=self.args.dtype, device=self.device))
        row.attention_ms = layers * timed(lambda: sparse_decode(q, k0, v0, rs, backend=self.backend), self.device, 10)
        token_bytes = 2 * layers * hkv * d * self.args.dtype.itemsize
        device_kv = storage_kv(cache) + batch * chunk_key_bytes
        self.finish(row, model, device_kv, batch * (resident + 1) * token_bytes)
        return row

    def finish(self, row: Row, model, device_kv: int, kv_read: float) -> None:
        row.tokens_per_s = row.batch / row.step_ms * 1e3
        row.device_kv_gib = device_kv / GiB
        row.kv_read_gib_per_step = kv_read / GiB
        if self.device.type == "cuda":
            row.peak_device_gib = torch.cuda.max_memory_allocated(self.device) / GiB
        row.floor_ms = self.floor_ms(weight_bytes_read(model), kv_read)
        row.over_floor = row.step_ms / row.floor_ms if row.floor_ms else float("nan")

    # ----- per-cycle work
    def cycle_costs(self, name, model, batch, context, num_pages) -> dict:
        """Indexer scoring + selection, move planning and page copies of one boundary, in ms."""
        cfg = model.config
        layers, hkv, d = kv_geometry(cfg)
        lsa, dev, dtype = self.lsa, self.device, self.args.dtype
        n = context // lsa.chunk_size
        spec = backbone_spec(model)
        targets, reduce = spec.default_target_layers(), spec.default_layer_reduce()  # what LSACache scores with
        indexer = MemoryIndexer.from_model(model, targets, chunk_size=lsa.chunk_size).to(dev)
        window = lsa.query_window
        hidden = {t: torch.randn(batch, window, cfg.hidden_size, device=dev, dtype=dtype) for t in targets}
        pos = torch.arange(context - window, context, device=dev).expand(batch, -1)
        keys = [random_(torch.empty(batch, hkv, n, d, dtype=dtype, device=dev)) for _ in targets]
        selectable = page_aligned_tail_start(context, lsa.recent, lsa.page_size) // lsa.page_size

        def score_and_select():
            s = indexer.score(hidden, pos, keys, reduce)
            return select_pages(
                s, num_selectable=selectable, page_chunks=lsa.page_chunks, num_slots=num_pages, threshold=lsa.threshold
            )

        buffers = self.recall_buffers(cfg, batch, context, num_pages)  # shared by every churn: pinned GiBs are slow
        # later_boundary_keys="token": every target layer's keys of the whole history come from the pinned mirror
        token_keys = [buffers[0].expand(batch, -1, -1, -1) for _ in targets]

        def score_tokens_and_select():
            s = indexer.score(hidden, pos, keys, reduce, token_keys=token_keys)
            return select_pages(
                s, num_selectable=selectable, page_chunks=lsa.page_chunks, num_slots=num_pages, threshold=lsa.threshold
            )

        with torch.no_grad():
            score_and_select()
            indexer_ms = timed(score_and_select, dev, 5)
            score_tokens_and_select()
            indexer_token_ms = timed(score_tokens_and_select, dev, 3)
        out = {
            "model": name,
            "context": context,
            "batch": batch,
            "indexer_ms": indexer_ms,
            "indexer_token_keys_ms": indexer_token_ms,
            "token_key_layers": len(targets),
        }
        if batch == 1:
            out.update(self.prefill_write(buffers[0], layers))
        for churn in self.args.churn:
            recall, n_moves, moved = self.recall_job(cfg, batch, context, num_pages, churn, buffers)
            recall()
            ms = timed(recall, dev, 3)
            out[f"recall_ms_churn_{churn}"] = ms
            out[f"recall_gb_s_churn_{churn}"] = moved / ms / 1e6
            out[f"pages_moved_churn_{churn}"] = n_moves
        return out

    def prefill_write(self, mirror: torch.Tensor, layers: int) -> dict:
        """The prefill's writes of one sequence's keys and values into the mirror, for the whole model, in ms.

        One layer's keys are timed going into a token-axis slice of the pinned mirror (the prompt is shorter than
        the mirror's capacity) two ways: one ``copy_`` (through a pageable bounce buffer) and row by row
        (``copy_to_host_slice``, what ``KVStore.write_prefill`` does); times 2 × layers for keys and values.
        """
        if self.device.type != "cuda":
            return {}
        dst = mirror[:, :, : mirror.shape[2] - self.lsa.interval]
        src = random_(torch.empty(dst.shape, dtype=dst.dtype, device=self.device))
        one_copy = timed(lambda: dst.copy_(src, non_blocking=True), self.device, 3)
        rows = timed(lambda: copy_to_host_slice(src, dst), self.device, 3)
        gb = 2 * layers * src.numel() * src.element_size() / 1e9
        return {
            "prefill_write_gb": gb,
            "prefill_write_ms_one_copy": 2 * layers * one_copy,
            "prefill_write_ms_rows": 2 * layers * rows,
        }

    def recall_buffers(self, cfg, batch, context, num_pages):
        """A pinned one-sequence mirror (see the module docstring) and a reserve of their own for the copies."""
        _, hkv, d = kv_geometry(cfg)
        lsa, dev, dtype = self.lsa, self.device, self.args.dtype
        mirror_k = torch.empty(1, hkv, context, d, dtype=dtype, pin_memory=dev.type == "cuda")
        mirror_k.view(torch.int16).fill_(0x3C00)  # cheap non-zero fill (randn over GiBs on the host is slow)
        slots = lsa.sink + num_pages * lsa.page_size + lsa.tail_capacity
        return mirror_k, torch.empty(batch, hkv, slots, d, dtype=dtype, device=dev)

    def recall_job(self, cfg, batch, context, num_pages, churn, buffers=None):
        """One boundary's recall with ``churn`` of the page slots changing: (callable, pages moved, bytes moved).

        ``buffers`` come from :meth:`recall_buffers` (made here when not given).
        """
        layers, hkv, d = kv_geometry(cfg)
        lsa, dev, dtype = self.lsa, self.device, self.args.dtype
        selectable = page_aligned_tail_start(context, lsa.recent, lsa.page_size) // lsa.page_size
        old = torch.stack([torch.randperm(selectable, device=dev)[:num_pages].sort().values for _ in range(batch)])
        mirror_k, reserve = buffers or self.recall_buffers(cfg, batch, context, num_pages)
        changed = max(1, int(churn * num_pages))
        new = old.clone()
        fresh = torch.stack([torch.randperm(selectable, device=dev)[: num_pages + changed] for _ in range(batch)])
        # replace `changed` slots with pages not resident before
        for b in range(batch):
            cand = fresh[b][~torch.isin(fresh[b], old[b])][:changed]
            new[b, : cand.numel()] = cand
        _, moves = plan_moves(old, new)
        n_moves = int((moves >= 0).sum())

        def recall():
            plan_moves(old, new)
            copy_all(mirror_k.expand(batch, -1, -1, -1), reserve, moves, lsa, 2 * layers, dev, self.args.copy_programs)

        return recall, n_moves, n_moves * lsa.page_size * hkv * d * dtype.itemsize * 2 * layers

    def cycle_overlap(self, step, recall, rs, slot, start) -> tuple[float, float, float]:
        """ms of one cycle's ``interval`` steps: alone, with the boundary's recall on a side stream, after it.

        The step counters are reset to ``start`` before each cycle, so every replay writes inside the tail.
        Without CUDA there is no side stream and the overlapped time is the serial one.
        """
        dev, interval = self.device, self.lsa.interval

        def steps():
            rs.seq_len.copy_(start[0])
            slot.copy_(start[1])
            for _ in range(interval):
                step()

        def serial():
            recall()
            steps()

        reps = self.args.cycle_reps
        if dev.type != "cuda":
            alone, after = timed(steps, dev, reps), timed(serial, dev, reps)
            return alone, after, after
        side = torch.cuda.Stream(dev)

        def overlapped():
            side.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(side):
                recall()
            steps()
            torch.cuda.current_stream(dev).wait_stream(side)

        overlapped()
        return timed(steps, dev, reps), timed(overlapped, dev, reps), timed(serial, dev, reps)

    # ----- capacity
    def max_batch(self, weight_bytes: int, per_seq: float, overhead: float) -> int:
        return max(0, int((self.args.mem_cap_gib * GiB - weight_bytes - overhead) // per_seq))


@contextmanager
def measurement(bench: Bench, label: str, any_failure: bool = False):
    """One measurement: running out of device memory (or, with ``any_failure``, any error) is reported under
    ``label`` instead of ending the run; the allocator's cache is emptied after it either way."""
    try:
        yield
    except CaptureFailed as e:
        bench.report.errors.append(f"{label}: graph capture failed, run stopped: {e}")
        print(f"  {label}: graph capture failed ({e}); the run stops here", flush=True)
        raise
    except torch.OutOfMemoryError as e:
        bench.report.errors.append(f"{label}: out of memory ({str(e).splitlines()[0]})")
        print(f"  {label}: out of memory", flush=True)
    except Exception as e:
        if not any_failure:
            raise
        bench.report.errors.append(f"{label}: {type(e).__name__}: {str(e)[:300]}")
        print(f"  {label} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
    finally:
        gc.collect()
        if bench.device.type == "cuda":
            torch.cuda.empty_cache()


def _raise_recompile_limits() -> None:
    """So that no compiled graph silently falls back to eager after too many recompiles."""
    dyn = torch._dynamo.config
    dyn.recompile_limit = dyn.cache_size_limit = 4096
    dyn.accumulated_recompile_limit = max(getattr(dyn, "accumulated_recompile_limit", 0), 1 << 16)
    dyn.fail_on_recompile_limit_hit = True


def compile_layers(model, mode: str | None = None) -> Callable[[], None]:
    """``torch.compile`` every decoder layer in place; returns the function that puts the eager forwards back.

    Each layer is its own graph (its index picks its cache layer, and Dynamo specialises on it), compiled once per
    shape. Shapes are static: the kernels are specialised to the batch and the reserve, as a server would compile
    per batch size.
    """
    _raise_recompile_limits()
    layers = list(model.model.layers)
    eager = [layer.forward for layer in layers]
    for layer in layers:
        layer.forward = torch.compile(layer.forward, dynamic=False, mode=mode)

    def undo() -> None:
        for layer, forward in zip(layers, eager, strict=True):
            layer.forward = forward

    return undo


def compile_decoder(model, mode: str | None = None) -> Callable[[], None]:
    """``torch.compile`` the whole decoder stack as one graph; returns the function that undoes it.

    One graph lets Inductor fuse across layer boundaries (a layer's last residual add with the next layer's input
    norm), which per-layer graphs cannot; at batch 1 every kernel saved is a launch saved.
    """
    _raise_recompile_limits()
    inner = model.model
    eager = inner.forward
    inner.forward = torch.compile(eager, dynamic=False, mode=mode)

    def undo() -> None:
        inner.forward = eager

    return undo


def storage_kv(cache: ReserveCache) -> int:
    return sum(
        layer.keys.untyped_storage().nbytes() + layer.values.untyped_storage().nbytes() for layer in cache.layers
    )


def copy_all(mirror, reserve, moves, lsa: LSAConfig, copies: int, device, programs: int | None = None) -> None:
    """``copies`` page copies of one boundary (K and V of every layer) from the pinned mirror.

    ``programs``: thread blocks of the CUDA copy kernel (None: the kernel's default).
    """
    if device.type == "cuda":
        from flashmemory.memory.page_copy_triton import DEFAULT_PROGRAMS, copy_pages

        for _ in range(copies):
            copy_pages(mirror, reserve, moves, lsa.page_size, lsa.sink, programs or DEFAULT_PROGRAMS)
        return
    rows, slots = (moves >= 0).nonzero(as_tuple=True)
    for _ in range(copies):
        for r, s in zip(rows.tolist(), slots.tolist(), strict=True):
            p = int(moves[r, s])
            dst = lsa.sink + s * lsa.page_size
            reserve[r, :, dst : dst + lsa.page_size] = mirror[r, :, p * lsa.page_size : (p + 1) * lsa.page_size]


def run_model(bench: Bench, name: str) -> None:
    args, dev, rep = bench.args, bench.device, bench.report
    cfg = SHAPES[name](args.layers)
    cfg._attn_implementation = "sdpa"
    t0 = time.perf_counter()
    with torch.device(dev):
        model = AutoModelForCausalLM.from_config(cfg, dtype=args.dtype, attn_implementation="sdpa").eval()
    with torch.no_grad():  # real random values: never time on whatever fresh memory holds
        for param in model.parameters():
            param.normal_(0, 0.02)
    print(f"[{name}] built in {time.perf_counter() - t0:.1f}s", flush=True)
    wbytes = weight_bytes_read(model)
    num_targets = len(backbone_spec(model).default_target_layers())  # the chunk keys LSACache would keep
    layers, hkv, d = kv_geometry(cfg)
    token_bytes = 2 * layers * hkv * d * args.dtype.itemsize
    overhead = 1.5 * GiB if dev.type == "cuda" else 0
    for context in args.contexts:
        layout, seq, ck_bytes = lsa_plan(cfg, bench.lsa, context, 4 * args.steps, num_targets)
        full_seq = token_bytes * (context + 4 * args.steps) * (1 + 1 / layers)  # cat: one extra layer transiently
        lsa_seq = layout.num_slots * token_bytes + ck_bytes
        b_full = bench.max_batch(wbytes, full_seq, overhead)
        b_lsa = bench.max_batch(wbytes, lsa_seq, overhead)
        rep.capacity.append(
            {
                "model": name,
                "context": context,
                "cap_gib": args.mem_cap_gib,
                "full_max_batch": b_full,
                "lsa_max_batch": b_lsa,
                "full_gib_per_seq": full_seq / GiB,
                "lsa_gib_per_seq": lsa_seq / GiB,
                "page_slots": layout.num_page_slots,
            }
        )
        print(f"[{name} {context}] cap {args.mem_cap_gib} GiB: full fits {b_full}, lsa fits {b_lsa}", flush=True)
        batches_full = sorted({b for b in (1, b_full) if b >= 1})
        batches_lsa = sorted({b for b in (1, min(b_full, b_lsa) if b_full else 1, b_lsa) if b >= 1})
        model.set_attn_implementation(attention_key("sdpa"))
        if context == args.contexts[0]:
            short_context_probe(bench, name, model)
        jobs = []
        for b in batches_full:
            jobs.append(("full_sdpa", b, None))
        for b in batches_full:
            jobs.append(("full_kernel", b, None))
        for b in batches_lsa:
            jobs.append(("lsa", b, False))
            if bench.use_graph:
                jobs.append(("lsa", b, True))
        for method, b, graph in jobs:
            with measurement(bench, f"{name} {context} {method} b={b}"):
                if method == "full_sdpa":
                    model.set_attn_implementation("sdpa")
                    row = bench.run_full_sdpa(name, model, b, context)
                    model.set_attn_implementation(attention_key("sdpa"))
                elif method == "full_kernel":
                    row = bench.run_kernel(name, model, b, context, None, graph=bench.use_graph)
                else:
                    row = bench.run_kernel(
                        name, model, b, context, layout.num_page_slots, graph=graph, chunk_key_bytes=ck_bytes
                    )
                rep.rows.append(asdict(row))
                print(
                    f"  {method:11s} b={b:3d} graph={row.graph!s:5s} {row.step_ms:8.2f} ms/step "
                    f"{row.tokens_per_s:9.1f} tok/s  floor x{row.over_floor:.2f}  kv {row.device_kv_gib:.1f} GiB",
                    flush=True,
                )
        if args.compile and bench.use_graph:
            variant_rows(bench, name, model, context, batches_full, batches_lsa, layout, ck_bytes)
        # the batch full attention fits too, where the LSA step is furthest from its floor after batch 1
        lsa_fused = sorted({1, min(b_full, b_lsa)}) if b_full else [1]
        if args.fuse_projections:
            undo = fuse_projections(model)
            try:
                variant_rows(bench, name, model, context, [1], [1], layout, ck_bytes, compile_=False, tag="+fused")
                if args.compile:
                    variant_rows(bench, name, model, context, [1], lsa_fused, layout, ck_bytes, tag="+fused+compile")
            finally:
                undo()
        bench.save()
        model.set_attn_implementation("sdpa")
        for b in [] if args.skip_cycle_costs else batches_lsa:
            with measurement(bench, f"{name} {context} cycle b={b}"):
                costs = bench.cycle_costs(name, model, b, context, layout.num_page_slots)
                rep.recall.append(costs)
                print(
                    f"  cycle b={b}: {json.dumps({k: round(v, 3) for k, v in costs.items() if isinstance(v, float)})}",
                    flush=True,
                )
        bench.save()
        if args.compile_whole or args.autotune:
            # Last in the context: a failed capture here ends the run, and everything above is already saved.
            model.set_attn_implementation(attention_key("sdpa"))
            undo = fuse_projections(model)
            try:
                if args.compile_whole:
                    variant_rows(
                        bench, name, model, context, [1], lsa_fused, layout, ck_bytes,
                        tag="+fused+compile-whole", whole=True,
                    )  # fmt: skip
                if args.autotune:
                    import torch._inductor.config as inductor_config

                    with inductor_config.patch(coordinate_descent_tuning=True):
                        variant_rows(
                            bench, name, model, context, [1], lsa_fused, layout, ck_bytes,
                            tag="+fused+autotune", mode="max-autotune-no-cudagraphs",
                        )  # fmt: skip
            finally:
                undo()
                bench.save()
    del model
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def variant_rows(
    bench: Bench,
    name,
    model,
    context,
    batches_full,
    batches_lsa,
    layout,
    ck_bytes,
    compile_=True,
    tag="+compile",
    mode: str | None = None,
    whole: bool = False,
) -> None:
    """The graph-captured kernel rows again, with every decoder layer compiled (``--compile``, in Inductor's ``mode``;
    ``whole``: the decoder stack as one graph) and/or with the model as the caller changed it
    (``--fuse-projections``); ``tag`` names the rows."""
    rep = bench.report
    undo = (compile_decoder if whole else compile_layers)(model, mode) if compile_ else None
    # An autotuned kernel that first runs inside a graph capture benchmarks there, and its host sync breaks the
    # capture: more warm-up steps, so that every kernel has run (and tuned) before capture.
    bench.warmup_steps = 3 if mode else 1
    try:
        if context == bench.args.contexts[0]:
            short_context_probe(bench, name, model, tag=tag)
        jobs = [("full_kernel", b) for b in batches_full] + [("lsa", b) for b in batches_lsa]
        for method, b in jobs:
            pages = None if method == "full_kernel" else layout.num_page_slots
            t0, note = time.perf_counter(), " with compiling" if compile_ else ""
            # a compiler failure is a result to report, not a reason to lose the run
            with measurement(bench, f"{name} {context} {method}{tag} b={b}", any_failure=True):
                row = bench.run_kernel(
                    name,
                    model,
                    b,
                    context,
                    pages,
                    graph=bench.use_graph,
                    chunk_key_bytes=0 if pages is None else ck_bytes,
                    tag=tag,
                    cycles=False,
                )
                rep.rows.append(asdict(row))
                print(
                    f"  {row.method:19s} b={b:3d} {row.step_ms:8.2f} ms/step {row.tokens_per_s:9.1f} tok/s  "
                    f"floor x{row.over_floor:.2f}  ({time.perf_counter() - t0:.0f} s{note})",
                    flush=True,
                )
    finally:
        bench.warmup_steps = 1
        if undo is not None:
            undo()


def short_context_probe(bench: Bench, name: str, model, tag: str = "") -> None:
    """Batch-1 step through our kernel over two pages: attention reads almost nothing, so its distance to the
    weights-only floor is what the rest of the model costs, and splits a long-context ×floor into its parts."""
    try:
        row = bench.run_kernel(name, model, 1, 2 * bench.lsa.page_size, None, graph=bench.use_graph, tag=tag)
    except CaptureFailed:
        raise
    except Exception as e:  # a probe that fails is reported; the rows after it still run
        bench.report.errors.append(f"{name} short-context probe{tag}: {type(e).__name__}: {str(e).splitlines()[0]}")
        print(f"  short ctx{tag}: failed ({type(e).__name__})", flush=True)
        return
    bench.report.short_context.append(
        {
            k: getattr(row, k)
            for k in ("model", "method", "context", "batch", "graph", "step_ms", "floor_ms", "over_floor")
        }
    )
    print(f"  short ctx {row.context}: {row.step_ms:.2f} ms/step, floor x{row.over_floor:.2f}", flush=True)


def amortise(report: Report, interval: int, churn: float) -> None:
    """Add the per-step share of indexer and recall time (one boundary per ``interval`` steps) to LSA rows."""
    cost = {(c["model"], c["context"], c["batch"]): c for c in report.recall}
    for row in report.rows:
        c = cost.get((row["model"], row["context"], row["batch"]))
        if row["method"] != "lsa" or c is None:
            continue
        row["indexer_ms_per_step"] = c["indexer_ms"] / interval
        row["recall_ms_per_step"] = c[f"recall_ms_churn_{churn}"] / interval
        total = row["step_ms"] + row["indexer_ms_per_step"] + row["recall_ms_per_step"]
        row["tokens_per_s_with_cycle"] = row["batch"] / total * 1e3
        row["cycle_share"] = (row["indexer_ms_per_step"] + row["recall_ms_per_step"]) / total


def markdown(report: Report, churn: float) -> str:
    lines = [
        f"# Decode speed, full attention vs LSA ({report.device}, torch {report.torch})",
        "",
        f"`{report.command}` at commit `{report.commit}`",
        "",
        f"Device copy ceiling {report.copy_tb_s:.2f} TB/s (read+write); pinned H2D {report.h2d_gb_s:.1f} GB/s. "
        f"Memory cap {report.args['mem_cap_gib']} GiB. LSA budget {report.args['budget']}. "
        f"Cycle costs amortised over {report.args['interval']} steps with {churn:.0%} of page slots changing.",
        "",
        "| model | ctx | method | batch | graph | ms/step | tok/s | tok/s incl. cycle | attn ms | idx ms/step "
        "| recall ms/step | floor ms | ×floor | device KV GiB | peak GiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report.rows:
        lines.append(
            f"| {r['model']} | {r['context'] // 1024}K | {r['method']} | {r['batch']} | {'y' if r['graph'] else 'n'} "
            f"| {r['step_ms']:.2f} | {r['tokens_per_s']:.1f} "
            f"| {r.get('tokens_per_s_with_cycle', r['tokens_per_s']):.1f} "
            f"| {r['attention_ms']:.2f} | {r['indexer_ms_per_step']:.3f} | {r['recall_ms_per_step']:.3f} "
            f"| {r['floor_ms']:.2f} | {r['over_floor']:.2f} | {r['device_kv_gib']:.2f} | {r['peak_device_gib']:.1f} |"
        )
    lines += [
        "",
        "## Capacity at the memory cap",
        "",
        "| model | ctx | full GiB/seq | LSA GiB/seq | full fits | LSA fits |",
        "|---|---|---|---|---|---|",
    ]
    for c in report.capacity:
        lines.append(
            f"| {c['model']} | {c['context'] // 1024}K | {c['full_gib_per_seq']:.2f} | "
            f"{c['lsa_gib_per_seq']:.2f} | {c['full_max_batch']} | {c['lsa_max_batch']} |"
        )
    cycles = [r for r in report.rows if r["method"] == "lsa" and r.get("cycle_ms") == r.get("cycle_ms")]
    if cycles:
        lines += [
            "",
            f"## Recall overlapped with the cycle ({report.args['interval']} steps, "
            f"{report.args['churn'][0]:.0%} of page slots changing)",
            "",
            "The boundary's page copies start on a side stream together with the cycle's steps; `serial` runs them "
            "first. Overhead = extra time over the steps alone.",
            "",
            "| model | ctx | batch | graph | steps alone ms | + recall overlapped ms | overhead | "
            "recall then steps ms | overhead |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in cycles:
            base = r["cycle_ms"]
            lines.append(
                f"| {r['model']} | {r['context'] // 1024}K | {r['batch']} | {'y' if r['graph'] else 'n'} "
                f"| {base:.1f} | {r['cycle_overlap_ms']:.1f} | {r['cycle_overlap_ms'] / base - 1:.1%} "
                f"| {r['cycle_serial_ms']:.1f} | {r['cycle_serial_ms'] / base - 1:.1%} |"
            )
    if report.short_context:
        lines += [
            "",
            "## Batch-1 step over a short context (the model without attention work)",
            "",
            "Our kernel over two pages, graph-captured: what the rest of the model costs against its weights-only "
            "floor.",
            "",
            "| model | method | ctx tokens | ms/step | floor ms | ×floor |",
            "|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['model']} | {r.get('method', 'full_kernel')} | {r['context']} | {r['step_ms']:.2f} "
            f"| {r['floor_ms']:.2f} | {r['over_floor']:.2f} |"
            for r in report.short_context
        ]
    lines += ["", "## Per-cycle work (one boundary)", "", "```"]
    lines += [json.dumps(c) for c in report.recall]
    lines += ["```"]
    if report.errors:
        lines += ["", "## Errors", ""] + [f"- {e}" for e in report.errors]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--models", default="llama3-8b,qwen2.5-7b")
    p.add_argument("--contexts", default="32768,131072,524288")
    p.add_argument("--layers", type=int, default=0, help="decoder layers (0: the real depth)")
    p.add_argument("--budget", type=float, default=0.15)
    p.add_argument("--mem-cap-gib", type=float, default=120.0)
    p.add_argument("--steps", type=int, default=8, help="timed decode steps per measurement")
    p.add_argument("--churn", default="0.25,1.0", help="shares of page slots that change per boundary")
    p.add_argument(
        "--copy-programs", type=int, default=None, help="thread blocks the page copy kernel occupies (default: its own)"
    )
    p.add_argument("--cycle-reps", type=int, default=2, help="timed repeats of each whole-cycle measurement")
    p.add_argument(
        "--compile", action="store_true", help="also time the graph-captured kernel rows with compiled decoder layers"
    )
    p.add_argument(
        "--fuse-projections",
        action="store_true",
        help="also time the graph-captured batch-1 rows with fused q/k/v and gate/up projections",
    )
    p.add_argument(
        "--autotune",
        action="store_true",
        help="with --fuse-projections: also time the fused rows compiled in Inductor's max-autotune mode, which "
        "benchmarks Triton matmul and reduction configurations against cuBLAS and keeps the fastest",
    )
    p.add_argument(
        "--compile-whole",
        action="store_true",
        help="with --fuse-projections: also time the fused rows with the decoder stack compiled as one graph",
    )
    p.add_argument(
        "--skip-cycle-costs",
        action="store_true",
        help="leave out the per-boundary costs (indexer, recall, flush): step rows only, for a run that re-measures "
        "steps whose cycle costs are already recorded",
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16")
    args = p.parse_args()
    if (args.autotune or args.compile_whole) and not args.fuse_projections:
        p.error("--autotune and --compile-whole time the fused rows: add --fuse-projections")
    prov = provenance("benchmarks/decode_speed.py", vars(args))  # the flags as typed, before they are parsed
    args.contexts = [int(x) for x in args.contexts.split(",")]
    args.churn = [float(x) for x in args.churn.split(",")]
    args.dtype = getattr(torch, args.dtype)
    device = torch.device(args.device)
    torch.manual_seed(0)
    bench = Bench(args, device)
    args.interval = bench.lsa.interval
    print(f"copy {bench.copy_tb_s:.2f} TB/s, H2D {bench.h2d_gb_s:.1f} GB/s", flush=True)
    bench.report.args = {k: (str(v) if isinstance(v, (Path, torch.dtype)) else v) for k, v in vars(args).items()}
    bench.report.command, bench.report.commit = prov["command"], prov["commit"]
    args.out.mkdir(parents=True, exist_ok=True)
    churn = args.churn[0]

    def save() -> None:
        amortise(bench.report, bench.lsa.interval, churn)
        (args.out / "decode_speed.json").write_text(json.dumps(asdict(bench.report), indent=1, default=str))
        (args.out / "decode_speed.md").write_text(markdown(bench.report, churn))

    bench.save = save  # called after every context: a run cut off by a time limit keeps what it measured
    try:
        for name in args.models.split(","):
            run_model(bench, name)
    except CaptureFailed as e:
        save()
        raise SystemExit(
            f"decode_speed: stopped after a failed graph capture ({e}); results so far in {args.out}"
        ) from e
    print(markdown(bench.report, churn))


if __name__ == "__main__":
    main()
