"""HTTP server: OpenAI-style completions and ``/v1/ask`` over one model, with LSA or full attention per request."""

from .app import Engine, create_app

__all__ = ["Engine", "create_app"]
