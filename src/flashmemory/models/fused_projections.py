"""One matmul for the projections a decoder layer applies to the same input (q/k/v, gate/up).

At batch 1 a decode step reads every weight once, and each projection is its own matrix-vector kernel. The small
ones (an 8B Llama's k and v are 8 MB each) run well below the memory bandwidth, and every kernel adds a launch gap,
even replayed from a CUDA graph. Concatenating the weights that read the same input makes one larger kernel.

The modules stay as they are (names, shapes, ``state_dict``): each one's ``weight`` becomes a view into the
concatenated matrix and the separate matrices are released, so nothing is stored twice, and code that reads
``q_proj.weight`` (the indexer's zero-shot query tower) sees the same values. The first projection of a group
computes the whole group and keeps the other parts; each later one returns its part when it is called with that
same input tensor, and otherwise computes its own product (another order of calls, or another input, stays
correct).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .adapter import decoder_layers

# (attribute path under the decoder layer, projections that read one input, in the order transformers calls them)
GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("self_attn", ("q_proj", "k_proj", "v_proj")),
    ("mlp", ("gate_proj", "up_proj")),
)


class _Group:
    """The concatenated weight of one group and the parts of its last product."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, sizes: list[int]) -> None:
        self.weight, self.bias, self.sizes = weight, bias, sizes
        self.ptrs: list[int] = []  # where each projection's view starts in ``weight``
        self.params: list[nn.Parameter] = []  # the view each projection was given
        self.input: torch.Tensor | None = None
        self.parts: tuple[torch.Tensor, ...] = ()


def _moved(module: nn.Linear, group: _Group, index: int) -> bool:
    """Whether the module's weight was replaced (or, outside ``torch.compile``, moved) since fusing."""
    if module.weight is not group.params[index]:
        return True
    # A data-pointer comparison breaks a compiled graph in two (Dynamo cannot trace it), and compiled code guards
    # on each parameter's device and dtype anyway; eager code checks the pointer, which also catches a move.
    return not torch.compiler.is_compiling() and module.weight.data_ptr() != group.ptrs[index]


def _part_forward(module: nn.Linear, group: _Group, index: int, x: torch.Tensor) -> torch.Tensor:
    if _moved(module, group, index):
        # its own weight is the one to use
        return F.linear(x, module.weight, module.bias)
    if index == 0:
        group.parts = torch.split(F.linear(x, group.weight, group.bias), group.sizes, dim=-1)
        group.input = x
        return group.parts[0]
    if group.input is x and len(group.parts) > index:
        part = group.parts[index]
        if index == len(group.sizes) - 1:
            group.input, group.parts = None, ()  # the step's activations are not kept past their use
        return part
    return F.linear(x, module.weight, module.bias)


def _fuse(modules: Sequence[nn.Linear]) -> Callable[[], None]:
    fused_w = torch.cat([m.weight.detach() for m in modules])
    fused_b = torch.cat([m.bias.detach() for m in modules]) if all(m.bias is not None for m in modules) else None
    sizes = [m.weight.shape[0] for m in modules]
    trainable = [m.weight.requires_grad for m in modules]
    group = _Group(fused_w, fused_b, sizes)
    start = 0
    for i, (m, n) in enumerate(zip(modules, sizes, strict=True)):
        m.weight = nn.Parameter(fused_w[start : start + n], requires_grad=False)
        group.ptrs.append(m.weight.data_ptr())
        group.params.append(m.weight)
        if fused_b is not None:
            m.bias = nn.Parameter(fused_b[start : start + n], requires_grad=False)
        m.forward = functools.partial(_part_forward, m, group, i)
        start += n

    def undo() -> None:
        # Each projection gets a matrix of its own again, copied from its view. Holding the original weights
        # here instead would keep every fused group in memory twice for as long as the model is fused.
        for m, grad in zip(modules, trainable, strict=True):
            m.weight = nn.Parameter(m.weight.detach().clone(), requires_grad=grad)
            if fused_b is not None:
                m.bias = nn.Parameter(m.bias.detach().clone(), requires_grad=grad)
            del m.forward  # back to the class's forward

    return undo


def fuse_projections(model: nn.Module) -> Callable[[], None]:
    """Fuse the q/k/v and gate/up projections of every decoder layer of ``model``, in place.

    Call it once the model is on its device and in its dtype: moving it afterwards copies each view into a matrix
    of its own, and each projection then computes its own product again (correct, but no longer fused). Groups
    whose projections differ in input size, dtype or device, or where some have a bias and others not, are left
    alone.

    Returns:
        A function that puts the original weights and forwards back.
    """
    undos = []
    for decoder in decoder_layers(model):
        for attr, names in GROUPS:
            parent = getattr(decoder, attr, None)
            modules = [getattr(parent, n, None) for n in names] if parent is not None else []
            if len(modules) < 2 or not all(type(m) is nn.Linear for m in modules):
                continue
            if len({(m.weight.shape[1], m.weight.dtype, m.weight.device) for m in modules}) != 1:
                continue
            if len({m.bias is None for m in modules}) != 1:
                continue
            undos.append(_fuse(modules))

    def undo_all() -> None:
        for undo in reversed(undos):
            undo()

    return undo_all


__all__ = ["GROUPS", "fuse_projections"]
