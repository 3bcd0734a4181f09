"""``flashmemory serve``: the HTTP server over one model (register with ``app.command()``)."""

from __future__ import annotations

import os
from pathlib import Path

import typer
from rich.console import Console

from ..config import LSAConfig, with_overrides
from .errors import friendly_errors
from .graph_option import cuda_graph_option

OUT = Console(stderr=True)
SERVE_EXTRA = "pip install 'flashmemory[serve]'"


@friendly_errors
def serve(
    model: str = typer.Option("smollm2-135m", "--model", "-m", help="Short name, HF folder or GGUF file."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (0.0.0.0 for every interface)."),
    port: int = typer.Option(8000, help="Port to listen on."),
    device: str = typer.Option("auto", help="cpu, cuda or auto."),
    budget: float = typer.Option(
        LSAConfig().budget, help="Default device KV cap: fraction of the full cache, or bytes."
    ),
    indexer: str = typer.Option("auto", help="auto (shipped checkpoint if it matches), zero-shot, or a folder."),
    max_new_tokens: int = typer.Option(1024, help="The most new tokens one request may ask for."),
    max_batch: int = typer.Option(
        1, help="The most requests decoded together; the reserve is then planned for the batch's longest prompt."
    ),
    batch_wait_ms: float = typer.Option(5.0, help="How long a batch waits for more requests after its first."),
    lsa: list[str] = typer.Option([], "--lsa", help="LSA setting KEY=VALUE (repeatable), e.g. follow_chunks=1."),
    host_cache_gib: float = typer.Option(
        None,
        help="Page-locked host memory kept for later requests' KV mirrors after each request, GiB (unset: all).",
    ),
    kv_cache: Path = typer.Option(
        None, help="Folder of saved contexts for /v1/ask with several questions: read if saved there, else saved."
    ),
    api_key_env: str = typer.Option(
        None, help="Name of an environment variable holding an API key that /v1/ requests must send as a Bearer token."
    ),
    cuda_graph: bool | None = cuda_graph_option(),
) -> None:
    """Serve OpenAI-style /v1/completions and /v1/chat/completions, and /v1/ask, with LSA (or full attention)."""
    try:
        import uvicorn

        from ..serve import Engine, create_app
    except ImportError as exc:
        raise ValueError(f"the server needs its extra ({exc.name} is missing): {SERVE_EXTRA}") from None
    from ..indexer.shipped import resolve_indexer
    from ..runtime.ask import load_on

    if max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    if not 0 < port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {port}")
    if max_batch < 1 or batch_wait_ms < 0:
        raise ValueError(f"--max-batch must be >= 1 and --batch-wait-ms >= 0, got {max_batch} and {batch_wait_ms}")
    if host_cache_gib is not None and host_cache_gib < 0:
        raise ValueError(f"--host-cache-gib must be >= 0, got {host_cache_gib}")
    generic = with_overrides(LSAConfig(budget=budget), lsa)  # checked before the model loads
    api_key = None
    if api_key_env is not None:
        # read from the environment, not the command line, so that it does not show in process lists
        api_key = os.environ.get(api_key_env)
        if not api_key:
            raise ValueError(f"--api-key-env {api_key_env}: that environment variable is not set or empty")
    backbone, tokenizer = load_on(model, device)
    if getattr(backbone.config, "model_type", None) == "deepseek_v4":
        from ..deepseek_v4.cache import deepseek_v4_lsa_config

        if indexer not in ("auto", "zero-shot"):
            raise ValueError("for DeepSeek-V4 the server scores with the native indexer's query path: --indexer auto")
        cfg, chosen = with_overrides(deepseek_v4_lsa_config(budget=budget), lsa), None
    else:
        cfg, chosen = generic, resolve_indexer(backbone, indexer)
    engine = Engine(
        backbone,
        tokenizer,
        model,
        lsa=cfg,
        indexer=chosen,
        max_new_tokens=max_new_tokens,
        max_batch=max_batch,
        batch_wait=batch_wait_ms / 1000,
        kv_cache=kv_cache,
        host_cache_bytes=None if host_cache_gib is None else int(host_cache_gib * 2**30),
        cuda_graph=cuda_graph,
    )
    decode = "CUDA-graph replay" if engine.cuda_graph else "eager"
    OUT.print(
        f"serving {model} on {backbone.device} at http://{host}:{port} (budget {budget:g}, indexer {indexer}, "
        f"{decode} LSA decode)"
    )
    uvicorn.run(create_app(engine, api_key=api_key), host=host, port=port, log_level="info")
