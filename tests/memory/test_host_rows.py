"""Copies to and from token-axis slices of the host mirror."""

import pytest
import torch

from flashmemory.memory.host_rows import StagedWriter, copy_rows, copy_to_host_slice, keys_to_device


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


def test_staged_writer_fills_strided_slices_and_reuses_or_grows_its_buffer():
    mirror = torch.zeros(2, 3, 100, 8)
    writer = StagedWriter()
    blocks = [torch.randn(2, 3, 5, 8) for _ in range(4)]
    writer.write([(blk, mirror[:, :, 10 * i : 10 * i + 5]) for i, blk in enumerate(blocks)])
    for i, blk in enumerate(blocks):
        assert torch.equal(mirror[:, :, 10 * i : 10 * i + 5], blk)
    assert int((mirror != 0).sum()) == sum(b.numel() for b in blocks)  # nothing outside the slices
    first = writer._flat
    writer.write([(blocks[0][:, :, :3], mirror[:, :, 60:63])])  # shorter and fewer: same buffer
    assert writer._flat is first and torch.equal(mirror[:, :, 60:63], blocks[0][:, :, :3])
    longer = [torch.randn(2, 3, 9, 8) for _ in range(3)]
    writer.write([(blk, mirror[:, :, 64 + 10 * i : 73 + 10 * i]) for i, blk in enumerate(longer)])  # grows
    assert writer._flat.numel() == 3 * longer[0].numel()
    for i, blk in enumerate(longer):
        assert torch.equal(mirror[:, :, 64 + 10 * i : 73 + 10 * i], blk)
    writer.write([])  # nothing to flush
