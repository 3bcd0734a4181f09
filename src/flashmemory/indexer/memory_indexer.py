"""The Memory Indexer: query tower + frozen chunk keys -> which chunks the next cycle will attend to."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..config import LAYER_REDUCTIONS, LSAConfig
from ..models.adapter import apply_rope, attention_module, backbone_spec, rope_parameters
from .feedback import FeedbackHead, FeedbackSpec
from .query_tower import QueryTower
from .scoring import chunk_logits, token_chunk_logits

NUM_DISTANCE_BUCKETS = 48
EXACT_BUCKETS = 16  # the nearest chunks each get their own bucket, so the prior can express plain recency


def distance_buckets(distance: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Bucket of a token distance: one bucket per chunk for the nearest ``EXACT_BUCKETS`` chunks, then four per
    doubling of the distance, capped at the last bucket."""
    chunks = distance.clamp(min=0).div(chunk_size, rounding_mode="floor")
    far = EXACT_BUCKETS + (torch.log2(chunks.clamp(min=EXACT_BUCKETS).float() / EXACT_BUCKETS) * 4).floor().long()
    return torch.where(chunks < EXACT_BUCKETS, chunks, far).clamp(max=NUM_DISTANCE_BUCKETS - 1)


def covered_buckets(max_distance: int, chunk_size: int) -> int:
    """How many distance buckets, from the nearest, hold no distance beyond ``max_distance`` tokens: the buckets a
    prior trained on distances up to ``max_distance`` learnt over their whole range."""
    if max_distance < 0:
        return 0
    here, beyond = distance_buckets(torch.tensor([max_distance, max_distance + chunk_size]), chunk_size).tolist()
    if here == NUM_DISTANCE_BUCKETS - 1:  # the last bucket holds every farther distance anyway
        return NUM_DISTANCE_BUCKETS
    return here + 1 if beyond > here else here


@dataclass(slots=True)
class IndexerSpec:
    """Everything needed to rebuild an indexer without its backbone (stored in the checkpoint's JSON).

    Args:
        backbone: name of the backbone it was built from.
        fingerprint: :func:`flashmemory.models.model_fingerprint` of that backbone ("" when unknown).
        target_layers: decoder layers it reads.
        hidden_size: residual width.
        num_heads: query heads.
        num_kv_heads: key/value heads.
        head_dim: channels per head.
        chunk_size: tokens per chunk the keys were averaged over.
        use_bias: query projection has a bias.
        use_q_norm: queries are RMS-normed per head.
        rms_eps: epsilon of that norm.
        rope_scaling: per target layer, the rotary output scaling.
        trained: False for the zero-shot (q_proj-initialised) tower.
        feedback: settings of the attention-feedback head (:class:`~flashmemory.indexer.feedback.FeedbackSpec`),
            None for an indexer without one.
        prior_buckets: distance buckets of the prior that training covered whole; farther distances use the last
            of them (None: all buckets, as for checkpoints saved before this existed).
        layer_reduce: how the target layers' chunk probabilities combine, ``"max"`` or ``"mean"``: the reduction
            the indexer was trained (or, for a dump's zero-shot indexer, is run) with, and the runtime's default for
            it. Checkpoints saved before this existed were trained with ``"max"``.
    """

    backbone: str
    fingerprint: str
    target_layers: list[int]
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    chunk_size: int
    use_bias: bool = False
    use_q_norm: bool = False
    rms_eps: float = 1e-6
    rope_scaling: list[float] | None = None
    trained: bool = False
    feedback: dict | None = None
    prior_buckets: int | None = None
    layer_reduce: str = "max"

    def __post_init__(self) -> None:
        if self.layer_reduce not in LAYER_REDUCTIONS:
            raise ValueError(f"layer_reduce must be one of {LAYER_REDUCTIONS}, got {self.layer_reduce!r}")

    def to_dict(self) -> dict:
        return asdict(self)


class MemoryIndexer(nn.Module):
    """Scores every chunk of the history for the coming cycle.

    Args:
        spec: shapes and provenance.
        inv_freq: rotary inverse frequencies per target layer. # [L, D/2]
        device: where the parameters are made. Default: the CPU.
    """

    def __init__(
        self, spec: IndexerSpec, inv_freq: torch.Tensor | None = None, device: torch.device | str | None = None
    ) -> None:
        super().__init__()
        self.spec = spec
        n = len(spec.target_layers)
        self.tower = QueryTower(
            n,
            spec.hidden_size,
            spec.num_heads,
            spec.head_dim,
            use_bias=spec.use_bias,
            use_q_norm=spec.use_q_norm,
            rms_eps=spec.rms_eps,
            device=device,
        )
        if inv_freq is None:
            inv_freq = torch.zeros(n, spec.head_dim // 2)
        self.register_buffer("inv_freq", inv_freq.to(device=device, dtype=torch.float32, copy=True))
        # A learned prior on how far back a chunk lies (log2 buckets of token distance); zero = no prior, so the
        # zero-shot indexer scores like attention alone.
        self.distance_bias = nn.Parameter(torch.zeros(n, NUM_DISTANCE_BUCKETS, device=device))
        if spec.rope_scaling is None:
            spec.rope_scaling = [1.0] * n
        self.feedback = None if spec.feedback is None else FeedbackHead(FeedbackSpec(**spec.feedback)).to(device)

    @property
    def feedback_spec(self) -> FeedbackSpec | None:
        """Settings of the attention-feedback head, None when the indexer has none."""
        return None if self.spec.feedback is None else FeedbackSpec(**self.spec.feedback)

    def add_feedback(self, spec: FeedbackSpec) -> None:
        """Give the indexer a fresh attention-feedback head (its weights are then trained on dumps)."""
        self.spec.feedback = spec.to_dict()
        self.feedback = FeedbackHead(spec).to(self.inv_freq.device)

    @property
    def target_layers(self) -> tuple[int, ...]:
        return tuple(self.spec.target_layers)

    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        target_layers: tuple[int, ...],
        *,
        chunk_size: int,
        backbone: str = "",
        fingerprint: str = "",
    ) -> MemoryIndexer:
        """Zero-shot indexer: query projections copied from the target layers' ``q_proj``."""
        bspec = backbone_spec(model)
        bad = [i for i in target_layers if not 0 <= i < bspec.num_layers or bspec.layer_types[i] != "full_attention"]
        if bad:
            raise ValueError(
                f"target layers {bad} are not full-attention layers of this model "
                f"(full-attention layers: {bspec.full_layers})"
            )
        attn0 = attention_module(model, target_layers[0])
        q_norm = getattr(attn0, "q_norm", None)
        ropes = [rope_parameters(model, i) for i in target_layers]
        spec = IndexerSpec(
            backbone=backbone,
            fingerprint=fingerprint,
            target_layers=list(target_layers),
            hidden_size=bspec.hidden_size,
            num_heads=bspec.num_heads,
            num_kv_heads=bspec.num_kv_heads,
            head_dim=bspec.head_dim,
            chunk_size=chunk_size,
            use_bias=attn0.q_proj.bias is not None,
            use_q_norm=q_norm is not None,
            rms_eps=float(getattr(q_norm, "eps", getattr(q_norm, "variance_epsilon", 1e-6))) if q_norm else 1e-6,
            rope_scaling=[scale for _, scale in ropes],
        )
        # made where the backbone lives: built on the host, the projections crossed the bus twice (about 0.25 s per
        # request on a Llama-3-8B shape on an H200)
        param = next(model.parameters())
        indexer = cls(spec, torch.stack([inv for inv, _ in ropes]), device=param.device)
        with torch.no_grad():
            for j, layer in enumerate(target_layers):
                attn = attention_module(model, layer)
                indexer.tower.q_proj[j].weight.copy_(attn.q_proj.weight.float())
                if spec.use_bias:
                    indexer.tower.q_proj[j].bias.copy_(attn.q_proj.bias.float())
                if spec.use_q_norm:
                    indexer.tower.q_norm[j].copy_(_effective_norm_weight(attn.q_norm, spec.head_dim))
        return indexer

    def layer_logits(
        self,
        j: int,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        keys: torch.Tensor,
        window_mask: torch.Tensor | None = None,
        chunk_offset: torch.Tensor | None = None,
        token_keys: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits of every chunk for target layer number ``j``: max over the lookahead window.

        Args:
            j: index into :attr:`target_layers`.
            hidden: hidden states entering that layer's attention, ``[B, W, hidden]`` (or ``[B, hidden]``).
            positions: absolute positions of those tokens. # [B, W] (or [B])
            keys: that layer's chunk keys. # [B, Hkv, N, D]
            window_mask: False for window slots that hold no real token (padding). # [B, W]
            chunk_offset: left padding per sequence, to put chunks in the positions' frame. # [B]
            token_keys: that layer's keys of every token, when they are at hand (the end of the prefill): a chunk
                then scores as its best token instead of by its mean key. # [B, Hkv, T, D]

        Returns:
            Logits. # [B, N]
        """
        if hidden.dim() == 2:
            hidden, positions = hidden[:, None], positions[:, None]
        q, w = self.tower(j, hidden.to(self.inv_freq.device, self.tower.q_proj[j].weight.dtype))
        q = apply_rope(q, positions.to(q.device), self.inv_freq[j], self.spec.rope_scaling[j])
        bias = self.tower.score_bias[j]
        if token_keys is None:
            logits = chunk_logits(q, w, bias, keys.to(q.device))  # [B, W, N]
        else:
            c, n = self.spec.chunk_size, keys.shape[2]
            logits = token_chunk_logits(q, w, bias, token_keys, c, n, chunk_offset)
        logits = logits + self._distance_prior(j, positions.to(q.device), keys.shape[2], chunk_offset)
        if window_mask is not None:
            logits = logits.masked_fill(~window_mask.to(logits.device)[..., None], float("-inf"))
        return logits.amax(1)

    def _distance_prior(
        self, j: int, positions: torch.Tensor, num_chunks: int, chunk_offset: torch.Tensor | None
    ) -> torch.Tensor:
        """Learned bias by distance from each query token to each chunk's last token. # [B, W, N]"""
        c = self.spec.chunk_size
        last = (torch.arange(num_chunks, device=positions.device) + 1) * c - 1  # [N]
        if chunk_offset is not None:
            last = last[None, :] - chunk_offset.to(positions.device)[:, None]  # [B, N]
            last = last[:, None, :]
        distance = positions[..., None] - last
        buckets = distance_buckets(distance, c)
        if self.spec.prior_buckets is not None:
            # past the distances training covered, a bucket's bias was learnt from a few prompts' first chunks
            # (often attention sinks) or not at all: farther chunks get the last fully covered bucket's bias
            buckets = buckets.clamp(max=self.spec.prior_buckets - 1)
        return self.distance_bias[j][buckets]

    def score(
        self,
        hidden: dict[int, torch.Tensor],
        positions: torch.Tensor,
        keys: list[torch.Tensor],
        reduce: str = "max",
        window_mask: torch.Tensor | None = None,
        chunk_offset: torch.Tensor | None = None,
        token_keys: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Probability that each chunk is needed in the coming cycle, combined over target layers.

        Args:
            hidden: per target decoder layer, hidden states of the lookahead window. # {layer: [B, W, hidden]}
            positions: absolute positions of the window's tokens. # [B, W]
            keys: chunk keys per target layer, in target order. # L x [B, Hkv, N, D]
            reduce: ``"max"`` or ``"mean"`` over layers.
            window_mask: False for window slots without a real token. # [B, W]
            chunk_offset: left padding per sequence. # [B]
            token_keys: keys of every token per target layer, in target order, to score chunks by their best
                token (see :meth:`layer_logits`). # L x [B, Hkv, T, D]

        Returns:
            Probabilities. # [B, N]
        """
        probs = torch.stack(
            [
                torch.sigmoid(
                    self.layer_logits(
                        j,
                        hidden[layer],
                        positions,
                        keys[j],
                        window_mask,
                        chunk_offset,
                        None if token_keys is None else token_keys[j],
                    )
                )
                for j, layer in enumerate(self.target_layers)
            ]
        )
        return probs.amax(0) if reduce == "max" else probs.mean(0)


def zero_shot_indexer(model: nn.Module, lsa: LSAConfig) -> MemoryIndexer:
    """The indexer an LSA cache builds when given none: the backbone's ``q_proj`` on the layers ``lsa`` names (else
    the model's defaults), recording the reduction it scores with."""
    targets, reduce = backbone_spec(model).scorer(lsa.target_layers, lsa.layer_reduce, zero_shot=True)
    indexer = MemoryIndexer.from_model(model, targets, chunk_size=lsa.chunk_size)
    indexer.spec.layer_reduce = reduce
    return indexer


def _effective_norm_weight(norm: nn.Module, dim: int) -> torch.Tensor:
    """The per-channel gain of an RMSNorm, whatever its parametrisation (Gemma stores ``gain - 1``).

    The RMS of a vector of ones is 1, so normalising ones returns the gain itself, up to ``sqrt(1 + eps)``.
    """
    param = next(norm.parameters())
    eps = float(getattr(norm, "eps", getattr(norm, "variance_epsilon", 1e-6)))
    with torch.no_grad():
        out = norm(torch.ones(1, dim, dtype=param.dtype, device=param.device)).float()
    return (out * (1.0 + eps) ** 0.5).squeeze(0).cpu()
