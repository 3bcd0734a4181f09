"""Several questions about one long context, with the context prefilled once.

Answering each question from scratch repeats the prefill of the whole context, which is most of the work at long
contexts. A :class:`Session` runs the context once and keeps
its keys and values in host memory (:class:`~flashmemory.attention.prefix.PrefixKV`); each question then prefills
only its own tokens against them and decodes its answer with a cache of its own. The question's tokens attend to
the whole context as in one prefill of the whole prompt, so every answer is the one ``flashmemory ask`` gives for
that question alone (up to floating-point rounding), whatever was asked before.

Why not a conversation that keeps earlier answers in the cache: under LSA the tokens of a later question would be
read through the resident set the previous answer chose, before the question could choose its own pages, and a
question whose tokens never saw the fact it asks about is read badly even once the fact's pages are recalled.
Here the question's tokens see the whole context.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import torch
from torch import nn

from ..attention.prefix import PrefixKV, layer_windows
from ..config import LSAConfig
from ..indexer.memory_indexer import MemoryIndexer, zero_shot_indexer
from ..indexer.shipped import resolve_indexer
from ..memory.kv_files import saved_name
from ..models.loader import weights_digest
from .generate import METHODS, GenerationResult, decode_result, encode_prompts, generate_ids
from .graph_step import check_graph_replay, choose_graph_replay
from .sampling import Sampling, StopText

INSTRUCTION = "Answer from the text above."

QUESTION_ROOM = 4096
"""Tokens an LSA session leaves after the context in its host copy, for each question's own tokens and its answer:
a question's cache writes them there and uses the whole as its host mirror, instead of copying the context into a
mirror of its own. A longer question and answer still work, through a mirror of their own."""


def build_prompt(context: str, question: str) -> str:
    """The user turn that asks ``question`` about ``context`` (what ``flashmemory ask`` sends)."""
    return f"{context}\n\n{INSTRUCTION} {question}"


def question_ids(tokenizer, context: str, question: str, *, chat: bool = True) -> torch.Tensor:
    """The ids ``flashmemory ask`` prefills for ``question`` about ``context``. # [1, T]

    Each call tokenises the whole context (0.41 s for 128K tokens of Python source on a 2-core x86_64 host), so a
    caller that checks a prompt's length first hands these ids on to :meth:`Session.ask` or
    :func:`~flashmemory.runtime.generate.generate_encoded` rather than having them tokenised again.
    """
    return encode_prompts(tokenizer, [build_prompt(context, question)], chat=chat)["input_ids"]


class Session:
    """One long context, prefilled once, and any number of questions about it.

    Args:
        model: causal LM from :func:`flashmemory.load_model` or ``transformers``.
        tokenizer: its tokenizer.
        context: the long text; prefilled when the session is made.
        method: ``"lsa"`` or ``"full"``. Default: "lsa".
        lsa: LSA settings. Default: ``LSAConfig()``.
        indexer: as in :func:`flashmemory.generate`. Default: "auto".
        chat: use the tokenizer's chat template when it has one. Default: True.
        cuda_graph: replay each LSA answer's decode steps from a captured CUDA graph (see :func:`generate_ids`):
            None whenever the model and device allow, True requires it, False decodes eagerly; the session holds
            the choice made. Default: None.
        kv_cache: a folder of saved contexts. The context's keys and values are read from it when it holds them
            for this model (a digest of every weight tensor), dtype and context, and written into it after the
            prefill otherwise, so that a later session (another process, another day) skips the prefill.
            Default: None (nothing saved).

    The context's keys and values stay in host memory for the session's life (``prefix.host_bytes``); the device
    holds them only while a question is prefilled, one layer at a time, and then each answer's own cache. Under LSA
    each full-attention layer's host copy has room for :data:`QUESTION_ROOM` more tokens and serves as the question's
    host mirror: the question's cache writes only its own tokens there and locks no mirror of its own (one that
    needs more room gets its own mirror, as a separate request would). Questions are answered one at a time.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        context: str,
        *,
        method: str = "lsa",
        lsa: LSAConfig | None = None,
        indexer: MemoryIndexer | str | None = "auto",
        chat: bool = True,
        cuda_graph: bool | None = None,
        kv_cache: str | Path | None = None,
    ) -> None:
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
        if not context.strip():
            raise ValueError("the context is empty")
        if getattr(model.config, "model_type", None) == "deepseek_v4":
            raise ValueError("sessions run on transformers caches; DeepSeek-V4 answers one prompt at a time")
        if cuda_graph:
            check_graph_replay(model, method, lsa)
        self.model, self.tokenizer, self.method, self.lsa, self.chat = model, tokenizer, method, lsa, chat
        self.context = context
        self.indexer = resolve_indexer(model, indexer) if method == "lsa" else None
        if method == "lsa" and self.indexer is None:
            # made once for every question: each question's cache would otherwise copy the projections again
            self.indexer = zero_shot_indexer(model, lsa or LSAConfig())
        self.cuda_graph = method == "lsa" and choose_graph_replay(model, lsa, cuda_graph, self.indexer)
        self.limit = getattr(model.config, "max_position_embeddings", None)
        self.device = next(model.parameters()).device
        keep = self._prefix_len() - (self._redo_tokens(lsa or LSAConfig()) if method == "lsa" else 0)
        ids = self._encode("?")[:, : max(1, keep)]
        self.prefix_ids = ids[0].tolist()
        if self.limit is not None and len(self.prefix_ids) >= self.limit:
            raise ValueError(
                f"the context is {len(self.prefix_ids)} tokens, the model handles at most {self.limit}; shorten it"
            )
        self.kv_folder: Path | None = None  # where the context's keys and values are saved, with kv_cache
        self.loaded = False  # whether they were read from there rather than computed
        self.save_seconds = 0.0
        t0 = time.perf_counter()
        self.prefix = self._context_kv(ids, kv_cache)
        self.prefill_seconds = time.perf_counter() - t0 - self.save_seconds
        self.answered = 0

    @property
    def saved_context(self) -> dict | None:
        """With ``kv_cache``: the folder of the context's keys and values and whether they were read from it."""
        return None if self.kv_folder is None else {"folder": str(self.kv_folder), "loaded": self.loaded}

    def _context_kv(self, ids: torch.Tensor, kv_cache: str | Path | None) -> PrefixKV:
        """The context's keys and values: read from ``kv_cache`` when saved there, else computed (and saved)."""
        room = QUESTION_ROOM if self.method == "lsa" else 0
        if kv_cache is None:
            return PrefixKV.capture(self.model, ids.to(self.device), room=room)  # waits for the device's copies
        dtype = next(self.model.parameters()).dtype
        expect = {
            "fingerprint": weights_digest(self.model),
            "dtype": str(dtype).removeprefix("torch."),
            "prompt_sha256": hashlib.sha256(ids[0].to(torch.int64).numpy().tobytes()).hexdigest(),
            "window": layer_windows(self.model),
        }
        name = saved_name(expect["fingerprint"], expect["dtype"], expect["prompt_sha256"])
        self.kv_folder = Path(kv_cache).expanduser() / name
        if self.kv_folder.exists():
            self.loaded = True
            return PrefixKV.load(self.kv_folder, expect, self.device, room=room)
        prefix = PrefixKV.capture(self.model, ids.to(self.device), room=room)
        t0 = time.perf_counter()
        prefix.save(self.kv_folder, {**expect, "tokens": int(ids.shape[1])})
        self.save_seconds = time.perf_counter() - t0
        return prefix

    def ask(
        self,
        question: str,
        *,
        max_new_tokens: int = 64,
        on_token=None,
        sampling: Sampling | None = None,
        stop: str | list[str] | None = None,
        prompt_ids: torch.Tensor | None = None,
    ) -> GenerationResult:
        """Answer one question about the context, as a request of its own would.

        Args:
            question: the question.
            max_new_tokens: most tokens of the answer. Default: 64.
            on_token: called with each answer token as it is chosen (for streaming).
            sampling: how each token is chosen (:class:`~flashmemory.runtime.sampling.Sampling`). Default: greedy.
            stop: a string or strings that end the answer; its text ends before the first one reached.
            prompt_ids: the question's prompt as :func:`question_ids` gives it for this session's context and
                ``chat``, when the caller has it already; tokenised here otherwise. # [1, T]

        Returns:
            The answer and its accounting. ``prefill_seconds`` is the question's own prefill, plus the context's
            on the session's first answer; ``context_tokens`` counts the context and the question.
        """
        if not question.strip():
            raise ValueError("the question is empty")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        ids = self._encode(question) if prompt_ids is None else prompt_ids
        if ids.ndim != 2 or ids.shape[0] != 1:
            raise ValueError(f"prompt_ids must hold one prompt, shaped [1, T]; got {list(ids.shape)}")
        if self.limit is not None and ids.shape[1] + max_new_tokens > self.limit:
            raise ValueError(
                f"the context and question are {ids.shape[1]} tokens and the answer may add {max_new_tokens}, but "
                f"the model handles at most {self.limit}; ask for fewer new tokens or shorten the context"
            )
        n = self.prefix.length
        # the question's text could join the context's last token into another one; then the whole prompt is
        # prefilled, as one request would be, rather than answering from a prefix the prompt does not start with
        shared = ids[0, :n].tolist() == self.prefix_ids
        stop_text = StopText.same_for_all(self.tokenizer, stop, 1)
        tokens, stats = generate_ids(
            self.model,
            ids[:, n:] if shared else ids,
            method=self.method,
            lsa=self.lsa,
            indexer=self.indexer,
            max_new_tokens=max_new_tokens,
            eos_token_id=self.tokenizer.eos_token_id,
            on_token=on_token,
            cuda_graph=self.cuda_graph,
            prefix=self.prefix if shared else None,
            sampling=sampling,
            stop=stop_text,
        )
        if self.answered == 0:
            stats.prefill_seconds += self.prefill_seconds
        self.answered += 1
        return decode_result(self.tokenizer, tokens, stats, stop_text)

    def _redo_tokens(self, lsa: LSAConfig) -> int:
        """Context tokens every question prefills again under LSA.

        The first boundary reads the prompt's newest hidden states (the lookahead query and the feedback head's
        window): they must be the ones a prefill of the whole prompt makes, whatever the question's length.
        """
        spec = self.indexer.feedback_spec if self.indexer is not None else None
        return max(lsa.query_window, spec.window if spec is not None else 0)

    def _encode(self, question: str) -> torch.Tensor:
        return question_ids(self.tokenizer, self.context, question, chat=self.chat)

    def _prefix_len(self) -> int:
        """Tokens before the question's turn: the chat template's opening and the context."""
        text = build_prompt(self.context, "?")
        if self.chat and getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
            )
        cut = text.rfind(f"\n\n{INSTRUCTION} ?")
        ids = self.tokenizer(text[:cut], return_tensors="pt", add_special_tokens=not self.chat)["input_ids"]
        return int(ids.shape[1])


__all__ = ["INSTRUCTION", "QUESTION_ROOM", "Session", "build_prompt", "question_ids"]
