"""A progress bar over the decoder layers while a long prompt is prefilled.

A long context's prefill is one forward pass: on a CPU it can take minutes (SmolLM2-135M reads 8K tokens in about
27 s on two cores), with nothing to show that it moves. Hooks on the decoder layers count the layers the pass has
gone through; on CUDA each long pass waits for its layer's kernels (not for copies on other streams), so the bar
follows the device, not the launches.
"""

from __future__ import annotations

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn

from ..models.adapter import decoder_layers


class PrefillProgress:
    """While entered, a forward of ``model`` over at least ``min_tokens`` tokens shows a bar of its layers (on
    stderr, gone when the pass ends). Shorter forwards, decode steps among them, are not shown and not slowed
    beyond a shape check per layer. A model whose decoder layers cannot be found shows nothing."""

    def __init__(self, model: nn.Module, *, min_tokens: int = 4096, console: Console | None = None) -> None:
        self.model, self.min_tokens = model, min_tokens
        self.console = console or Console(stderr=True)
        self._handles: list = []
        self._progress: Progress | None = None
        self._task = None
        self._tokens = 0

    def __enter__(self) -> PrefillProgress:
        try:
            layers = list(decoder_layers(self.model))
        except ValueError:
            return self
        for i, layer in enumerate(layers):
            self._handles.append(layer.register_forward_pre_hook(self._before(i), with_kwargs=True))
            self._handles.append(layer.register_forward_hook(self._after(i, len(layers)), with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._stop()

    def _long(self, args: tuple, kwargs: dict) -> int:
        hidden = args[0] if args else kwargs.get("hidden_states")
        tokens = int(hidden.shape[-2]) if isinstance(hidden, torch.Tensor) and hidden.dim() >= 2 else 0
        return tokens if tokens >= self.min_tokens else 0

    def _before(self, i: int):
        def hook(module, args, kwargs):
            tokens = self._long(args, kwargs)
            if i == 0 and tokens:
                self._stop()
                self._tokens = tokens
                self._progress = Progress(
                    TextColumn("{task.description}"),
                    BarColumn(),
                    MofNCompleteColumn(),
                    TextColumn("layers"),
                    TimeElapsedColumn(),
                    console=self.console,
                    transient=True,
                )
                self._progress.start()
                self._task = self._progress.add_task(f"prefill of {tokens:,} tokens", total=None)

        return hook

    def _after(self, i: int, count: int):
        def hook(module, args, kwargs, output):
            if self._progress is None or not self._long(args, kwargs):
                return
            hidden = args[0] if args else kwargs.get("hidden_states")
            if hidden.is_cuda:  # the bar follows the device, not the kernel launches; copies on side streams run on
                torch.cuda.current_stream(hidden.device).synchronize()
            self._progress.update(self._task, completed=i + 1, total=count)
            if i == count - 1:
                self._stop()

        return hook

    def _stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


__all__ = ["PrefillProgress"]
