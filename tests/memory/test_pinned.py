"""The page-locked host block pool: exact sizes, reuse across owners, unlocking what cannot be reused."""

import gc
import warnings

import pytest
import torch

from flashmemory.memory.pinned import PinnedPool, block_bytes


class FakeDriver:
    """Stands in for cudaHostRegister / cudaHostUnregister on a machine without CUDA."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.locked: dict[int, int] = {}

    def register(self, data: torch.Tensor) -> int:
        if self.fail:
            return 1
        self.locked[data.data_ptr()] = data.numel()
        return 0

    def unregister(self, data: torch.Tensor) -> None:
        del self.locked[data.data_ptr()]


def pool_and_driver() -> tuple[PinnedPool, FakeDriver]:
    driver = FakeDriver()
    return PinnedPool(register=driver.register, unregister=driver.unregister), driver


def test_a_block_is_locked_at_its_exact_size_and_carved_into_tensors():
    pool, driver = pool_and_driver()
    shapes = [(1, 8, 1000, 128), (1, 8, 1000, 128), (1, 2, 7, 3)]
    nbytes = block_bytes(shapes, torch.bfloat16)
    assert nbytes == (2 * 8 * 1000 * 128 + 2 * 7 * 3) * 2
    block = pool.lease(nbytes, torch.device("cpu"))
    assert list(driver.locked.values()) == [nbytes]  # no rounding up to a power of two
    k, v, small = block.tensors(shapes, torch.bfloat16)
    assert k.shape == shapes[0] and small.shape == shapes[2] and k.is_contiguous()
    k.fill_(1.0)
    v.fill_(2.0)
    small.fill_(3.0)
    assert k.sum() == k.numel() and v.sum() == 2 * v.numel()  # the views do not overlap
    assert v.data_ptr() == k.data_ptr() + k.numel() * 2
    with pytest.raises(ValueError, match="do not fit"):
        block.tensors([*shapes, (1,)], torch.bfloat16)


def test_a_collected_owner_gives_its_block_back_and_the_next_lease_reuses_it():
    pool, driver = pool_and_driver()

    class Owner:
        def __init__(self, n: int) -> None:
            self.block = pool.lease(n, torch.device("cpu"))

    first = Owner(1000)
    ptr = first.block.data.data_ptr()
    assert pool.free_bytes == 0
    del first
    gc.collect()
    assert pool.free_bytes == 1000
    second = Owner(900)  # fits, and wastes less than half: reused, nothing newly locked
    assert second.block.data.data_ptr() == ptr and second.block.nbytes == 900
    assert pool.blocks_locked == 1 and pool.locked_bytes == 1000
    third = Owner(1000)  # the only free-able block is leased: a new one is locked
    assert pool.blocks_locked == 2 and len(driver.locked) == 2
    assert third.block.data.data_ptr() != ptr


def test_a_lease_does_not_take_a_block_more_than_twice_its_size_and_unlocks_blocks_too_small():
    pool, driver = pool_and_driver()
    big = pool.lease(10_000, torch.device("cpu"))
    small = pool.lease(100, torch.device("cpu"))
    big.release()
    small.release()
    assert pool.free_bytes == 10_100
    tiny = pool.lease(50, torch.device("cpu"))  # the 100-byte block: at most twice the request
    assert tiny.data.numel() == 50 and pool.blocks_locked == 2
    mid = pool.lease(3_000, torch.device("cpu"))  # no free block fits within 2x: a new one is locked
    assert pool.blocks_locked == 3
    assert sorted(driver.locked.values()) == [100, 3_000, 10_000]
    tiny.release()
    mid.release()
    larger = pool.lease(20_000, torch.device("cpu"))  # every free block is smaller: they are unlocked first
    assert sorted(driver.locked.values()) == [20_000]
    assert pool.locked_bytes == 20_000 and pool.free_bytes == 0
    larger.release()
    assert pool.empty() == 20_000 and not driver.locked and pool.locked_bytes == 0


def test_a_released_block_is_given_back_once():
    pool, _ = pool_and_driver()
    block = pool.lease(64, torch.device("cpu"))
    block.release()
    block.release()
    del block
    gc.collect()
    assert pool.free_bytes == 64


def test_a_failed_registration_warns_once_and_falls_back_to_torch_page_locked_memory(monkeypatch):
    driver = FakeDriver(fail=True)
    pool = PinnedPool(register=driver.register, unregister=driver.unregister)
    made = []

    def fake_empty(n, dtype, pin_memory=False):
        made.append(pin_memory)
        return torch.zeros(n, dtype=dtype)

    monkeypatch.setattr("flashmemory.memory.pinned.torch.empty", fake_empty)
    with pytest.warns(UserWarning, match="falls back"):
        a = pool.lease(128, torch.device("cpu"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        b = pool.lease(128, torch.device("cpu"))
    assert made == [True, True] and a.nbytes == b.nbytes == 128
    a.release()
    pool.empty()  # a fallback block is never unregistered
    assert not driver.locked


def test_an_empty_lease_is_refused():
    pool, _ = pool_and_driver()
    with pytest.raises(ValueError, match="at least one byte"):
        pool.lease(0, torch.device("cpu"))


def test_when_the_host_runs_out_the_free_blocks_are_unlocked_and_the_lease_retried(monkeypatch):
    pool, driver = pool_and_driver()
    pool.lease(5000, torch.device("cpu")).release()  # kept free: too large to reuse for 1000 bytes
    held = pool.lease(2000, torch.device("cpu"))
    real_zeros = torch.zeros
    calls = []

    def scarce_zeros(n, dtype):
        calls.append(n)
        if pool.free_bytes:  # the host has room only once the free block is unlocked
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory")
        return real_zeros(n, dtype=dtype)

    monkeypatch.setattr("flashmemory.memory.pinned.torch.zeros", scarce_zeros)
    block = pool.lease(1000, torch.device("cpu"))
    assert calls == [1000, 1000] and block.nbytes == 1000
    assert sorted(driver.locked.values()) == [1000, 2000] and pool.locked_bytes == 3000
    held.release()


def test_a_lease_the_host_cannot_provide_is_refused_with_the_bytes_it_needed(monkeypatch):
    pool, _ = pool_and_driver()

    def no_memory(n, dtype):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr("flashmemory.memory.pinned.torch.zeros", no_memory)
    with pytest.raises(MemoryError, match="needs 4.00 GiB of page-locked host memory"):
        pool.lease(4 << 30, torch.device("cpu"))
    assert pool.locked_bytes == 0


def test_trim_unlocks_the_largest_free_blocks_until_the_rest_fit():
    pool, driver = pool_and_driver()
    held = pool.lease(100, torch.device("cpu"))
    blocks = [pool.lease(n, torch.device("cpu")) for n in (5000, 3000, 400)]
    for b in blocks:
        b.release()
    assert pool.free_bytes == 8400
    assert pool.trim(4000) == 5000  # largest first, until the rest (3400) fit
    assert pool.trim(400) == 3000
    assert pool.free_bytes == 400 and sorted(driver.locked.values()) == [100, 400]
    assert pool.trim(10_000) == 0
    assert pool.trim(0) == 400 and list(driver.locked.values()) == [100]  # a leased block is never unlocked
    held.release()
