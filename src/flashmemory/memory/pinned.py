"""Page-locked host memory for the KV mirror, locked at its exact size and kept for the next request.

The mirror must be page-locked: copies from pageable memory run at a fraction of the bus's speed and cannot
overlap compute. torch's caching host allocator locks each block with ``cudaHostAlloc`` after rounding it up to
a power of two. A store's mirror of a 128K prompt of a Llama-3-8B shape is 64 tensors of just over 256 MiB: the
allocator locked 32 GiB for 16 GiB of keys and values, in 21.4 s on an H200 host. Ordinary memory of the exact
size, written once (which faults its pages in on every core) and then registered with the driver, took 1.6 s
and locks 16 GiB; copies run at the same 55 GB/s (``benchmarks/results/pinned_alloc_h200/``). At 1M tokens the
rounding alone would ask for twice the 128 GiB that the mirror needs.

:class:`PinnedPool` hands out such blocks and takes them back when their owner is collected, so a server's later
requests reuse the memory the first one locked, as torch's allocator would, without the rounding.
"""

from __future__ import annotations

import threading
import warnings
import weakref
from dataclasses import dataclass

import torch

# cudaHostRegisterPortable | cudaHostRegisterMapped: usable from every device, and addressable by kernels (the
# Triton page copy reads the mirror in place)
_REGISTER_FLAGS = 3


@dataclass(eq=False)
class _Block:
    data: torch.Tensor  # uint8, the whole locked region
    registered: bool  # True: registered by the pool; False: from torch's allocator (the fallback)
    device: torch.device | None = None  # the device whose streams last used it


class HostBlock:
    """A page-locked host region leased from a :class:`PinnedPool`; it goes back to the pool when collected.

    Tensors made by :meth:`tensors` are views of the region and do not keep it leased: the lease lives as long as
    this object does, so whoever uses the views must hold it (a store holds its mirror's block).
    """

    def __init__(self, pool: PinnedPool, block: _Block, nbytes: int) -> None:
        self.nbytes = nbytes
        self.data = block.data[:nbytes]
        self._finalizer = weakref.finalize(self, pool._give, block)

    def tensors(self, shapes: list[tuple[int, ...]], dtype: torch.dtype) -> list[torch.Tensor]:
        """One tensor of ``dtype`` per shape, carved from the region in order, front first."""
        sizes = [_numel(s) * dtype.itemsize for s in shapes]
        if sum(sizes) > self.nbytes:
            raise ValueError(f"tensors of {sum(sizes)} bytes do not fit in a block of {self.nbytes}")
        out, at = [], 0
        for shape, n in zip(shapes, sizes, strict=True):
            out.append(self.data[at : at + n].view(dtype).view(shape))
            at += n
        return out

    def release(self) -> None:
        """Give the region back now; its views must not be used afterwards."""
        self._finalizer()


class PinnedPool:
    """Page-locked host blocks at their exact size, reused across requests.

    A lease takes the smallest free block that holds the request and is at most twice its size; otherwise a new
    block is locked, after unlocking the free blocks too small for it (they would only grow the locked total).
    :meth:`empty` unlocks every free block.

    Args:
        register: locks a tensor's memory in place, returning 0 or an error code; unregister undoes it. Default:
            the CUDA driver's ``cudaHostRegister`` / ``cudaHostUnregister`` (tests pass their own).
    """

    def __init__(self, register=None, unregister=None) -> None:
        self._register = register or _cuda_register
        self._unregister = unregister or _cuda_unregister
        self._free: list[_Block] = []
        self._lock = threading.Lock()
        self.locked_bytes = 0  # held by the pool in leased and free blocks together
        self.blocks_locked = 0  # blocks locked since the pool was made (a reused block does not count)
        self._warned = False

    def lease(self, nbytes: int, device: torch.device) -> HostBlock:
        """A page-locked region of at least ``nbytes`` for buffers that ``device``'s streams copy to and from."""
        if nbytes < 1:
            raise ValueError(f"a host block needs at least one byte, got {nbytes}")
        device = torch.device(device)
        with self._lock:
            fits = [b for b in self._free if nbytes <= b.data.numel() <= 2 * nbytes]
            block = min(fits, key=lambda b: b.data.numel()) if fits else None
            if block is not None:
                self._free.remove(block)
            else:
                small = [b for b in self._free if b.data.numel() < nbytes]
                self._free = [b for b in self._free if b.data.numel() >= nbytes]
        if block is None:
            for b in small:
                self._unlock(b)
            block = self._lock_new_or_free(nbytes)
        elif block.device is not None and block.device.type == "cuda":
            # the last owner's copies may still be in flight on its device's streams
            torch.cuda.synchronize(block.device)
        block.device = device
        return HostBlock(self, block, nbytes)

    def empty(self) -> int:
        """Unlock every free block; returns the bytes unlocked."""
        with self._lock:
            free, self._free = self._free, []
        for b in free:
            self._unlock(b)
        return sum(b.data.numel() for b in free)

    def trim(self, max_free_bytes: int) -> int:
        """Unlock free blocks, largest first, until the free ones hold at most ``max_free_bytes``; returns the bytes
        unlocked. Page-locked memory is memory the rest of the machine cannot have: a server that served one very
        long request need not keep its mirror locked while it serves short ones."""
        with self._lock:
            free = sorted(self._free, key=lambda b: -b.data.numel())
            drop, total = [], sum(b.data.numel() for b in free)
            for b in free:
                if total <= max_free_bytes:
                    break
                drop.append(b)
                total -= b.data.numel()
            self._free = [b for b in self._free if all(b is not d for d in drop)]
        for b in drop:
            self._unlock(b)
        return sum(b.data.numel() for b in drop)

    @property
    def free_bytes(self) -> int:
        with self._lock:
            return sum(b.data.numel() for b in self._free)

    def _give(self, block: _Block) -> None:
        with self._lock:
            self._free.append(block)

    def _lock_new_or_free(self, nbytes: int) -> _Block:
        """A new block; when the host cannot provide it, unlock the free blocks (kept for larger requests) and retry."""
        try:
            return self._lock_new(nbytes)
        except (RuntimeError, MemoryError):
            if not self.empty():
                raise self._no_memory(nbytes) from None
        try:
            return self._lock_new(nbytes)
        except (RuntimeError, MemoryError):
            raise self._no_memory(nbytes) from None

    def _no_memory(self, nbytes: int) -> MemoryError:
        return MemoryError(
            f"the KV history needs {nbytes / 2**30:.2f} GiB of page-locked host memory and this machine could not "
            f"provide it ({self.locked_bytes / 2**30:.2f} GiB already held by requests in flight); use a shorter "
            "context, fewer sequences at once, or a machine with more memory"
        )

    def _lock_new(self, nbytes: int) -> _Block:
        data = torch.zeros(nbytes, dtype=torch.uint8)  # zero-filling faults the pages in, in parallel
        err = self._register(data)
        if err == 0:
            block = _Block(data, registered=True)
        else:
            if not self._warned:
                self._warned = True
                warnings.warn(
                    f"registering host memory with the CUDA driver failed (error {err}); the KV mirror falls back "
                    "to torch's page-locked allocator, which rounds each block up to a power of two",
                    stacklevel=3,
                )
            block = _Block(torch.empty(nbytes, dtype=torch.uint8, pin_memory=True), registered=False)
        with self._lock:
            self.locked_bytes += nbytes
            self.blocks_locked += 1
        return block

    def _unlock(self, block: _Block) -> None:
        if block.device is not None and block.device.type == "cuda":
            torch.cuda.synchronize(block.device)  # its last owner's copies may still be in flight
        if block.registered:
            self._unregister(block.data)
        with self._lock:
            self.locked_bytes -= block.data.numel()


def _cuda_register(data: torch.Tensor) -> int:
    return int(torch.cuda.cudart().cudaHostRegister(data.data_ptr(), data.numel(), _REGISTER_FLAGS))


def _cuda_unregister(data: torch.Tensor) -> None:
    torch.cuda.cudart().cudaHostUnregister(data.data_ptr())


def block_bytes(shapes: list[tuple[int, ...]], dtype: torch.dtype) -> int:
    """Bytes of a block that holds one tensor of ``dtype`` per shape."""
    return sum(_numel(s) for s in shapes) * dtype.itemsize


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


HOST_POOL = PinnedPool()
"""The process's pool: every store's mirror and every captured prefix on CUDA lease from it."""


__all__ = ["HOST_POOL", "HostBlock", "PinnedPool", "block_bytes"]
