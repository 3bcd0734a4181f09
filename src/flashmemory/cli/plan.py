"""``flashmemory plan``: device and host memory of full attention and LSA for a model, before running it."""

from __future__ import annotations

import json

import torch
import typer
from rich import box
from rich.console import Console
from rich.table import Table

from ..config import LSAConfig
from .errors import friendly_errors

OUT = Console()
GiB = 2**30
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
SUFFIX = {"k": 1 << 10, "m": 1 << 20}


def parse_tokens(text: str) -> int:
    """A token count: ``131072``, ``128K`` or ``1M`` (K = 1024 tokens)."""
    t = text.strip().lower()
    scale = SUFFIX.get(t[-1:], 1)
    digits = t[:-1] if scale > 1 else t
    try:
        value = float(digits) * scale
    except ValueError:
        raise ValueError(f"--context takes a token count such as 131072, 128K or 1M, got {text!r}") from None
    if value < 1 or value != int(value):
        raise ValueError(f"--context must be a whole number of tokens >= 1, got {text!r}")
    return int(value)


def available_host_bytes() -> int | None:
    """The host memory the kernel says can be taken now (``MemAvailable``), or None where it cannot tell."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


@friendly_errors
def plan(
    model: str = typer.Option(
        "smollm2-135m",
        "--model",
        "-m",
        help="An architecture (llama3-8b, llama3-70b, qwen2.5-7b, qwen2.5-32b, mistral-7b, deepseek-v4-flash), a short "
        "name, an HF folder or its config.json, or a GGUF file. Only its configuration is read.",
    ),
    context: list[str] = typer.Option(
        ["32K", "128K", "512K", "1M"], "--context", "-c", help="Prompt tokens (repeatable): 131072, 128K, 1M."
    ),
    budget: float = typer.Option(LSAConfig().budget, help="LSA device KV cap: fraction of the full cache, or bytes."),
    max_new_tokens: int = typer.Option(256, help="Most tokens each answer adds."),
    batch: int = typer.Option(1, help="Sequences decoded together."),
    dtype: str = typer.Option("bfloat16", help="Element type of weights and KV: bfloat16, float16 or float32."),
    device_gib: float = typer.Option(
        None, help="Device memory to fit into, GiB. Default: the CUDA device's total memory, if there is one."
    ),
    host_gib: float = typer.Option(
        None, help="Host memory the mirrors may take, GiB. Default: what the machine has available now."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object per context."),
) -> None:
    """Device and host memory of full attention and LSA for a model and context lengths, from its config alone."""
    from ..runtime.plan import load_config, plan_memory

    if not budget > 0:
        raise ValueError(f"--budget must be a fraction in (0, 1] or a byte count > 1, got {budget}")
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    contexts = [parse_tokens(c) for c in context]
    config = load_config(model)
    limit = getattr(config, "max_position_embeddings", None)
    beyond = {c for c in contexts if limit and c + max_new_tokens > limit}  # past the model's window
    device_bytes = device_gib * GiB if device_gib is not None else _cuda_total_bytes()
    host_bytes = host_gib * GiB if host_gib is not None else available_host_bytes()
    plans = [
        plan_memory(
            config,
            LSAConfig(budget=budget),
            context=c,
            max_new_tokens=max_new_tokens,
            batch=batch,
            dtype=DTYPES[dtype],
        )
        for c in contexts
    ]
    if as_json:
        for p in plans:
            fits = p.max_batch(device_bytes, host_bytes) if device_bytes is not None else (None, None)
            row = p.to_dict() | {"model": model, "dtype": dtype, "budget": budget}
            row |= {
                "full_max_batch": fits[0],
                "lsa_max_batch": fits[1],
                "beyond_window": p.context in beyond,
            }
            print(json.dumps(row))
        return
    title = f"{model} · {dtype} · budget {budget:g} · {max_new_tokens} new tokens · batch {batch}"
    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False)
    for col in ("context", "full KV", "LSA KV", "LSA/full", "host mirror"):
        table.add_column(col, justify="right")
    if device_bytes is not None:
        table.add_column("fit: full/LSA", justify="right")
    for p in plans:
        cells = [
            _tokens(p.context) + (" *" if p.context in beyond else ""),
            _gib(p.full_device_bytes),
            "over budget" if p.error else _gib(p.lsa_device_bytes),
            "" if p.error else f"{p.kv_ratio:.1%}",
            _gib(p.host_bytes),
        ]
        if device_bytes is not None:
            full, lsa = p.max_batch(device_bytes, host_bytes)
            cells.append(f"{full} / {lsa}")
        table.add_row(*cells)
    OUT.print(table)
    notes = [f"weights {_gib(plans[0].weight_bytes)}"]
    if device_bytes is not None:
        where = f"{device_bytes / GiB:.1f} GiB of device memory"
        if host_bytes is not None:
            where += f" and {host_bytes / GiB:.1f} GiB of host memory for the mirrors"
        notes.append(f"fit: most sequences in {where}; weights and KV only (a prefill's activations come on top)")
    if beyond:
        notes.append(f"* past the model's window of {limit:,} tokens")
    for p in plans:
        if p.error:
            notes.append(f"{p.context:,} tokens: {p.error}")
    OUT.print("[dim]" + "\n".join(notes) + "[/]")


def _tokens(n: int) -> str:
    for unit, size in (("M", 1 << 20), ("K", 1 << 10)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return f"{n:,}"


def _gib(n: int) -> str:
    return f"{n / GiB:,.1f} GiB" if n >= GiB else f"{n / 2**20:,.1f} MiB"


def _cuda_total_bytes() -> int | None:
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
