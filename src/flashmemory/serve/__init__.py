"""HTTP server: OpenAI-style completions and ``/v1/ask`` over one model, with LSA or full attention per request."""

from .app import create_app
from .engine import Answer, ClientGone, Engine

__all__ = ["Answer", "ClientGone", "Engine", "create_app"]
