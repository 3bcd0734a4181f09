"""What one generation cost: time per phase and device/host KV bytes."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(slots=True)
class GenerationStats:
    """Accounting of one :func:`flashmemory.generate` call (whole batch).

    Args:
        method: ``"lsa"`` or ``"full"``.
        batch_size: sequences decoded together.
        context_tokens: prompt tokens of the longest sequence (padding included).
        new_tokens: decode steps run.
        prefill_seconds: wall time of the prompt forward pass.
        decode_seconds: wall time of all decode steps.
        kv_bytes_device: peak bytes of KV state on the device during decode, from tensor storage.
        kv_bytes_full: bytes a full cache holds at the final length.
        kv_bytes_host: host bytes holding the mirror, from tensor storage (on CUDA its page-locked block, which
            may be up to twice the mirror when a larger block was free for reuse).
        boundaries: cycle boundaries crossed (the first one is right after prefill).
        pages_recalled: pages copied into the reserve at each boundary.
        select_seconds: time spent scoring chunks and choosing pages.
        recall_seconds: time spent copying pages.
        page_slots: page slots of the reserve (``K``).
        above_threshold: per boundary scored by the indexer, the share of chunks it scored above its threshold.
            This is the indexer's own confidence, not what stays resident: the budget caps the pages
            (``page_slots``).
        allocator_kv_bytes: on CUDA, allocator bytes held after prefill minus before (cross-check).
        allocator_decode_peak_bytes: on CUDA, peak allocator bytes during decode minus before prefill
            (KV plus decode-time temporaries).
        replayed_steps: decode steps replayed from a CUDA graph; the others (boundaries, and every step when
            graph replay is off or cannot run) ran eagerly.
    """

    method: str
    batch_size: int
    context_tokens: int
    new_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    kv_bytes_device: int = 0
    kv_bytes_full: int = 0
    kv_bytes_host: int = 0
    boundaries: int = 0
    pages_recalled: list[int] = field(default_factory=list)
    select_seconds: float = 0.0
    recall_seconds: float = 0.0
    page_slots: int | None = None
    above_threshold: list[float] = field(default_factory=list)
    allocator_kv_bytes: int | None = None
    allocator_decode_peak_bytes: int | None = None
    replayed_steps: int = 0

    @property
    def kv_ratio(self) -> float:
        return self.kv_bytes_device / self.kv_bytes_full if self.kv_bytes_full else 0.0

    def to_dict(self) -> dict:
        out = asdict(self)
        out["kv_ratio"] = self.kv_ratio
        return out
