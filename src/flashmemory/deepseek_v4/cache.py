"""`transformers` Cache for DeepSeek-V4 with LSA on the CSA layers.

After prefill every CSA layer's compressed attention entries and lightning-indexer keys go to the host mirror of
an :class:`EntryStore`; the device keeps the reserve (sink, resident pages of 64 entries, recent tail), the raw
sliding windows and the HCA entries. During decode the compressor and the lightning indexer get the resident
entries only, and the indexer's top-k is restricted to them (see :mod:`.hooks`). Every ``interval`` tokens the
Memory Indexer scores all entries with the lookahead query and the densest/best pages are recalled.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn
from transformers.cache_utils import Cache
from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4CSACache, DeepseekV4HCACache

from ..attention.cache import CompactSlidingLayer
from ..attention.cycle import LSACycle
from ..config import LSAConfig
from ..indexer.chunk_keys import ChunkKeys
from .accounting import entry_config, full_cache_bytes, layer_state_tensors, plan_reserve
from .entry_store import EntryStore
from .hooks import DeepseekV4Hooks
from .memory_indexer import DeepseekV4MemoryIndexer
from .spec import CSA, HCA, SLIDING, attention, deepseek_v4_spec

STREAMS = {"compressor": 0, "indexer": 1}


PAGE_ENTRIES = 64  # CSA entries per page (256 tokens), also what an unset LSAConfig.page_chunks means here


def deepseek_v4_lsa_config(**overrides) -> LSAConfig:
    """LSA settings for DeepSeek-V4: a chunk is one CSA entry (4 tokens), a page 64 entries (256 tokens)."""
    return LSAConfig(**{"chunk_size": 4, "page_chunks": PAGE_ENTRIES, **overrides})


def _owns_storage(t: torch.Tensor) -> bool:
    return t.untyped_storage().nbytes() <= t.numel() * t.element_size()


class CompactState:
    """Mixin for V4 cache layers: the window and pending tokens never keep a prompt-sized tensor alive.

    transformers' layers keep views (the last window of the prompt's keys, the leftover of the prompt's
    projection) whose storage is the whole prompt's until the next token replaces them; here they are copied, so
    the device bytes LSA reports are the state itself. Values and outputs are unchanged.
    """

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        out = super().update(key_states, value_states, *args, **kwargs)
        if not _owns_storage(self.keys):
            self.keys = self.values = self.keys.clone()
        return out

    def store_compression_weights(self, name: str, kv: torch.Tensor, gate: torch.Tensor):
        out = super().store_compression_weights(name, kv, gate)
        self.buffer_kv[name], self.buffer_gate[name] = self.buffer_kv[name].clone(), self.buffer_gate[name].clone()
        return out


class CompactHCALayer(CompactState, DeepseekV4HCACache):
    """transformers' HCA layer with :class:`CompactState`."""

    _layer_type = None  # never registered in transformers' layer-type mapping: importing patches nothing


class LSACSALayer(CompactState, DeepseekV4CSACache):
    """A CSA cache layer whose compressed entries and indexer keys live in the owner's :class:`EntryStore`.

    The sliding window, the pending windows and the overlap state stay as in transformers' own layer (with
    :class:`CompactState`).
    """

    _layer_type = None
    is_compileable = False

    def __init__(self, owner: DeepseekV4LSACache, config, layer_idx: int) -> None:
        super().__init__(config)
        self.owner, self.layer_idx = weakref.proxy(owner), layer_idx  # as LSALayer's owner: no cycle

    def update_compressor_states(self, name: str, compressed: torch.Tensor) -> torch.Tensor:
        self.entry_count[name] += compressed.shape[1]
        return self.owner.entries_update(self.layer_idx, name, compressed, self.entry_count[name])

    def reset(self) -> None:
        raise NotImplementedError("a DeepseekV4LSACache serves one request; build a new one instead of resetting")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("DeepseekV4LSACache does not support beam search")

    def crop(self, max_length: int) -> None:
        raise NotImplementedError("DeepseekV4LSACache cannot crop")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("DeepseekV4LSACache does not support expanding the batch after prefill")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("DeepseekV4LSACache does not support selecting batch rows after prefill")


class DeepseekV4LSACache(LSACycle, Cache):
    """LSA for ``DeepseekV4ForCausalLM``: use with ``model.generate(..., past_key_values=cache)`` or
    :func:`flashmemory.deepseek_v4.generate_ids`.

    Args:
        model: the DeepSeek-V4 causal LM.
        lsa: LSA settings in tokens; ``chunk_size`` must be the CSA rate. Default: :func:`deepseek_v4_lsa_config`.
        indexer: a V4 Memory Indexer; ``None`` builds the zero-shot one from the native lightning indexers.
        max_new_tokens: most tokens that will be generated (sizes the mirror and the key budget).
        forced_pages: callable ``(cache) -> [B, K] page ids`` replacing the indexer (tests, oracle baselines).
    """

    def __init__(
        self,
        model: nn.Module,
        lsa: LSAConfig | None = None,
        indexer: DeepseekV4MemoryIndexer | None = None,
        *,
        max_new_tokens: int = 256,
        forced_pages=None,
    ) -> None:
        self.spec = deepseek_v4_spec(model)
        # no follower measured on DeepSeek-V4: its pages of 64 compressed entries are 256 tokens
        self.lsa = (lsa or deepseek_v4_lsa_config()).with_page_chunks(PAGE_ENTRIES).with_follow_chunks(0)
        if self.lsa.first_boundary_keys == "token":
            # its indexer keys are the compressed entries themselves: there is no finer key to score against
            raise ValueError(
                "DeepSeek-V4 scores compressed entries at every boundary: first_boundary_keys must be 'chunk' "
                "(or 'auto', which means 'chunk' here)"
            )
        self.entry_lsa = entry_config(self.lsa, self.spec.csa_rate)
        targets = self.lsa.target_layers or self.spec.default_target_layers()
        self.spec.check_targets(tuple(targets))
        if indexer is None:
            indexer = DeepseekV4MemoryIndexer.from_model(model, tuple(targets))
        if not isinstance(indexer, DeepseekV4MemoryIndexer):
            raise ValueError("DeepSeek-V4 needs a DeepSeek-V4 Memory Indexer (its keys are the native indexer keys)")
        if self.lsa.target_layers is not None and tuple(indexer.target_layers) != tuple(targets):
            raise ValueError(f"indexer reads layers {indexer.target_layers} but LSAConfig asks for {targets}")
        self.indexer = indexer
        self.targets = tuple(indexer.target_layers)
        self.key_perm = indexer.key_permutation
        config = model.config
        layers = []
        for i, kind in enumerate(self.spec.layer_types):
            if kind == CSA:
                layers.append(LSACSALayer(self, config, i))
            elif kind == HCA:
                layers.append(CompactHCALayer(config))
            else:
                assert kind == SLIDING, kind
                layers.append(CompactSlidingLayer(sliding_window=self.spec.sliding_window))
        super().__init__(layers=layers)
        self.layer_devices = {i: next(attention(model, i).parameters()).device for i in self.spec.csa_layers}
        self.init_cycle(max_new_tokens, forced_pages)
        self.store: EntryStore | None = None
        self.chunk_keys = ChunkKeys(self.targets, 1)
        self.pending: dict[int, dict[int, torch.Tensor]] = {}
        self.context_tokens = 0
        self.tokens_seen = 0
        self.active = False
        self.hooks = DeepseekV4Hooks(self, model)

    def begin_forward(self, num_tokens: int, batch: int) -> None:
        """Called before every forward pass that carries this cache."""
        if self.closed:
            raise RuntimeError("this DeepseekV4LSACache was closed; build a new one for a new request")
        if self.tokens_seen == 0:
            self.context_tokens = num_tokens
            self.tokens_seen = num_tokens
        elif num_tokens != 1:
            raise NotImplementedError("DeepseekV4LSACache takes the prompt in one pass, then one token per step")
        else:
            self.begin_decode_step()
        self.active = True

    def entries_update(self, layer: int, name: str, compressed: torch.Tensor, count: int) -> torch.Tensor:
        """Route new compressed entries of one stream; return what attention / the indexer may read.

        Args:
            name: ``"compressor"`` (attention entries) or ``"indexer"`` (lightning-indexer keys).
            compressed: entries completed by this forward. # [B, n, width]
            count: entries of this stream after this forward.

        Returns:
            Prefill: all entries ``[B, n, width]``. Decode: the resident entries in entry order ``[B, S, width]``.
        """
        stream = STREAMS[name]
        if not self.in_decode:
            if count != compressed.shape[1]:
                raise NotImplementedError("DeepseekV4LSACache takes the prompt in one forward pass")
            self._prefill_entries(layer, stream, compressed)
            return compressed
        if compressed.shape[1]:
            if count != self.store.seq_len:
                raise RuntimeError(f"layer {layer} has {count} {name} entries, the store expected {self.store.seq_len}")
            self.store.append_entry(layer, stream, compressed)
        return self.store.resident(layer, stream)

    def _prefill_entries(self, layer: int, stream: int, compressed: torch.Tensor) -> None:
        pending = self.pending.setdefault(layer, {})
        pending[stream] = compressed
        if len(pending) < 2:
            return  # the compressor runs before the indexer: wait for the indexer keys of the same entries
        entries, keys = pending.pop(0)[:, None], pending.pop(1)[:, None]  # [B, 1, N, width]
        del self.pending[layer]
        if self.store is None:
            self._allocate(entries, keys)
        self.store.write_prefill(layer, entries, keys)
        if layer in self.targets:
            zeros = torch.zeros(entries.shape[0], dtype=torch.long)
            self.chunk_keys.extend(layer, keys[..., self.key_perm.to(keys.device)], 0, zeros, keys.device)

    def _allocate(self, entries: torch.Tensor, keys: torch.Tensor) -> None:
        layout = plan_reserve(
            self.spec,
            self.lsa,
            num_targets=len(self.targets),
            context_tokens=self.context_tokens,
            max_new_tokens=self.max_new_tokens,
            elem=entries.element_size(),
        )
        self.store = EntryStore(self.spec.csa_layers, layout, self.entry_lsa.recent, self.layer_devices)
        self.store.allocate_entries(
            entries.shape[0],
            (entries.shape[-1], keys.shape[-1]),
            dtype=entries.dtype,
            device=entries.device,
            capacity=(self.context_tokens + self.max_new_tokens) // self.spec.csa_rate + 1,
        )

    def begin_decode_step(self) -> None:
        """Boundary work when a cycle starts, then account for the entry this token completes (if any)."""
        if not self.in_decode and self.pending:
            raise RuntimeError(f"prefill left entries without indexer keys in layers {sorted(self.pending)}")
        super().begin_decode_step()

    def _begin_store_step(self) -> None:
        self.tokens_seen += 1
        if self.tokens_seen % self.spec.csa_rate == 0:
            self.store.begin_step()  # the compressors close a window with this token: one new entry

    def _extend_chunk_keys(self) -> None:
        start, end = self.chunk_keys.num_chunks, self.store.flushed_len
        if end <= start:
            return
        zeros = torch.zeros(self.store.batch, dtype=torch.long)
        for layer in self.targets:
            keys = self.store.mirror_v[layer][:, :, start:end][..., self.key_perm]
            self.chunk_keys.extend(layer, keys, start, zeros, self.layer_devices[layer])

    def _score_chunks(self) -> torch.Tensor:
        keys = self.chunk_keys.stacked()
        return self.indexer.score(
            self.lookahead, self.lookahead_pos, keys, self.lsa.layer_reduce or self.indexer.spec.layer_reduce
        ).to(self.store.device)

    def capture_lookahead(self, layer: int, hidden: torch.Tensor, positions: torch.Tensor) -> None:
        """Keep the newest ``query_window`` tower inputs of a target layer (the next boundary's query).

        Args:
            hidden: ``[q_residual | x]`` of this forward's tokens. # [B, q, q_lora_rank + hidden]
            positions: their positions. # [B or 1, q]
        """
        window = self.lsa.query_window
        self._keep_lookahead_hidden(layer, hidden)
        if layer == self.targets[0]:
            pos = positions[:, -window:].expand(hidden.shape[0], -1)
            old_pos = self.lookahead_pos
            self.lookahead_pos = pos if old_pos is None else torch.cat([old_pos, pos], 1)[:, -window:]

    def _other_device_tensors(self) -> list[torch.Tensor]:
        # every layer's own state: sliding windows, HCA entries, compressor and overlap buffers
        return [t for layer in self.layers for group in layer_state_tensors(layer).values() for t in group]

    def full_kv_bytes(self, num_tokens: int | None = None) -> int:
        """Bytes transformers' own cache holds for this batch at ``num_tokens`` tokens (default: now)."""
        n = self.tokens_seen if num_tokens is None else num_tokens
        elem = self.store.reserve_k[self.spec.csa_layers[0]].element_size()
        return full_cache_bytes(self.spec, n, elem=elem, batch=self.store.batch).total
