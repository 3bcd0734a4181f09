"""``python -m flashmemory`` runs the CLI."""

from .cli import main

main()
