"""Copies to and from token-axis slices of the host mirror."""

import pytest
import torch

from flashmemory.memory.host_rows import copy_rows, copy_to_host_slice, keys_to_device


def test_a_host_slice_written_on_its_own_device_is_one_plain_copy():
    mirror = torch.zeros(2, 3, 40, 8)
    keys = torch.randn(2, 3, 24, 8)
    copy_to_host_slice(keys, mirror[:, :, :24])
    torch.testing.assert_close(mirror[:, :, :24], keys, rtol=0, atol=0)
    assert not mirror[:, :, 24:].any()


def test_token_key_rows_copy_a_mirror_slice_exactly():
    mirror = torch.randn(2, 3, 40, 8)
    block = mirror[:, :, 16:32]  # a token-axis slice: not contiguous, each (sequence, head) row is
    assert not block.is_contiguous() and block[1, 2].is_contiguous()
    out = copy_rows(block, torch.empty(2, 3, 16, 8))
    torch.testing.assert_close(out, block, rtol=0, atol=0)
    assert keys_to_device(block, block.device) is block  # already there: no copy
    with pytest.raises(ValueError, match="equal shapes"):
        copy_rows(block, torch.empty(2, 3, 15, 8))
