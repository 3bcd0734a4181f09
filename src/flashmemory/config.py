"""Settings of Lookahead Sparse Attention, validated once at construction."""

from __future__ import annotations

from dataclasses import dataclass, replace

LAYER_REDUCTIONS = ("max", "mean")  # how per-layer chunk scores combine


@dataclass(slots=True)
class LSAConfig:
    """How LSA keeps the KV cache of one request.

    Args:
        chunk_size: tokens per scoring unit (one frozen key per chunk and KV head). Default: 16.
        page_chunks: chunks per recall unit; a page is ``chunk_size * page_chunks`` tokens. ``None`` takes the
            backbone's measured size (``BackboneSpec.default_page_chunks``: 4 unless measured otherwise; SmolLM2's
            shape: 2, which finds more planted facts where a budget holds only a few pages). Default: None.
        interval: decode steps per cycle; the resident set only changes at cycle boundaries. Default: 64.
        threshold: sigmoid score above which a chunk counts as kept for page density. Default: 0.5.
        budget: hard cap on the device bytes of the sequence's KV (reserve, recent tail, sink, chunk keys),
            as a fraction of the full cache when ``<= 1`` or as a number of bytes when ``> 1``.
            ``None`` means "no cap": use ``max_pages`` instead. Default: 0.25.
        max_pages: explicit number of page slots; only used when ``budget`` is None. Default: None.
        recent: tokens at the end of the history that always stay resident. Default: 64.
        sink: tokens at the start of the sequence that always stay resident. Default: 16.
        target_layers: decoder layers whose hidden state and cached keys the indexer uses; ``None`` picks
            the model's zero-shot layers: the best measured for its shape, else the full-attention layers at
            45-70% of the depth (``BackboneSpec.default_target_layers``). Default: None.
        layer_reduce: how per-layer chunk scores combine, ``"max"`` or ``"mean"``; ``None`` means the one a
            checkpoint records (``IndexerSpec.layer_reduce``), ``"mean"`` for the zero-shot indexer on its
            default layers, and ``"max"`` for explicit ``target_layers``, as they were measured. Default: None.
        best_chunk_slots: fraction of the page slots given to the pages holding the highest-scored chunks
            (the top-m fallback for precise retrieval); the rest go to the pages with most chunks above the
            threshold. Default: 1.0.
        query_window: newest tokens whose hidden states form the lookahead query; a chunk's score is the
            max over them. At the first boundary these are the prompt's last tokens (its question). Default: 16.
        follow_chunks: chunks after a scored chunk that inherit its score, so that the text following a match
            (the value after a key) is recalled with it even when a page boundary falls between them. ``None`` takes
            the backbone's measured count (``BackboneSpec.default_follow_chunks``: 0 unless measured otherwise;
            SmolLM2's shape, whose 32-token pages cut a value twice as often as 64-token ones: 1). Default: None.
        first_boundary_keys: what the indexer's query is matched against at the first boundary (the end of the
            prefill): ``"chunk"``, the frozen chunk keys like every later boundary; ``"token"``, the target
            layers' keys of every prompt token, a chunk scoring as its best token; or ``"auto"``, token keys for
            prompts of at least ``token_keys_from`` tokens and chunk keys for shorter ones. A chunk's mean key
            blurs a needle into the text around it: on RULER's held-out samples token keys gained 5.5-6.5 points
            at every length from 4K to 32K on Qwen2.5's layer 13. The boundary reads the target layers' prompt
            keys back from the host mirror a block at a time, so it holds no extra device memory (on a GPU it
            waits once for the prefill's copies into the mirror).
            Default: "auto".
        token_keys_from: prompt length in tokens (of the longest prompt in a batch) from which
            ``first_boundary_keys="auto"`` uses token keys; ``None`` takes the length measured for the backbone's
            shape (``BackboneSpec.default_token_keys_from``: 0, every length, unless measured otherwise; SmolLM2's
            shape: 3072, measured with the checkpoint it shipped then). Default: None.
        later_boundary_keys: what the boundaries after the first match the query against: ``"chunk"``, the frozen
            chunk keys; ``"token"``, the target layers' keys of every complete chunk's tokens, read back from the
            host mirror block by block (a chunk scores as its best token). Token keys follow a continuation that
            repeats text from far back (copy-back: SmolLM2 with the zero-shot indexer copies 0.74 of a passage's
            tokens against 0.41 with chunk keys, full attention 0.89; ``benchmarks/results/copy_back_smollm2_cpu``),
            at the cost of reading one layer's keys per target layer over the host link at every boundary.
            Default: "chunk".
        warmup_steps: decode steps of a turn (counted from its first boundary: the end of the prefill, or a
            requested boundary) after which an extra boundary chooses the pages again, so that the first tokens of
            the answer join the lookahead query. An answer that follows a chain through the history (a variable
            assigned from another, a second hop) needs pages the question alone does not point at; these
            boundaries find them within the first cycle instead of ``interval`` steps later. Each must be in
            ``[1, interval)``, increasing; ``()`` takes none. A chunk keeps at least its score of the turn's first
            boundary, so after token keys there (a chunk's best token outscores its mean key) these boundaries
            rarely change the pages. Default: ().
        prefetch_steps: decode steps before a boundary at which the next cycle's pages are chosen and copied into
            spare page slots, so that the copy overlaps with those steps instead of delaying the step after the
            boundary; the pages join the resident set at the boundary (pages leaving the recent tail then are
            copied from the tail). 0 chooses and copies at the boundary. Needs the fast path
            (``attention_backend`` ``"triton"`` or ``"torch"``). Default: 0.
        prefetch_share: share of the page slots kept empty for the pages a prefetch brings in (with
            ``prefetch_steps > 0``): the resident set holds the other slots, and a boundary brings in at most
            this share of new pages. Default: 0.25.
        attention_backend: decode attention over the reserve: ``"mask"`` (transformers' attention with a mask
            over the whole reserve), ``"triton"`` (paged sparse decode kernel, host-sync-free recall, CUDA-graph
            capturable steps), ``"torch"`` (the same fast path with the kernel's torch reference), or ``"auto"``
            (``"triton"`` on CUDA when Triton is importable, else ``"mask"``). Used by
            :func:`flashmemory.attention.fast_path.build_lsa_cache`. Default: "auto".
        attention_feedback: when the indexer has an attention-feedback head, count the layers' attention
            consensus per chunk (the prompt's last tokens at the end of the prefill, the resident chunks at every
            decode step) and let the head score the boundaries after a turn's first from it, with the tower's logit
            (:mod:`flashmemory.attention.feedback`). The counting runs on the ``"mask"`` backend only. ``None``
            counts wherever the backend is ``"mask"`` (on a CPU, or when asked for) and leaves the head out on the
            fast path, which keeps its speed; True also makes ``"auto"`` pick ``"mask"``; False scores with the
            tower alone everywhere. Default: None.
        tower_slots: with a feedback head, at the boundaries after a turn's first, the share of page slots that go
            to the pages holding the tower's best chunks; the head's scores rank the rest (by density, as above).
            The head predicts the chunks attention keeps returning to, but a needle no attention has reached yet
            has no feedback. A turn's first boundary, where only the prompt window's feedback exists, is chosen by
            the tower alone. ``None`` takes the share stored with the head. Default: None.
    """

    chunk_size: int = 16
    page_chunks: int | None = None
    interval: int = 64
    threshold: float = 0.5
    budget: float | None = 0.25
    max_pages: int | None = None
    recent: int = 64
    sink: int = 16
    target_layers: tuple[int, ...] | None = None
    layer_reduce: str | None = None
    best_chunk_slots: float = 1.0
    query_window: int = 16
    follow_chunks: int | None = None
    first_boundary_keys: str = "auto"
    token_keys_from: int | None = None
    later_boundary_keys: str = "chunk"
    warmup_steps: tuple[int, ...] = ()
    prefetch_steps: int = 0
    prefetch_share: float = 0.25
    attention_backend: str = "auto"
    attention_feedback: bool | None = None
    tower_slots: float | None = None

    def __post_init__(self) -> None:
        for name in ("chunk_size", "page_chunks", "interval", "query_window"):
            value = getattr(self, name)
            if value is not None and value < 1:  # page_chunks=None: the backbone's size
                raise ValueError(f"LSAConfig.{name} must be >= 1, got {value}")
        for name in ("recent", "sink", "follow_chunks", "token_keys_from"):
            if (getattr(self, name) or 0) < 0:
                raise ValueError(f"LSAConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.interval % self.chunk_size:
            raise ValueError(
                f"LSAConfig.interval ({self.interval}) must be a multiple of chunk_size ({self.chunk_size}) "
                "so chunks complete exactly at cycle boundaries"
            )
        if not 0 <= self.prefetch_steps < self.interval:
            raise ValueError(
                f"LSAConfig.prefetch_steps must be in [0, interval={self.interval}), got {self.prefetch_steps}"
            )
        if not 0.0 < self.prefetch_share < 1.0:
            raise ValueError(f"LSAConfig.prefetch_share must be in (0, 1), got {self.prefetch_share}")
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"LSAConfig.threshold must be in (0, 1), got {self.threshold}")
        if self.budget is None and self.max_pages is None:
            raise ValueError("LSAConfig needs a budget (fraction or bytes) or max_pages")
        if self.budget is not None and not self.budget > 0:
            raise ValueError(f"LSAConfig.budget must be > 0 (a fraction in (0, 1] or bytes), got {self.budget}")
        if self.budget is not None and self.budget > 1 and self.budget != int(self.budget):
            # 1.5 or 12.5 is a fraction or a percentage typed wrong; read as bytes it would be one byte
            raise ValueError(
                f"LSAConfig.budget {self.budget:g} is neither a fraction of the full cache in (0, 1] nor a whole "
                "number of bytes"
            )
        if self.max_pages is not None and self.max_pages < 0:
            raise ValueError(f"LSAConfig.max_pages must be >= 0, got {self.max_pages}")
        if self.tower_slots is not None and not 0.0 <= self.tower_slots <= 1.0:
            raise ValueError(f"LSAConfig.tower_slots must be in [0, 1], got {self.tower_slots}")
        if not 0.0 <= self.best_chunk_slots <= 1.0:
            raise ValueError(f"LSAConfig.best_chunk_slots must be in [0, 1], got {self.best_chunk_slots}")
        if self.layer_reduce not in (None, *LAYER_REDUCTIONS):
            raise ValueError(f"LSAConfig.layer_reduce must be 'max' or 'mean', got {self.layer_reduce!r}")
        if self.first_boundary_keys not in ("auto", "chunk", "token"):
            raise ValueError(
                f"LSAConfig.first_boundary_keys must be 'auto', 'chunk' or 'token', got {self.first_boundary_keys!r}"
            )
        if self.later_boundary_keys not in ("chunk", "token"):
            raise ValueError(
                f"LSAConfig.later_boundary_keys must be 'chunk' or 'token', got {self.later_boundary_keys!r}"
            )
        if self.later_boundary_keys == "token" and self.prefetch_steps:
            raise ValueError(
                "LSAConfig.later_boundary_keys='token' reads keys the host mirror holds, and a prefetch scores "
                "chunks still on the device only: use prefetch_steps=0 with it"
            )
        if self.attention_backend not in ("auto", "mask", "triton", "torch"):
            raise ValueError(
                "LSAConfig.attention_backend must be 'auto', 'mask', 'triton' or 'torch', "
                f"got {self.attention_backend!r}"
            )
        self.warmup_steps = tuple(int(s) for s in self.warmup_steps)
        if any(not 0 < s < self.interval for s in self.warmup_steps) or list(self.warmup_steps) != sorted(
            set(self.warmup_steps)
        ):
            raise ValueError(
                f"LSAConfig.warmup_steps must be increasing steps in [1, interval={self.interval}), "
                f"got {self.warmup_steps}"
            )
        if self.target_layers is not None:
            self.target_layers = tuple(int(i) for i in self.target_layers)
            if not self.target_layers:
                raise ValueError("LSAConfig.target_layers must name at least one layer")

    @property
    def page_size(self) -> int:
        """Tokens per page.

        Raises:
            ValueError: while ``page_chunks`` is unset (see :meth:`with_page_chunks`).
        """
        if self.page_chunks is None:
            raise ValueError("LSAConfig.page_chunks is unset: take the backbone's size with with_page_chunks()")
        return self.chunk_size * self.page_chunks

    def with_page_chunks(self, backbone_default: int) -> LSAConfig:
        """These settings with ``page_chunks`` set: ``backbone_default`` when it is unset, else unchanged."""
        return self if self.page_chunks is not None else replace(self, page_chunks=backbone_default)

    def with_follow_chunks(self, backbone_default: int) -> LSAConfig:
        """These settings with ``follow_chunks`` set: ``backbone_default`` when it is unset, else unchanged."""
        return self if self.follow_chunks is not None else replace(self, follow_chunks=backbone_default)

    @property
    def tail_capacity(self) -> int:
        """Slots of the recent tail.

        The tail starts on a page boundary (so every selectable page is complete in the host mirror), which
        costs up to ``page_size - 1`` extra tokens, and grows by ``interval`` tokens per cycle.
        """
        return self.recent + self.page_size - 1 + self.interval

    def tail_capacity_for(self, new_tokens: int) -> int:
        """Slots of the recent tail when at most ``new_tokens`` tokens join the cache after the prefill.

        A cycle can only add the tokens a request still writes, so a short answer (a 16-token reply) needs fewer
        than ``interval`` growth slots; at a small context those slots are whole pages the budget gets back.
        """
        return self.recent + self.page_size - 1 + max(1, min(self.interval, new_tokens))

    @property
    def is_fractional_budget(self) -> bool:
        return self.budget is not None and self.budget <= 1.0

    def token_keys_threshold(self, backbone_from: int) -> int | None:
        """The prompt length from which ``"auto"`` scores token keys; None when the mode is not ``"auto"``.

        Args:
            backbone_from: the backbone's own threshold, used when ``token_keys_from`` is None.
        """
        if self.first_boundary_keys != "auto":
            return None
        return backbone_from if self.token_keys_from is None else self.token_keys_from

    def scores_tokens_first(self, prompt_len: int, backbone_from: int) -> bool:
        """Whether the first boundary after a prefill of ``prompt_len`` tokens scores chunks by their best token.

        Args:
            prompt_len: tokens of the (padded) prompt.
            backbone_from: the backbone's own threshold, used when ``token_keys_from`` is None.
        """
        if self.first_boundary_keys == "auto":
            return prompt_len >= self.token_keys_threshold(backbone_from)
        return self.first_boundary_keys == "token"


def parse_int_list(text: str) -> tuple[int, ...]:
    """``"12,16"`` (or ``"12/16"``) as a tuple of ints.

    Raises:
        ValueError: for an item that is not an integer.
    """
    return tuple(int(x) for x in text.replace("/", ",").split(",") if x.strip())


# Settings a command line may change with KEY=VALUE; the budget has its own option everywhere.
_OVERRIDABLE = {
    "chunk_size": int,
    "page_chunks": int,
    "interval": int,
    "threshold": float,
    "max_pages": int,
    "recent": int,
    "sink": int,
    "target_layers": parse_int_list,
    "layer_reduce": str,
    "best_chunk_slots": float,
    "query_window": int,
    "follow_chunks": int,
    "first_boundary_keys": str,
    "token_keys_from": int,
    "later_boundary_keys": str,
    "warmup_steps": parse_int_list,
    "prefetch_steps": int,
    "prefetch_share": float,
    "attention_backend": str,
}


def with_overrides(cfg: LSAConfig, items: list[str]) -> LSAConfig:
    """``cfg`` with ``KEY=VALUE`` settings applied (``"follow_chunks=1"``, ``"target_layers=12,16"``), validated.

    Raises:
        ValueError: for a malformed item, an unknown or non-overridable key, a value of the wrong type, or a value
            :class:`LSAConfig` refuses.
    """
    changes: dict = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise ValueError(f"LSA setting {item!r} must look like KEY=VALUE, e.g. follow_chunks=1")
        if key not in _OVERRIDABLE:
            hint = " (use --budget)" if key == "budget" else ""
            raise ValueError(f"unknown LSA setting {key!r}{hint}; settable: {', '.join(_OVERRIDABLE)}")
        try:
            changes[key] = _OVERRIDABLE[key](text.strip())
        except ValueError:
            raise ValueError(f"LSA setting {key}={text!r}: not a valid value") from None
    return replace(cfg, **changes)
