"""Request bodies of the HTTP server: the OpenAI-style completion endpoints and flashmemory's own ``/v1/ask``.

The completion endpoints sample as OpenAI's do (``temperature``, ``top_p``, ``seed``, and ``top_k`` as an extra
field) and end answers at ``stop`` strings, except that an unset temperature means greedy decoding here, so that a
request without one is reproducible. What is not supported (penalties, ``n`` > 1) is refused rather than quietly
ignored. ``stream`` sends the answer as server-sent events, as OpenAI's API does.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..runtime.sampling import Sampling, stop_list


class LSAChoice(BaseModel):
    """Per-request choice of attention, shared by every endpoint (OpenAI clients send it as extra body fields)."""

    model_config = ConfigDict(extra="forbid")

    method: Literal["lsa", "full"] = "lsa"
    budget: float | None = Field(
        None, gt=0, description="Device KV cap: fraction of the full cache in (0, 1] or bytes; unset: the server's."
    )


class _Sampling(LSAChoice):
    model: str | None = None
    max_tokens: int = Field(16, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="Newer name of max_tokens; wins when set.")
    temperature: float | None = Field(None, ge=0, le=2, description="0 or unset: greedy.")
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, description="Sample among the k most likely tokens; 0 or unset: all.")
    n: int | None = None
    stream: bool | None = None
    stop: str | list[str] | None = Field(None, description="Up to 4 strings; the answer ends before the first one.")
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = Field(None, description="Seed of the draws; a request with one is decoded alone.")
    stream_options: dict | None = Field(None, description="Accepted; a stream's last chunk always has the usage.")
    logprobs: bool | int | None = Field(None, description="Only false or unset: log-probabilities are not returned.")
    top_logprobs: int | None = Field(None, description="Only 0 or unset.")
    user: str | None = None

    @property
    def new_tokens(self) -> int:
        return self.max_completion_tokens or self.max_tokens

    @property
    def sampling(self) -> Sampling:
        return Sampling(
            temperature=self.temperature or 0.0,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k or 0,
            seed=self.seed,
        )

    @property
    def stop_strings(self) -> list[str]:
        return stop_list(self.stop)

    @model_validator(mode="after")
    def _supported(self):
        if self.presence_penalty not in (None, 0) or self.frequency_penalty not in (None, 0):
            raise ValueError("penalties are not supported: presence_penalty and frequency_penalty must be 0")
        if self.n not in (None, 1):
            raise ValueError("one completion per request: n must be 1 or left out")
        if self.logprobs not in (None, False, 0) or self.top_logprobs not in (None, 0):
            raise ValueError("log-probabilities are not returned: logprobs must be false (or 0) or left out")
        if len(self.stop_strings) > 4 or "" in self.stop_strings:
            raise ValueError("stop: at most 4 strings, none of them empty")
        return self


class CompletionRequest(_Sampling):
    """``POST /v1/completions``: a raw prompt, continued as is (no chat template)."""

    prompt: str = Field(min_length=1)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(_Sampling):
    """``POST /v1/chat/completions``: messages rendered with the model's chat template."""

    messages: list[ChatMessage] = Field(min_length=1)


class AskRequest(LSAChoice):
    """``POST /v1/ask``: what ``flashmemory ask`` does, with the context in the body instead of a file."""

    context: str = Field(min_length=1)
    question: str | None = Field(None, min_length=1)
    questions: list[str] | None = Field(
        None,
        min_length=1,
        description="Several questions about the context, answered over one prefill of it (instead of question).",
    )
    max_new_tokens: int | None = Field(None, ge=1, description="Unset: 64, or the server's limit if lower.")

    @model_validator(mode="after")
    def _one_kind_of_question(self) -> AskRequest:
        if (self.question is None) == (self.questions is None):
            raise ValueError("give either question or questions")
        return self
