"""Writes into token-axis slices of the host mirror."""

import torch

from flashmemory.memory.host_rows import copy_to_host_slice


def test_a_host_slice_written_on_its_own_device_is_one_plain_copy():
    mirror = torch.zeros(2, 3, 40, 8)
    keys = torch.randn(2, 3, 24, 8)
    copy_to_host_slice(keys, mirror[:, :, :24])
    torch.testing.assert_close(mirror[:, :, :24], keys, rtol=0, atol=0)
    assert not mirror[:, :, 24:].any()
